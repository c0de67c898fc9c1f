"""Train the v2 world model (discrete RSSM: encoder, RSSM, decoder, reward and continue heads).

    python scripts/train_rssm.py --data-dir data --preset default --time-budget 20
    torchrun --nproc_per_node 2 scripts/train_rssm.py --data-dir data      # DDP (gloo on CPU, NCCL on GPU)
    python scripts/train_rssm.py --out-dir checkpoints/rssm_v2 --resume    # continue a killed run exactly

Writes into --out-dir: config.json (resolved model + run config), metrics.jsonl (every --log-every
steps and every epoch), metrics.json (per-epoch records), loss_curves.png, reconstruction_epoch_NNN.png
(real | reconstruction), best_world_model.pt (lowest validation loss), world_model_epoch_NNN.pt
(every --save-interval epochs) and checkpoint_latest.pt (every --checkpoint-every batches and each
epoch end; holds optimizer, RNG states and data position for --resume).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import artifacts
import checkpoint
import fused
import imagination
from dataset import PokemonDataset, evenly, frames_to_float, window_events, world_model_inputs
from errors import UserError, cli
from models import RSSM_PRESETS, RSSMConfig, WorldModel, psnr


def make_optimizer(wm: WorldModel, lr: float) -> torch.optim.Optimizer:
    """Adam, or with `weight_decay` AdamW decaying every matrix and kernel (biases and norm gains keep theirs);
    fused: one kernel over all parameters, faster than the multi-tensor default (the same rule, to rounding)."""
    if wm.cfg.weight_decay > 0:
        params = list(wm.parameters())
        return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2]},
                                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                 lr=lr, weight_decay=wm.cfg.weight_decay, fused=True)
    return torch.optim.Adam(wm.parameters(), lr=lr, fused=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data", help="folder of transitions_NNNN.npz chunks")
    p.add_argument("--extra-data-dir", dest="extra_data_dirs", action="append", default=[], metavar="DIR",
                   help="another folder of chunks whose episodes all train (the held-out ones stay --data-dir's, "
                        "as without it: more data, the same validation); repeatable")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training windows")
    p.add_argument("--batch-size", type=int, default=32, help="windows per batch (per process under torchrun)")
    p.add_argument("--seq-len", type=int, default=15, help="frames per training window")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the preset's, 3e-4; tiles 1e-3)")
    p.add_argument("--kl-scale", type=float, default=1.0, help="multiplies both KL terms (dyn and rep)")
    p.add_argument("--reward-scale", type=float, default=1.0, help="weight of the reward loss")
    p.add_argument("--continue-scale", type=float, default=1.0, help="weight of the continue loss")
    p.add_argument("--out-dir", default="checkpoints/rssm_v2", help="run folder for checkpoints, metrics, images")
    p.add_argument("--val-split", type=float, default=0.1, help="fraction of EPISODES held out for validation")
    p.add_argument("--save-interval", type=int, default=5, help="write world_model_epoch_NNN.pt every N epochs")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N chunks of --data-dir")
    p.add_argument("--preset", choices=RSSM_PRESETS, default="default",
                   help="model preset: faithful (the original, ~56.7 M), default (DreamerV3 recipes, CPU-sized, two "
                        "local latents a cell), global (the default before session 30: no local latents), pixels, "
                        "tiny (tests)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one RSSMConfig field (value parsed as JSON), e.g. --set deter=512; repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of model init, data order, sampling and the split")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the episode split alone (default: --seed); keep it to compare seeds on the same "
                        "held-out episodes (evaluate_rssm.py's --seed, 0 by default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop cleanly after this much wall-clock time (evaluates and saves first)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap on batches per epoch")
    p.add_argument("--val-batches", type=int, default=20, help="cap on validation batches per evaluation")
    p.add_argument("--val-every", type=int, default=0,
                   help="also validate every N batches (PSNR against training seconds in metrics.jsonl, for "
                        "time-to-quality; RNG untouched, so training is the same as without); 0: only per epoch")
    p.add_argument("--checkpoint-every", type=int, default=500, help="write checkpoint_latest.pt every N batches")
    p.add_argument("--log-every", type=int, default=10, help="log training metrics every N batches")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint_latest.pt")
    args = p.parse_args(argv)
    if args.val_every < 0:
        raise UserError(f"--val-every must be >= 0, got {args.val_every}")
    for name in ("epochs", "batch_size", "save_interval", "checkpoint_every", "log_every", "val_batches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (rewards are predicted from the next state), got {args.seq_len}")
    if not 0 <= args.val_split < 1:
        raise UserError(f"--val-split must be in [0, 1), got {args.val_split}")
    return args


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set deter=512")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def setup_distributed(device_flag: str):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group."""
    use_cuda = checkpoint.resolve_device(device_flag).startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def scheduled_lr(cfg: RSSMConfig, base: float, progress: float) -> float:
    """The learning rate after `progress` (0..1) of the run: constant, or a cosine from base to base * lr_final."""
    if cfg.lr_schedule == "constant":
        return base
    progress = min(max(progress, 0.0), 1.0)
    return base * (cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def repeat_event_windows(ds: PokemonDataset, starts: np.ndarray, battle_repeats: int,
                         map_change_repeats: int = 1) -> np.ndarray:
    """The training windows an epoch draws: each window with a battle frame `battle_repeats` times, each other
    window in which the map id changes `map_change_repeats` times, the rest once."""
    if battle_repeats == map_change_repeats == 1:
        return starts
    rows = starts[:, None] + np.arange(ds.seq_len)  # (windows, seq_len): the RAM bytes `window_events` reads
    events = window_events({key: torch.from_numpy(ds.arrays[key][rows]) for key in ("in_battles", "dialog_opens", "map_ids")})
    has_battle, has_change = events["battle"].numpy(), events["map change"].numpy()
    times = np.where(has_battle, battle_repeats, np.where(has_change, map_change_repeats, 1))
    return np.concatenate([starts, np.repeat(starts, times - 1)])


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The deterministic shuffle of the training windows for one epoch (same on every rank)."""
    return np.random.default_rng([seed, epoch]).permutation(count)


@torch.inference_mode()
def evaluate(wm: WorldModel, ds: PokemonDataset, starts: np.ndarray, batch_size: int, max_batches: int, device) -> dict:
    """Mean validation losses and the posterior reconstruction PSNR (decoded frames clamped to [0, 1]) on up to
    max_batches batches of windows spread over all of `starts` (every held-out episode, as evaluate_rssm.py)."""
    wm.eval()
    sums, count = {}, 0
    starts = evenly(starts, max_batches * batch_size)
    for i in range(math.ceil(len(starts) / batch_size)):
        inputs = world_model_inputs(ds, starts[i * batch_size:(i + 1) * batch_size], device,
                                    place_keys=wm.place_keys)
        total, losses, metrics, states = wm(**inputs)
        frames = inputs["frames"]
        recon = wm.decode(imagination.features(states))
        values = {"loss": total.item(), "kl": metrics["kl"], "recon": metrics["recon_mse"],
                  "reward": metrics["reward_mse"], "mse": (recon - frames).pow(2).mean().item()}
        values.update({f"loss_{k}": v.item() for k, v in losses.items()})
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v * len(frames)
        count += len(frames)
    wm.train()
    means = {k: v / count for k, v in sums.items()}
    # PSNR of the mean squared error: frames reconstructed exactly cannot inflate it the way a mean of
    # per-frame PSNRs (each infinite for an exact frame) would
    means["psnr"] = psnr(torch.tensor(means["mse"])).item()
    return means


@torch.inference_mode()
def save_reconstructions(wm: WorldModel, ds: PokemonDataset, starts: np.ndarray, path: Path, device) -> None:
    """A grid: one row per window, real frames at three times | their posterior reconstructions."""
    wm.eval()
    batch = ds.get_batch(starts[:4])
    frames = frames_to_float(batch["obs"], device)
    ctx = imagination.observe(wm, frames, batch["actions"].to(device))
    recon, frames = imagination.decode(wm, ctx["feat"]).cpu(), frames.cpu()
    wm.train()
    times = sorted({0, frames.shape[1] // 2, frames.shape[1] - 1})
    rows = []
    for b in range(len(frames)):
        real = [frames[b, t] for t in times]
        pred = [recon[b, t] for t in times]
        gap = torch.ones(3, frames.shape[-2], 4)
        rows.append(torch.cat(real + [gap] + pred, -1))  # (3, H, W')
    grid = torch.cat([torch.cat([r, torch.ones(3, 2, r.shape[-1])], -2) for r in rows], -2)
    image = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    artifacts.write_image(path, image)


def fit_tiles(wm: WorldModel, ds: PokemonDataset, train_starts: np.ndarray, verbose: bool) -> None:
    """Fill a "tiles" model's codebook from the frames of the training windows (same result on every rank)."""
    rows = np.zeros(len(ds.obs), bool)
    for offset in range(ds.seq_len):
        rows[train_starts + offset] = True
    began = time.perf_counter()
    try:
        stats = wm.tiles.fit(ds.obs, rows=np.flatnonzero(rows))
    except ValueError as err:
        raise UserError(f"{ds.data_dir}: {err}") from None
    if verbose:
        print(f"tile codebook: {stats['distinct']} distinct 8x8 tiles in {int(rows.sum())} frames, kept the "
              f"{stats['kept']} most common, covering {100 * stats['covered']:.3f}% of tile positions "
              f"({time.perf_counter() - began:.1f} s)", flush=True)


class WeightAverage:
    """An exponential moving average of a model's parameters (RSSMConfig.ema_decay), and a way to use it."""

    def __init__(self, wm: WorldModel, decay: float):
        self.params, self.decay = list(wm.parameters()), decay
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """Inside: the model's parameters hold the average (copied in, so that each one's version moves on)."""
        trained = [p.detach().clone() for p in self.params]
        for p, a in zip(self.params, self.average):
            p.copy_(a)
        try:
            yield
        finally:
            for p, t in zip(self.params, trained):
                p.copy_(t)


def nonfinite_losses(total, losses: dict) -> list[str]:
    bad = [k for k, v in losses.items() if not torch.isfinite(v).item()]
    return bad or ([] if torch.isfinite(total).item() else ["total"])


@cli
def main(argv=None):
    args = parse_args(argv)
    checkpoint.keep_freed_memory()  # no page faults for re-allocated activations (benchmark.py: train_faithful)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    main_process = rank == 0
    out_dir = Path(args.out_dir)
    latest_path = out_dir / "checkpoint_latest.pt"

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the run folder {out_dir} ({err.strerror}); choose another --out-dir") from None
    ds = PokemonDataset(args.data_dir, seq_len=args.seq_len, max_files=args.max_files, extra_dirs=args.extra_data_dirs)
    for key in ("rewards",):
        bad = np.flatnonzero(~np.isfinite(ds.arrays[key]))
        if len(bad):
            chunk = ds.files[int(np.searchsorted(ds.file_offsets, bad[0], side="right")) - 1]
            raise UserError(f"chunk {chunk} holds non-finite {key} ({len(bad)} rows of the data); "
                            f"delete or recollect it")
    train_starts, val_starts = ds.split(args.val_split, seed=args.seed if args.split_seed is None else args.split_seed)
    if main_process:
        extra = f" ({int((train_starts >= ds.main_rows).sum())} from --extra-data-dir)" if args.extra_data_dirs else ""
        print(f"data: {len(train_starts)} training windows of {args.seq_len} frames{extra}, {len(val_starts)} held out "
              f"({ds.num_rows} frames)", flush=True)
    global_batch = args.batch_size * world
    if len(train_starts) < global_batch:
        raise UserError(f"the data has {len(train_starts)} training windows of {args.seq_len} frames, fewer than one "
                        f"batch of {global_batch}; lower --batch-size or --seq-len, or collect more data")

    resume = None
    if args.resume:
        resume = checkpoint.load_checkpoint(latest_path, kind="rssm")
        cfg = RSSMConfig.from_dict(resume["config"])
    else:
        overrides = dict(image_size=tuple(ds.resolution), kl_scale=args.kl_scale, reward_scale=args.reward_scale,
                         continue_scale=args.continue_scale)
        overrides.update(parse_overrides(args.overrides))
        try:
            cfg = RSSMConfig.from_preset(args.preset, **overrides)
        except ValueError as err:
            raise UserError(f"model config: {err}") from err
    if tuple(cfg.image_size) != tuple(ds.resolution):
        raise UserError(f"the model expects {cfg.image_size[0]}x{cfg.image_size[1]} frames but {args.data_dir} holds "
                        f"{ds.resolution[0]}x{ds.resolution[1]}")

    drawn = repeat_event_windows(ds, train_starts, cfg.battle_repeats, cfg.map_change_repeats)  # what an epoch draws, in a shuffled order
    batches_per_epoch = len(drawn) // global_batch
    if args.steps_per_epoch:
        batches_per_epoch = min(batches_per_epoch, args.steps_per_epoch)

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    wm = WorldModel(cfg)
    if wm.tiles is not None and resume is None:
        fit_tiles(wm, ds, train_starts, main_process)
    wm = wm.to(device)
    base_lr = args.lr or cfg.lr
    optimizer = make_optimizer(wm, base_lr)
    step, start_epoch, start_batch, best_val, history = 0, 0, 0, float("inf"), []
    if resume is not None:
        checkpoint.check_state_matches(wm, resume["model_state"], what=str(latest_path))
        wm.load_state_dict(resume["model_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        extra = resume["extra"]
        step, start_epoch, start_batch = resume["step"], extra["epoch"], extra["batch_in_epoch"]
        best_val, history = extra["best_val"], extra["history"]
        checkpoint.set_rng_state(extra["rng"])
        if main_process:
            drop_later_records(out_dir / "metrics.jsonl", step)
    average = WeightAverage(wm, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if average is not None and resume is not None:
        for a, saved in zip(average.average, resume["extra"]["weight_average"]):
            a.copy_(saved)
    averaged = average.applied if average is not None else contextlib.nullcontext  # what is validated and saved
    tile_ids = None
    if wm.tiles is not None:  # every frame's tile ids once, so that training steps skip tokenizing
        began = time.perf_counter()
        tile_ids = wm.tiles.tokenize_uint8(ds.obs)
        if main_process:
            print(f"tile ids of {len(ds.obs)} frames ({time.perf_counter() - began:.1f} s)", flush=True)
        if device.type == "cpu":
            fused.ready()  # fused.cpp's tile loss built (once per machine) before the time budget starts
    if rank:
        torch.manual_seed(args.seed + 7919 * rank + step)  # each rank draws its own sampling noise
    model = wm
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(wm, device_ids=[device.index] if device.type == "cuda" else None)

    precision = checkpoint.train_precision(cfg.train_precision, device)
    log = artifacts.RunLog(out_dir, history=history) if main_process else None
    if main_process:
        if cfg.train_precision == "auto":
            print(f"training precision: {precision} (train_precision=auto on {device})", flush=True)
        artifacts.write_json(out_dir / "config.json", {
            "model": cfg.to_dict(), "run": vars(args), "world_size": world, "device": str(device),
            "train_precision": precision,
            "train_windows": int(len(train_starts)), "drawn_per_epoch": int(len(drawn)), "val_windows": int(len(val_starts)),
            "val_episodes": sorted({int(e) for e in ds.segment_ids[val_starts]}),
            "parameters": sum(p.numel() for p in wm.parameters()),
        })

    def save_latest(epoch: int, batch_in_epoch: int) -> None:
        extra = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "best_val": best_val,
                 "history": log.history, "rng": checkpoint.rng_state(), "run_config": vars(args)}
        if average is not None:
            extra["weight_average"] = average.average
        checkpoint.save_checkpoint(latest_path, kind="rssm", config=cfg.to_dict(), model_state=wm.state_dict(),
                                   optimizer_state=optimizer.state_dict(), step=step, extra=extra)

    def save_weights(path: Path, epoch: int, metrics: dict) -> None:
        checkpoint.save_checkpoint(path, kind="rssm", config=cfg.to_dict(), model_state=wm.state_dict(), step=step,
                                   extra={"epoch": epoch, "metrics": metrics, "run_config": vars(args)})

    total_steps = max(1, args.epochs * batches_per_epoch)
    started = time.perf_counter()
    train_seconds = 0.0  # time spent in training batches only (this process, since this start or resume)
    frames_per_batch = global_batch * args.seq_len
    progress = step / total_steps  # the run's fraction done, updated after each step's forward pass
    stop = False
    epoch = start_epoch
    for epoch in range(start_epoch, args.epochs):
        order = drawn[epoch_order(len(drawn), args.seed, epoch)]
        first = start_batch if epoch == start_epoch else 0
        sums, counts, seen, epoch_time = {}, {}, 0, 0.0
        bar = tqdm(range(first, batches_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                   disable=not main_process, dynamic_ncols=True)
        for i in bar:
            t0 = time.perf_counter()
            starts = order[i * global_batch + rank * args.batch_size:i * global_batch + (rank + 1) * args.batch_size]
            log_step = (step + 1) % args.log_every == 0  # frame metrics (recon_mse, psnr) only on logged steps
            inputs = world_model_inputs(ds, starts, device, tile_ids, with_frames=log_step, place_keys=wm.place_keys)
            # bfloat16 until the float32 tail: by batches, or by the last step's time (the same on every rank)
            low_precision = precision == "bfloat16" and max(step / total_steps, progress) < 1.0 - cfg.float32_tail
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low_precision):
                total, losses, metrics, _ = model(**inputs, frame_metrics=log_step)
            bad = nonfinite_losses(total, losses)
            elapsed = time.perf_counter() - started
            out_of_time = args.time_budget is not None and elapsed > args.time_budget * 60
            if world > 1:  # every rank must agree to stop, and on the learning rate
                flags = torch.tensor([float(bool(bad)), float(out_of_time), elapsed], device=device, dtype=torch.float64)
                dist.all_reduce(flags)
                bad = bad or (["on another rank"] if flags[0] > 0 else [])
                out_of_time = bool(flags[1] > 0)
                elapsed = flags[2].item() / world
            if bad:
                kept = f"the last good checkpoint is {latest_path}" if latest_path.exists() else "no checkpoint was written yet"
                values = ", ".join(f"{k}={losses[k].item()}" for k in bad if k in losses) or f"total={total.item()}"
                raise UserError(f"non-finite loss at step {step + 1} (epoch {epoch + 1}, batch {i + 1}): {values}; "
                                f"{kept}; try a lower --lr")
            progress = step / total_steps  # the run's fraction done: by batches, or by time under --time-budget
            if args.time_budget is not None:
                progress = max(progress, elapsed / (args.time_budget * 60))
            lr = scheduled_lr(cfg, base_lr, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(wm.parameters(), cfg.grad_clip)
            optimizer.step()
            if average is not None:
                average.update()
            step += 1
            dt = time.perf_counter() - t0
            epoch_time += dt
            train_seconds += dt
            values = {"total": total.item(), **{k: v.item() for k, v in losses.items()}, **metrics}
            for k, v in values.items():
                sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
            seen += 1
            if main_process:
                bar.set_postfix(loss=f"{values['total']:.4g}", fps=f"{frames_per_batch * seen / epoch_time:.1f}")
                if log_step:
                    log.record({"step": step, "epoch": epoch + 1, **{f"loss/{k}": v.item() for k, v in losses.items()},
                                "loss/total": values["total"], "train/psnr": metrics["psnr"], "train/kl": metrics["kl"],
                                "train/grad_norm": grad_norm.item(), "train/lr": lr,
                                "train/bfloat16": int(low_precision),
                                "perf/frames_per_s": frames_per_batch / dt},
                               epoch_end=False)
                if args.val_every and step % args.val_every == 0 and len(val_starts):
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), averaged():
                        val = evaluate(wm, ds, val_starts, args.batch_size, args.val_batches, device)
                    log.record({"step": step, "epoch": epoch + 1, "eval/psnr_during": val["psnr"],
                                "loss/val_during": val["loss"], "perf/train_s": train_seconds}, epoch_end=False)
                if step % args.checkpoint_every == 0:
                    save_latest(epoch, i + 1)
            if out_of_time:
                stop = True
                break
        bar.close()
        completed = not stop
        if main_process:
            mean = {k: v / counts[k] for k, v in sums.items()}  # recon_mse: over the logged steps
            record = {"epoch": epoch + 1, "step": step, "loss/train": mean.get("total", float("nan")),
                      "loss/train_recon": mean.get("recon_mse", float("nan")), "loss/train_kl": mean.get("kl", float("nan")),
                      "loss/train_reward": mean.get("reward_mse", float("nan")),
                      "perf/frames_per_s": frames_per_batch * seen / max(epoch_time, 1e-9),
                      "perf/elapsed_s": time.perf_counter() - started}
            with averaged():  # a weight average, where one is kept, is what is validated and saved as a model
                if len(val_starts):
                    val = evaluate(wm, ds, val_starts, args.batch_size, args.val_batches, device)
                    record.update({"loss/val": val["loss"], "loss/val_recon": val["recon"], "loss/val_kl": val["kl"],
                                   "loss/val_reward": val["reward"], "eval/psnr": val["psnr"]})
                    if "loss_place" in val:  # place heads: their validation cross-entropy (posterior + open loop)
                        record["loss/val_place"] = val["loss_place"]
                    score = val["loss"]
                    save_reconstructions(wm, ds, val_starts, out_dir / f"reconstruction_epoch_{epoch + 1:03d}.png", device)
                else:  # no validation episodes: score on training windows (a resumed epoch may have run no batch here)
                    score = evaluate(wm, ds, train_starts, args.batch_size, args.val_batches, device)["loss"]
                    save_reconstructions(wm, ds, train_starts, out_dir / f"reconstruction_epoch_{epoch + 1:03d}.png", device)
                if not completed:
                    record["stopped"] = "time budget"
                log.record(record)
                if score < best_val:
                    best_val = score
                    save_weights(out_dir / "best_world_model.pt", epoch + 1, record)
                if completed and (epoch + 1) % args.save_interval == 0:
                    save_weights(out_dir / f"world_model_epoch_{epoch + 1:03d}.pt", epoch + 1, record)
            if completed:
                save_latest(epoch + 1, 0)
            else:
                save_latest(epoch, i + 1)
            log.plot([["loss/train", "loss/val"], ["loss/train_recon", "loss/val_recon"],
                      ["loss/train_kl", "loss/val_kl"], ["eval/psnr"]], title=f"RSSM ({cfg.preset})")
        if stop:
            break
    if world > 1:  # the ranks' weights must be identical: record the largest difference
        flat = torch.cat([p.detach().flatten() for p in wm.parameters()])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if main_process:
            log.record({"step": step, "ddp/world_size": world, "ddp/max_weight_diff": (high - low).max().item()},
                       epoch_end=False)
        dist.barrier()
        dist.destroy_process_group()
    if main_process:
        print(f"done: {step} steps; run folder {out_dir}; best validation loss {best_val:.6g}", flush=True)
    return out_dir


def drop_later_records(path: Path, step: int) -> None:
    """On --resume, forget metrics.jsonl records written after the checkpoint's step."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    artifacts.write_text(path, "".join(line + "\n" for line in keep))


if __name__ == "__main__":
    main()
