"""Speed and memory of the whole pipeline, and of the original's way of doing the same, in one run.

    python scripts/benchmark.py --out outputs/benchmarks.json --hot-paths     # full (15-30 min on 2 busy cores)
    python scripts/benchmark.py --quick --out /tmp/benchmarks.json            # < 2 minutes, tiny sizes

Measured, each in its own forked process (so its peak RSS is its own and one cannot slow the next):
  env_steps            PokemonEnv.step at native 144x160, random actions (1 process)
  collect_original     the ORIGINAL's collector loop, rebuilt here (`original_collect`): a new emulator
                       per episode, all 24 frames of an action rendered and each turned into a PIL image
  collect_1_worker     scripts/collect_data.py --workers 1 (subprocess, fixed step count, its own timer)
  collect_N_workers    the same with --workers N and N times the steps (the same work per worker)
  train_<preset>       world-model training frames/s: a step of train_rssm.py between logged steps on the
                       frames just collected (dataset.world_model_inputs: the batch, as tile ids made once
                       for a tiles model; forward without frame metrics, backward, grad clip, fused Adam),
                       in a process started the way train_rssm.py starts (checkpoint.keep_freed_memory);
                       for a tiles preset (default) where fused.cpp is built, in turns step by step with the same
                       step on torch's cross-entropy (train_<preset>_torch_loss_beside; ratio
                       train_<preset>_torch_loss_vs_plain, < 1 where fused.cpp's loss is faster)
  train_faithful_original   the ORIGINAL's training loop (`original_batch`, `original_forward`) on the same
                       faithful model (NCHW, the allocator untouched) in a process of its own, its steps
                       INTERLEAVED with train_faithful's (the two take turns, step by step)
  imagine_<preset>     latent steps/s of the prior alone (imagination.imagine, no decoding); where the greedy
                       rollout runs fused.cpp's loop (config fused: true), in turns with the same rollouts
                       in torch's loop (imagine_<preset>_torch_loop, ratio imagine_<preset>_fused_vs_torch_loop)
  imagine_original     a plain GRUCell + MLP step at the faithful sizes (`original_prior_step`), interleaved
                       with the first preset's rollouts
  env_steps_in_turns   env steps and the default preset's rollouts in one process, taking turns (chunks of
  imagine_default_in_turns  env steps, then a rollout; best of each): the imagined-per-emulator-step ratio
  imagine_default_matmuls_in_turns  the rollout's matrix products alone (`rollout_matmuls`), the third turn: the
                       most imagination could reach were its other work free (ratio
                       imagined_per_emulator_step_matmul_ceiling); with fused rollouts a fourth turn,
  imagine_default_torch_loop_in_turns  the rollouts in torch's loop (ratio imagined_per_emulator_step_torch_loop)
  decode_<preset>      decoded frames/s (imagination.decode); its config holds parameter counts and the
                       checkpoint size (what scripts/benchmark_rssm.py reported)
  --hot-paths adds: channels_last flipped (for presets but faithful in turns, step by step, with the
                       preset's own layout: train_<preset>_channels_last_<on|off>_beside), the step as
                       before session 10 (train_<preset>_every_step: tokenizing each batch, frame metrics
                       every step, multi-tensor Adam; in turns with train_<preset>_every_step_beside), torch.compile
                       (default preset), the other thread count (1 <-> 2) for the default preset (these two
                       NOT interleaved), and imagination with the default preset's GRU dense (gru_blocks 1,
                       imagine_default_dense_gru) and with its prior one linear layer of h (prior_layers 0,
                       imagine_default_linear_prior), both interleaved with imagine_default; differences
                       under ~20% in what is not interleaved are noise on a shared machine.
  --against REV adds imagine_default_at_REV: the default preset's rollouts with models.py as of git revision
                       REV (this tree's weights), in turns with imagine_default's (ratio imagine_default_vs_REV),
                       and train_default_at_REV: train_rssm.py's step of the default preset with that models.py,
                       step by step in turns with this tree's (train_default_at_REV_beside; ratio
                       train_default_vs_REV)
Ratios come from figures of the SAME run; absolute speeds depend on what else the machine runs.
Training results also carry minor_page_faults_per_step, imagination's minor_page_faults_per_rollout (medians;
allocator behaviour, not speed). Imagination runs with checkpoint.keep_freed_memory, as train_policy.py does.
Peak RSS = ru_maxrss of the measuring process (includes the interpreter and its imports; the RSS just
before the timed work is given as baseline_rss_mb); for the collector, the largest of its processes.
Writes --out (JSON, atomic) and prints a table.
"""
import argparse
import contextlib
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

import artifacts
import checkpoint
from dataset import CHUNK_FIELDS, PokemonDataset, chunk_name, world_model_inputs
from env import (ACTIONS, DEFAULT_ROM, PRESS_FRAMES, PokemonEnv, identify_rom, make_start_states, open_emulator,
                 parse_resolution)
from errors import UserError, cli
from game_state import read_state
from models import RSSM_PRESETS

REPO = Path(__file__).resolve().parents[1]

# sizes: the full run, and --quick (tiny sizes so that the whole run takes < 2 minutes)
FULL = dict(emu_steps=2000, episode_length=1000, save_interval=1000, resolution="144x160", batch_size=8, seq_len=15,
            train_steps={"faithful": 2, "default": 4, "pixels": 4}, imagine_batch=1024, horizon=15, repeats=10, decode_frames=32)
QUICK = dict(emu_steps=80, episode_length=40, save_interval=40, resolution="32x32", batch_size=2, seq_len=4,
             train_steps={"faithful": 1, "default": 1, "pixels": 1}, imagine_batch=64, horizon=4, repeats=1, decode_frames=4)
# --hot-paths: the default preset's imagination with these RSSMConfig fields changed, timed in turns with its own
IMAGINATION_VARIANTS = {"dense_gru": {"gru_blocks": 1}, "linear_prior": {"prior_layers": 0}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rom", type=Path, default=DEFAULT_ROM, help="ROM to step (default: the open cartridge)")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks.json"), help="JSON results (written atomically)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and durations (< 2 minutes)")
    p.add_argument("--workers", type=int, default=2, help="collector workers of the multi-worker measurement")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of the model measurements")
    p.add_argument("--emu-steps", type=int, default=None, help="env steps per emulator measurement (and per worker)")
    p.add_argument("--episode-length", type=int, default=None, help="steps per episode of the collectors")
    p.add_argument("--presets", nargs="+", default=["faithful", "default"],
                   choices=RSSM_PRESETS,
                   help="world-model presets to train, imagine and decode with")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps per preset (after 1 warm-up)")
    p.add_argument("--train-batch-size", type=int, default=None,
                   help="windows per timed training step (8 in the full run; make demo trains with 16)")
    p.add_argument("--train-precision", choices=("float32", "bfloat16", "auto"), default=None,
                   help="precision of the timed training steps but the original's (default: each preset's "
                        "train_precision; make demo trains with auto)")
    p.add_argument("--imagine-batch", type=int, default=None, help="imagination batch (1024 in the full run)")
    p.add_argument("--horizon", type=int, default=None, help="imagined steps per rollout (15 in the full run)")
    p.add_argument("--hot-paths", action="store_true",
                   help="also measure channels_last flipped, torch.compile, and 1 vs 2 torch threads")
    p.add_argument("--against", metavar="REV", default=None,
                   help="also time the default preset's imagination and training step with models.py as of git "
                        "revision REV (the same weights), in turns with this tree's: a hot-path change against the "
                        "code before it")
    args = p.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("emu_steps", "episode_length", "imagine_batch", "horizon"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if args.train_batch_size is not None:
        sizes["batch_size"] = args.train_batch_size
    if args.train_steps is not None:
        sizes["train_steps"] = {preset: args.train_steps for preset in sizes["train_steps"]}
    for key in ("emu_steps", "episode_length", "imagine_batch", "horizon"):
        if sizes[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} {sizes[key]} must be at least 1")
    for key in ("workers", "threads", "train_batch_size"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)} must be at least 1")
    if min(sizes["train_steps"].values()) < 1:
        raise UserError(f"--train-steps {args.train_steps} must be at least 1")
    if args.against and "default" not in args.presets:
        raise UserError("--against times the default preset's imagination and training: keep default in --presets")
    args.against_models = models_at(args.against) if args.against else None
    sizes["save_interval"] = min(sizes["save_interval"], sizes["emu_steps"])
    args.sizes = sizes
    return args


# --- running one measurement in its own process ---------------------------------------------
def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(send, function, kwargs):
    try:
        result = function(**kwargs)
        result.setdefault("peak_rss_mb", max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                             resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)
        send.send(("ok", result))
    except UserError as err:
        send.send(("user", str(err)))
    except BaseException:
        send.send(("error", traceback.format_exc()))


def isolated(function, **kwargs) -> dict:
    """Run function(**kwargs) -> dict in a forked process; the dict gains peak_rss_mb and seconds."""
    context = mp.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, function, kwargs))
    began = time.perf_counter()
    process.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"{function.__name__} died (exit code {process.exitcode}) without a result") from None
    process.join()
    if status == "user":
        raise UserError(payload)
    if status == "error":
        raise RuntimeError(f"{function.__name__} failed:\n{payload}")
    payload["seconds"] = time.perf_counter() - began
    return payload


def _torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch


# --- emulator and collection ------------------------------------------------------------------
def random_steps(env, rng, steps: int) -> None:
    """`steps` uniformly random env steps, resetting the env whenever an episode ends."""
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(int(rng.integers(len(ACTIONS))))
        if terminated or truncated:
            env.reset(seed=int(rng.integers(2**31)))


def random_env(rom, state_file, episode_length) -> tuple[PokemonEnv, np.random.Generator, dict]:
    """A reset PokemonEnv at native resolution for `random_steps`, its action generator, and its config."""
    env = PokemonEnv(rom=rom, save_states=[state_file], episode_length=episode_length)
    env.reset(seed=0)
    config = {"episode_length": episode_length, "resolution": "x".join(map(str, env.resolution)),
              "ticks_per_action": env.ticks_per_action, "policy": "random", "processes": 1}
    return env, np.random.default_rng(0), config


def measure_env_steps(rom, state_file, steps, episode_length) -> dict:
    """PokemonEnv at native resolution, uniformly random actions, resets every `episode_length`."""
    env, rng, config = random_env(rom, state_file, episode_length)
    baseline = _rss_mb()
    began = time.perf_counter()
    random_steps(env, rng, steps)
    seconds = time.perf_counter() - began
    env.close()
    return {"value": steps / seconds, "unit": "steps/s", "baseline_rss_mb": baseline,
            "config": {"steps": steps, **config}}


def original_collect(rom, state_file, steps, episode_length, save_interval, out_dir, seed=0) -> int:
    """The ORIGINAL's way of collecting, kept as the reference the collector is measured against
    (described in reference/seed-repository.md; written here from that description):
    a new PyBoy for every episode (loading the start state from its file), every one of the 24
    frames of an action rendered and converted through a PIL image, the rows kept in Python lists
    until `save_interval` steps are written with np.savez_compressed. Returns the chunks written."""
    from pyboy import PyBoy

    rng = np.random.default_rng(seed)
    rows = {key: [] for key in CHUNK_FIELDS}
    written, done = 0, 0

    def save():
        nonlocal written
        written += 1
        arrays = {key: np.array(values, dtype=CHUNK_FIELDS[key][0]) for key, values in rows.items()}
        np.savez_compressed(Path(out_dir) / chunk_name(written), **arrays)
        for values in rows.values():
            values.clear()

    while done < steps:
        pyboy = PyBoy(str(rom), window="null", sound_emulated=False)
        pyboy.set_emulation_speed(0)
        with open(state_file, "rb") as f:
            pyboy.load_state(f)
        pyboy.tick()
        frame = np.array(pyboy.screen.image.convert("RGB"))
        for t in range(min(episode_length, steps - done)):
            state = read_state(pyboy)
            action = int(rng.integers(len(ACTIONS)))
            button = ACTIONS[action]
            for tick in range(24):
                if button != "pass" and tick == 0:
                    pyboy.button_press(button)
                if button != "pass" and tick == PRESS_FRAMES:
                    pyboy.button_release(button)
                pyboy.tick()  # renders the frame
                next_frame = np.array(pyboy.screen.image.convert("RGB"))  # every frame through PIL
            for key, value in (("obs", frame), ("actions", action), ("rewards", 0.0), ("terminals", False),
                               ("episode_starts", t == 0), ("map_ids", state.map_id), ("xs", state.x),
                               ("ys", state.y), ("facings", state.facing), ("in_battles", state.in_battle),
                               ("dialog_opens", state.dialog_open), ("badges", state.badges),
                               ("party_hps", state.party_hps), ("party_max_hps", state.party_max_hps)):
                rows[key].append(value)
            frame = next_frame
            done += 1
            if len(rows["actions"]) == save_interval:
                save()
        pyboy.stop(save=False)
    if rows["actions"]:
        save()
    return written


def measure_original_collect(rom, state_file, steps, episode_length, save_interval) -> dict:
    baseline = _rss_mb()
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        original_collect(rom, state_file, steps, episode_length, save_interval, out)
        seconds = time.perf_counter() - began
    return {"value": steps / seconds, "unit": "steps/s", "baseline_rss_mb": baseline,
            "config": {"steps": steps, "episode_length": episode_length, "save_interval": save_interval,
                       "resolution": "144x160", "policy": "random", "processes": 1,
                       "way": "new emulator per episode, 24 rendered frames per action, PIL conversion of each"}}


def measure_collector(rom, state_file, steps, episode_length, save_interval, workers, resolution, out_dir) -> dict:
    """scripts/collect_data.py as a subprocess; the rate is its own (collection loop, workers included)."""
    command = [sys.executable, str(REPO / "scripts" / "collect_data.py"), "--rom", str(rom), "--out-dir", str(out_dir),
               "--total-steps", str(steps), "--episode-length", str(episode_length),
               "--save-interval", str(save_interval), "--workers", str(workers), "--policy", "random",
               "--resolution", resolution, "--save-state", str(state_file)]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode:
        raise RuntimeError(f"collect_data.py failed ({done.returncode}): {done.stderr[-2000:]}")
    match = re.search(r"done: (\d+) steps in ([\d.]+) s", done.stdout)
    if not match:
        raise RuntimeError(f"collect_data.py printed no rate: {done.stdout[-1000:]}")
    collected, seconds = int(match.group(1)), float(match.group(2))
    return {"value": collected / seconds, "unit": "steps/s", "per_worker": collected / seconds / workers,
            "wall_s_with_startup": wall,
            "config": {"steps": collected, "workers": workers, "episode_length": episode_length,
                       "save_interval": save_interval, "resolution": resolution, "policy": "random",
                       "command": " ".join(command[1:])}}


# --- world-model training -------------------------------------------------------------------
def _world_model(torch, preset, image_size, channels_last=None, frames=None, overrides=None):
    """A fresh model (`overrides`: RSSMConfig fields); a "tiles" model gets its codebook from `frames`
    (uint8 (N, H, W, 3)) or, without native Game Boy frames, random tiles (enough to time it)."""
    from models import RSSMConfig, WorldModel

    overrides = {**(overrides or {}), "image_size": tuple(image_size)}
    if channels_last is not None:
        overrides["channels_last"] = channels_last
    wm = WorldModel(RSSMConfig.from_preset(preset, **overrides))
    if wm.tiles is not None:
        try:
            fitted = frames is not None and bool(wm.tiles.fit(frames))
        except ValueError:  # not native Game Boy frames (--quick's 32x32)
            fitted = False
        if not fitted:
            with torch.no_grad():
                wm.tiles.tiles.random_(0, 4)
                wm.tiles.palette.copy_(torch.linspace(0, 1, 4)[:, None].expand(4, 3))
                wm.tiles.size.fill_(wm.tiles.vocab)
    return wm


def original_batch(torch, ds, starts):
    """The ORIGINAL's data path: every window turned into float32 on its own (Dataset.__getitem__),
    then stacked (the DataLoader's collate)."""
    items = []
    for s in starts:
        obs = ds.obs[s:s + ds.seq_len].astype(np.float32) / 255.0  # (T, H, W, 3) float per item
        items.append((torch.tensor(obs).permute(0, 3, 1, 2), torch.tensor(ds.arrays["actions"][s:s + ds.seq_len]).long(),
                      torch.tensor(ds.arrays["rewards"][s:s + ds.seq_len]),
                      torch.tensor(1.0 - ds.arrays["terminals"][s:s + ds.seq_len].astype(np.float32))))
    return [torch.stack(column) for column in zip(*items)]


def original_forward(torch, wm, frames, actions, rewards, continues):
    """The ORIGINAL's training forward at the faithful sizes: every per-step network inside the time
    loop (the posterior MLP on the concatenation [h, embedding], the prior MLP), then the same losses
    as WorldModel.forward (pixel MSE, balanced KL, reward MSE, continue BCE)."""
    import torch.nn.functional as F

    from models import kl_losses

    rssm, cfg = wm.rssm, wm.cfg
    embeds = wm.embed(frames)  # (B, T, E)
    post_weight = torch.cat([rssm.post_h_in.weight, rssm.post_embed_in.weight], 1)  # one Linear on [h, e]
    h, z = rssm.initial(frames.shape[0])
    hs, zs, posts, priors = [], [], [], []
    for t in range(frames.shape[1]):
        if t > 0:
            a = F.one_hot(actions[:, t - 1], cfg.num_actions).float()
            h = rssm.cell(rssm.img_in(torch.cat([z, a], -1)), h)
        prior = rssm.log_probs(rssm.prior_net(h))
        post = rssm.log_probs(rssm.post_net(F.linear(torch.cat([h, embeds[:, t]], -1), post_weight,
                                                     rssm.post_embed_in.bias)))
        z = rssm.sample(post, True)
        hs.append(h), zs.append(z), posts.append(post), priors.append(prior)
    feat = torch.cat([torch.stack(hs, 1), torch.stack(zs, 1)], -1)  # (B, T, F)
    pred = wm.frames_from_output(wm.decode_raw(feat))
    recon = F.mse_loss(pred, frames)
    dyn, rep, _ = kl_losses(torch.stack(posts, 1), torch.stack(priors, 1), cfg.free_nats)
    reward = wm.reward_head.loss(feat[:, 1:], rewards[:, :-1]).mean()
    cont = F.binary_cross_entropy_with_logits(wm.cont_head(feat[:, 1:]).squeeze(-1), continues[:, :-1])
    losses = {"recon": recon, "kl_dyn": dyn.mean(), "kl_rep": rep.mean(), "reward": reward, "cont": cont}
    return sum(wm.loss_weights[k] * v for k, v in losses.items())


def _training_way(conn, way, data_dir, preset, batch_size, seq_len, threads, channels_last, compile_model,
                  against_path=None, precision=None):
    """One way's training loop in its own process (measure_training's child): builds the data and the
    model, then times one whole step (data included) each time it is asked. "ours" starts the way
    train_rssm.py does (checkpoint.keep_freed_memory); "original" with the allocator untouched; "at_<REV>"
    as "ours" with the model of the models.py at `against_path` (this tree's weights)."""
    if way == "original":
        channels_last = False  # the original's layout
    else:
        checkpoint.keep_freed_memory()
        if way == "flipped":  # ours with the preset's memory format flipped
            channels_last = not _default_channels_last(preset)
    torch = _torch(threads)
    import fused

    try:  # bad input (the data, another models.py): measure_training raises it again, one line and exit 2
        ds = PokemonDataset(data_dir, seq_len=seq_len)
        wm = _world_model(torch, preset, ds.resolution, channels_last, frames=ds.obs)
        # as train_rssm.py: the preset's train_precision (or --train-precision) on this machine (the original's
        # loop: float32)
        precision = ("float32" if way == "original"
                     else checkpoint.train_precision(precision or wm.cfg.train_precision, "cpu"))
        if way.startswith("at_"):
            wm = _model_from_file(Path(against_path), preset, ds.resolution, wm)
    except UserError as err:
        conn.send(("user", str(err)))  # as _child reports it to isolated()
        return
    wm.train()
    model = torch.compile(wm) if compile_model else wm
    # as train_rssm.py between logged steps: tile ids made once, no frame metrics, fused Adam ("every_step":
    # tokens and frame metrics every step and the multi-tensor Adam, as train_rssm.py before session 10)
    lean = way in ("ours", "flipped", "torch_loss") or way.startswith("at_")
    tile_ids = wm.tiles.tokenize_uint8(ds.obs) if lean and wm.tiles is not None else None
    optimizer = torch.optim.Adam(wm.parameters(), lr=1e-4, fused=lean)
    rng = np.random.default_rng(0)  # the same windows in every way
    conn.send({"baseline_rss_mb": _rss_mb(), "parameters": sum(p.numel() for p in wm.parameters()),
               "resolution": "x".join(map(str, ds.resolution)), "channels_last": wm.cfg.channels_last,
               "windows": len(ds), "precision": precision,
               "fused_loss": way != "torch_loss" and wm.tiles is not None and fused.ready()})
    while conn.recv():
        starts = rng.choice(ds.window_starts, batch_size, replace=len(ds) < batch_size)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        began = time.perf_counter()
        if way == "original":
            frames, actions, rewards, continues = original_batch(torch, ds, starts)
            total = original_forward(torch, wm, frames, actions, rewards, continues)
            optimizer.zero_grad()
        else:
            inputs = world_model_inputs(ds, starts, "cpu", tile_ids, with_frames=not lean,
                                        place_keys=getattr(wm, "place_keys", ()))
            loss_ops = fused.off() if way == "torch_loss" else contextlib.nullcontext()  # picked in the forward
            with loss_ops, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                total, _, _, _ = model(**inputs, frame_metrics=not lean)
            optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(wm.parameters(), wm.cfg.grad_clip)
        optimizer.step()
        conn.send((time.perf_counter() - began, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def measure_training(data_dir, preset, batch_size, seq_len, steps, threads, ways=("ours",), channels_last=None,
                     compile_model=False, against_path=None, precision=None) -> dict:
    """Median seconds of one whole training step (data included) after one warm-up -> frames/s.
    Each way runs in its own forked process (its own allocator state and peak RSS); with
    ways=("ours", "original") the two take turns step by step, so that a change in the machine's load
    hits both alike; the result then carries the original's figure and peak RSS too."""
    context = mp.get_context("fork")
    children, info = {}, {}
    try:
        for way in ways:
            parent, child = context.Pipe()
            process = context.Process(target=_training_way, args=(child, way, data_dir, preset, batch_size, seq_len,
                                                                   threads, channels_last, compile_model, against_path,
                                                                   precision))
            process.start()
            child.close()
            children[way] = (process, parent)
            info[way] = parent.recv()
            if isinstance(info[way], tuple):  # ("user", message): _training_way refused its input
                raise UserError(info[way][1])
        timings, faults = {way: [] for way in ways}, {way: [] for way in ways}
        for i in range(steps + 1):
            for way in ways:
                children[way][1].send(True)
                seconds, step_faults = children[way][1].recv()
                if i:
                    timings[way].append(seconds), faults[way].append(step_faults)
        peaks = {}
        for way in ways:
            children[way][1].send(False)
            peaks[way] = children[way][1].recv()
    except EOFError:
        raise RuntimeError(f"a training process of {preset} died (out of memory?)") from None
    finally:
        for process, _ in children.values():
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    rate = {way: batch_size * seq_len / float(np.median(t)) for way, t in timings.items()}
    first = info[ways[0]]
    result = {"value": rate[ways[0]], "unit": "frames/s", "baseline_rss_mb": first["baseline_rss_mb"],
              "peak_rss_mb": peaks[ways[0]], "minor_page_faults_per_step": float(np.median(faults[ways[0]])),
              "config": {"preset": preset, "way": ways[0], "batch_size": batch_size, "seq_len": seq_len,
                         "resolution": first["resolution"], "timed_steps": steps, "threads": threads,
                         "channels_last": first["channels_last"], "torch_compile": compile_model,
                         "precision": first["precision"], "fused_loss": first["fused_loss"],
                         "allocator": "default" if ways[0] == "original" else "keep_freed_memory",
                         "parameters": first["parameters"], "data": "real collected frames",
                         "interleaved_with": list(ways[1:]), "process": "one per way"}}
    for way in ways[1:]:
        result[way] = rate[way]
        result[f"{way}_peak_rss_mb"] = peaks[way]
        result[f"{way}_minor_page_faults_per_step"] = float(np.median(faults[way]))
        result[f"{way}_fused_loss"] = info[way]["fused_loss"]
    return result


def paired(result: dict, way: str, note: str, **config) -> dict:
    """The second loop of an interleaved measurement as a result of its own (`config`: what differs)."""
    config = dict(result["config"], way=note, interleaved_with=[result["config"]["way"]], **config)
    if f"{way}_fused_loss" in result:  # a training way's own
        config["fused_loss"] = result.pop(f"{way}_fused_loss")
    peak = result.pop(f"{way}_peak_rss_mb", result["peak_rss_mb"])
    extra = {"minor_page_faults_per_step": result.pop(f"{way}_minor_page_faults_per_step")} \
        if f"{way}_minor_page_faults_per_step" in result else {}
    return {"value": result.pop(way), "unit": result["unit"], "peak_rss_mb": peak, **extra,
            "baseline_rss_mb": result["baseline_rss_mb"], "seconds": result["seconds"], "config": config}


# --- imagination and decoding ---------------------------------------------------------------
def original_prior_step(torch):
    """The ORIGINAL's prior step at its sizes: nn.GRUCell(1024 + 8 -> 512), an ELU MLP 512 -> 512 -> 32x32
    logits, a straight-through one-hot of the most likely class; run as plain modules with autograd on."""
    nn = torch.nn

    class OriginalPriorStep(nn.Module):
        def __init__(self, stoch=32, classes=32, deter=512, hidden=512, actions=8):
            super().__init__()
            self.stoch, self.classes, self.actions = stoch, classes, actions
            self.cell = nn.GRUCell(stoch * classes + actions, deter)
            self.prior = nn.Sequential(nn.Linear(deter, hidden), nn.ELU(), nn.Linear(hidden, stoch * classes))

        def forward(self, h, z, action):
            a = torch.nn.functional.one_hot(action, self.actions).float()
            h = self.cell(torch.cat([z, a], -1), h)
            probs = self.prior(h).view(-1, self.stoch, self.classes).softmax(-1)
            onehot = torch.nn.functional.one_hot(probs.argmax(-1), self.classes).float()
            return h, (onehot + probs - probs.detach()).flatten(1)

    return OriginalPriorStep()


def in_turns(loops: dict, repeats: int) -> tuple[float, dict, dict]:
    """Run each of `loops` (name -> function) once to warm up, then all of them in turns `repeats` times.
    -> (RSS in MB before the timed runs, name -> the fastest run's seconds, name -> median minor page faults
    per run)."""
    for loop in loops.values():
        loop()
    baseline = _rss_mb()
    best, faults = {name: math.inf for name in loops}, {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            began = time.perf_counter()
            loop()
            best[name] = min(best[name], time.perf_counter() - began)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return baseline, best, {name: float(np.median(counts)) for name, counts in faults.items()}


def models_at(rev: str) -> str:
    """The text of models.py as of git revision `rev` (UserError if git cannot show it)."""
    done = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:models.py"], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"--against {rev}: git cannot show models.py at that revision "
                        f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no output'}); "
                        "give a commit of this repository")
    return done.stdout


def _model_from_file(path: Path, preset, image_size, like):
    """The `preset` world model of the models.py at `path`, with the weights of `like` (UserError if they differ;
    `like`'s place heads are left out when that models.py has none or heads of other shapes (session 23's read h
    alone): they take no part in imagination, and the revision trains with its own, or without them)."""
    import importlib
    import importlib.util

    sys.modules.setdefault("fused_rollout", importlib.import_module("fused"))  # its name before session 22
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    other = module.WorldModel(module.RSSMConfig.from_preset(preset, image_size=tuple(image_size))).eval()
    try:
        state, own = like.state_dict(), other.state_dict()
        heads = [k for k in state if k.startswith("place_head.")]
        if any(k not in own or own[k].shape != state[k].shape for k in heads):  # none there, or of other shapes
            state = {k: v for k, v in state.items() if k not in heads}
            state.update({k: v for k, v in own.items() if k.startswith("place_head.")})
        other.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path.name}: its {preset} preset has other weights than this tree's "
                        f"({str(err).strip().splitlines()[-1].strip()}); compare against a revision with the same model") from None
    return other


def measure_imagination(preset, batch, horizon, repeats, threads, image_size, with_original=False,
                        overrides=None, variants=None, against=None, keep_memory=True) -> dict:
    """Best of `repeats` rollouts of `horizon` prior steps for `batch` starts -> latent steps/s.
    with_original: the original's step (`original_prior_step`) is timed in turns with ours; variants
    ({name: RSSMConfig fields}): so is the same preset with those fields changed (result key: the name);
    against ((name, path of another models.py)): so is that file's model with our weights (key: the name)."""
    import imagination

    if keep_memory:  # as train_policy.py: a rollout's (batch, horizon, features) output is re-allocated each
        checkpoint.keep_freed_memory()  # time; by default glibc maps it afresh and page-faults it in
    torch = _torch(threads)
    actions = torch.randint(0, len(ACTIONS), (batch, horizon))
    wm = _world_model(torch, preset, image_size, overrides=overrides).eval()  # image size: encoder/decoder only
    state = wm.rssm.initial(batch)
    rollouts = {"ours": lambda: imagination.imagine(wm, state, actions)}
    fused = _fused(torch, wm, state)
    if fused:  # the same rollout in torch's loop (fused.off), in turns with the compiled one
        rollouts["torch_loop"] = lambda: _torch_loop(wm, state, actions)
    if with_original:
        step = original_prior_step(torch)
        start = (torch.zeros(batch, 512), torch.zeros(batch, 1024))

        def original():
            h, z = start
            for t in range(horizon):
                h, z = step(h, z, actions[:, t])

        rollouts["original"] = original
    for name, fields in (variants or {}).items():
        other = _world_model(torch, preset, image_size, overrides={**(overrides or {}), **fields}).eval()
        rollouts[name] = lambda other=other: imagination.imagine(other, state, actions)
    if against:
        other = _model_from_file(Path(against[1]), preset, image_size, wm)
        rollouts[against[0]] = lambda: imagination.imagine(other, state, actions)
    baseline, best, faults = in_turns(rollouts, repeats)
    result = {"value": batch * horizon / best["ours"], "unit": "latent steps/s", "baseline_rss_mb": baseline,
              "minor_page_faults_per_rollout": faults["ours"],
              "config": {"preset": preset, "batch": batch, "horizon": horizon, "repeats": repeats, "threads": threads,
                         "allocator": "keep_freed_memory" if keep_memory else "default",
                         "deter": wm.cfg.deter, "gru_blocks": wm.cfg.gru_blocks, "prior_layers": wm.cfg.prior_layers,
                         "stoch": wm.cfg.stoch, "classes": wm.cfg.classes, "decoding": False, "fused": fused,
                         "way": "imagination.imagine (inference mode)",
                         "interleaved_with": [name for name in rollouts if name != "ours"]}}
    for name in rollouts:
        if name != "ours":
            result[name] = batch * horizon / best[name]
    return result


def _fused(torch, wm, state) -> bool:
    """Whether imagination.imagine's greedy rollouts of wm run fused.cpp's loop here."""
    import fused

    with torch.inference_mode():
        return fused.supported(wm.rssm, state[0])


def _torch_loop(wm, state, actions):
    """imagination.imagine with the greedy rollout in torch's loop (RSSM.greedy_rollout without fused.cpp)."""
    import fused
    import imagination

    with fused.off():
        return imagination.imagine(wm, state, actions)


def rollout_matmuls(torch, wm, batch: int, horizon: int):
    """A loop of only the matrix products `RSSM.greedy_rollout` runs for `horizon` steps of `batch` starts (the
    GRU's, the prior MLP's layers), with the model's weights at their shapes, into preallocated outputs, each input
    laid out as its product runs fastest: what a rollout would take if all its other work (the input table's sums,
    norms, gates, the most likely classes) cost nothing. -> (the loop, multiply-adds per latent step)."""
    cfg, rssm = wm.cfg, wm.rssm
    products = []
    h = torch.randn(batch, cfg.deter)
    if cfg.gru == "torch":  # the input half is a table lookup; h's half is one matrix product
        weight, bias = rssm.cell.weight_hh.detach(), rssm.cell.bias_hh.detach()
        out = torch.empty(batch, weight.shape[0])
        products.append(lambda weight=weight, bias=bias, out=out: torch.addmm(bias, h, weight.t(), out=out))
    elif cfg.gru_blocks == 1:
        weight = rssm.cell.linear.weight.detach()
        xh, out = torch.randn(batch, weight.shape[1]), torch.empty(batch, weight.shape[0])
        products.append(lambda weight=weight, xh=xh, out=out: torch.mm(xh, weight.t(), out=out))
    else:  # block-diagonal: (G, batch, k) x (G, k, 3 D / G)
        weight = rssm.cell.block_weight.detach()
        xh = torch.randn(weight.shape[0], batch, weight.shape[1])
        out = torch.empty(weight.shape[0], batch, weight.shape[2])
        products.append(lambda weight=weight, xh=xh, out=out: torch.bmm(xh, weight, out=out))
    macs = weight.numel()  # the GRU's, whichever branch set it
    x = h
    for layer in (m for m in rssm.prior_net if isinstance(m, torch.nn.Linear)):
        weight, bias, out = layer.weight.detach(), layer.bias.detach(), torch.empty(batch, layer.out_features)
        products.append(lambda x=x, weight=weight, bias=bias, out=out: torch.addmm(bias, x, weight.t(), out=out))
        macs += weight.numel()
        x = out

    def loop():
        for _ in range(horizon):
            for product in products:
                product()

    return loop, macs


def measure_dreaming(rom, state_file, steps, episode_length, preset, batch, horizon, repeats, threads,
                     image_size) -> dict:
    """The emulator and imagination in ONE process, taking turns `repeats` times: a chunk of
    steps / repeats random env steps, then one rollout as in measure_imagination, then the rollout's matrix
    products alone (`rollout_matmuls`). Each figure is the best turn's, so a slow patch of a shared machine cannot
    fall on one side of a ratio only. -> env steps/s (value), latent steps/s ("imagination") and the latent steps/s
    of the matrix products alone ("matmuls": the most the rollout could reach with all else free)."""
    import imagination

    checkpoint.keep_freed_memory()  # as measure_imagination
    torch = _torch(threads)
    env, rng, config = random_env(rom, state_file, episode_length)
    actions = torch.randint(0, len(ACTIONS), (batch, horizon))
    wm = _world_model(torch, preset, image_size).eval()
    state = wm.rssm.initial(batch)
    chunk = max(1, steps // repeats)
    matmuls, macs = rollout_matmuls(torch, wm, batch, horizon)
    turns = {"env": lambda: random_steps(env, rng, chunk), "imagination": lambda: imagination.imagine(wm, state, actions),
             "matmuls": matmuls}
    fused = _fused(torch, wm, state)
    if fused:
        turns["torch_loop"] = lambda: _torch_loop(wm, state, actions)
    baseline, best, faults = in_turns(turns, repeats)
    env.close()
    extra = {"torch_loop": batch * horizon / best["torch_loop"]} if fused else {}
    return {"value": chunk / best["env"], "unit": "steps/s", "baseline_rss_mb": baseline,
            "imagination": batch * horizon / best["imagination"], "imagination_faults": faults["imagination"],
            "matmuls": batch * horizon / best["matmuls"], "matmul_macs_per_step": macs, **extra,
            "config": {"steps": chunk * repeats, "chunks": repeats, **config,
                       "way": "PokemonEnv.step, best chunk", "allocator": "keep_freed_memory", "imagination": {
                           "preset": preset, "batch": batch, "horizon": horizon, "threads": threads,
                           "gru_blocks": wm.cfg.gru_blocks, "allocator": "keep_freed_memory", "fused": fused}}}


def measure_decoding(preset, frames, threads, image_size) -> dict:
    import imagination

    torch = _torch(threads)
    wm = _world_model(torch, preset, image_size).eval()
    feat = torch.randn(1, frames, wm.feat_dim)
    imagination.decode(wm, feat[:, :1])  # warm-up
    baseline = _rss_mb()
    began = time.perf_counter()
    imagination.decode(wm, feat)
    seconds = time.perf_counter() - began
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:  # the size of the model on disk (what benchmark_rssm.py reported)
        path = checkpoint.save_checkpoint(Path(tmp) / "wm.pt", kind="rssm", config=wm.cfg.to_dict(),
                                          model_state=wm.state_dict())
        file_mb = path.stat().st_size / 2**20
    return {"value": frames / seconds, "unit": "frames/s", "baseline_rss_mb": baseline,
            "config": {"preset": preset, "frames": frames, "resolution": "x".join(map(str, image_size)), "threads": threads,
                       "way": "imagination.decode, 64 frames per decoder call", "parameters": count(wm),
                       "encoder_parameters": count(wm.encoder), "decoder_parameters": count(wm.decoder),
                       "rssm_parameters": count(wm.rssm), "checkpoint_mb": file_mb}}


# --- the run ----------------------------------------------------------------------------------
def make_state_file(rom, folder: Path) -> Path:
    pyboy, info = open_emulator(rom)
    try:
        state = make_start_states(pyboy, info.game, count=1)[0]
    finally:
        pyboy.stop(save=False)
    path = folder / "start.state"
    path.write_bytes(state)
    return path


def ratio(numerator: dict, denominator: dict, target=None, note="") -> dict:
    value = numerator["value"] / denominator["value"]
    out = {"value": value, "note": note}
    if target is not None:
        out.update(target=target, meets_target=bool(value >= target))
    return out


def run(args) -> dict:
    s, threads = args.sizes, args.threads
    results, ratios = {}, {}

    def record(name, function, **kwargs):
        print(f"measuring {name} ...", flush=True)
        results[name] = isolated(function, **kwargs)
        r = results[name]
        print(f"  {r['value']:.4g} {r['unit']}  (peak RSS {r['peak_rss_mb']:.0f} MB, {r['seconds']:.1f} s)", flush=True)
        artifacts.write_json(args.out, {"partial": True, "results": results})  # a long run keeps what it measured

    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        tmp = Path(tmp)
        state_file = make_state_file(args.rom, tmp)
        emu = dict(rom=args.rom, state_file=state_file, episode_length=s["episode_length"])
        record("env_steps", measure_env_steps, steps=s["emu_steps"], **emu)
        record("collect_original", measure_original_collect, steps=s["emu_steps"], save_interval=s["save_interval"], **emu)
        # the collectors store frames at the training resolution (native, or --quick's small one): the
        # frames of the 1-worker run are the training data below
        data_dir = tmp / "one_worker"
        record("collect_1_worker", measure_collector, steps=s["emu_steps"], save_interval=s["save_interval"], workers=1,
               resolution=s["resolution"], out_dir=data_dir, **emu)
        record(f"collect_{args.workers}_workers", measure_collector, steps=s["emu_steps"] * args.workers,
               save_interval=s["save_interval"], workers=args.workers, resolution=s["resolution"],
               out_dir=tmp / "workers", **emu)
        train = dict(data_dir=data_dir, batch_size=s["batch_size"], seq_len=s["seq_len"], threads=threads,
                     precision=args.train_precision)
        against = None
        if args.against:
            path = tmp / f"models_at_{re.sub(r'[^A-Za-z0-9]', '_', args.against)}.py"
            path.write_text(args.against_models)
            against = (f"at_{args.against}", str(path))
        for preset in args.presets:
            faithful = preset == "faithful"
            record(f"train_{preset}", measure_training, preset=preset, steps=s["train_steps"].get(preset, 2),
                   ways=("ours", "original") if faithful else ("ours",), **train)
            if faithful:
                results["train_faithful_original"] = paired(
                    results["train_faithful"], "original",
                    "original: per-window float conversion, per-step networks in the time loop, zero_grad()",
                    allocator="default", channels_last=False)
            if preset == "default":  # fused.cpp's tile cross-entropy and torch's, step by step in turns
                name = "train_default_torch_loss"
                record(name, measure_training, preset=preset, steps=2 * s["train_steps"]["default"],
                       ways=("torch_loss", "ours"), **train)
                results[f"{name}_beside"] = paired(results[name], "ours", f"train_rssm.py's step, in turns with {name}")
            if against and preset == "default":  # REV's model and this tree's, step by step in turns
                name = f"train_default_{against[0]}"
                record(name, measure_training, preset=preset, steps=2 * s["train_steps"]["default"],
                       ways=(against[0], "ours"), against_path=against[1], **train)
                results[name]["config"]["way"] = f"train_rssm.py's step with models.py as of {args.against}"
                results[f"{name}_beside"] = paired(results[name], "ours", f"train_rssm.py's step, in turns with {name}")
        image_size = parse_resolution(s["resolution"])
        imag = dict(batch=s["imagine_batch"], horizon=s["horizon"], repeats=s["repeats"], threads=threads,
                    image_size=image_size)
        for index, preset in enumerate(args.presets):
            variants = IMAGINATION_VARIANTS if args.hot_paths and preset == "default" else None
            record(f"imagine_{preset}", measure_imagination, preset=preset, with_original=index == 0,
                   variants=variants, against=against if preset == "default" else None, **imag)
            if "torch_loop" in results[f"imagine_{preset}"]:
                results[f"imagine_{preset}_torch_loop"] = paired(
                    results[f"imagine_{preset}"], "torch_loop", "imagination.imagine in torch's loop "
                    "(fused.off)", fused=False)
            if index == 0:
                results["imagine_original"] = paired(
                    results[f"imagine_{preset}"], "original",
                    "original: plain GRUCell + ELU MLP at the faithful sizes, autograd on")
            for name, fields in (variants or {}).items():
                results[f"imagine_default_{name}"] = paired(results["imagine_default"], name,
                                                            f"the default preset with {name}", **fields)
            if against and preset == "default":
                results[f"imagine_default_{against[0]}"] = paired(
                    results["imagine_default"], against[0], f"models.py as of {args.against}, the same weights")
        dreamer = "default" if "default" in args.presets else args.presets[0]
        record("env_steps_in_turns", measure_dreaming, steps=s["emu_steps"], preset=dreamer, **emu, **imag)
        turns = results["env_steps_in_turns"]
        torch_turn = ["imagination.imagine in torch's loop"] if "torch_loop" in turns else []  # the fourth turn
        results[f"imagine_{dreamer}_in_turns"] = {
            "value": turns.pop("imagination"), "unit": "latent steps/s", "peak_rss_mb": turns["peak_rss_mb"],
            "minor_page_faults_per_rollout": turns.pop("imagination_faults"),
            "baseline_rss_mb": turns["baseline_rss_mb"], "seconds": turns["seconds"],
            "config": dict(turns["config"]["imagination"], way="imagination.imagine (inference mode), best "
                           "rollout", interleaved_with=[turns["config"]["way"], "rollout_matmuls", *torch_turn])}
        if "torch_loop" in turns:
            results[f"imagine_{dreamer}_torch_loop_in_turns"] = {
                "value": turns.pop("torch_loop"), "unit": "latent steps/s", "peak_rss_mb": turns["peak_rss_mb"],
                "baseline_rss_mb": turns["baseline_rss_mb"], "seconds": turns["seconds"],
                "config": dict(turns["config"]["imagination"], fused=False, way="imagination.imagine in torch's loop "
                               "(fused.off), best rollout", interleaved_with=[
                                   turns["config"]["way"], "imagination.imagine (inference mode)", "rollout_matmuls"])}
        rate, macs = turns.pop("matmuls"), turns.pop("matmul_macs_per_step")
        results[f"imagine_{dreamer}_matmuls_in_turns"] = {
            "value": rate, "unit": "latent steps/s", "peak_rss_mb": turns["peak_rss_mb"],
            "baseline_rss_mb": turns["baseline_rss_mb"], "seconds": turns["seconds"],
            "config": dict(turns["config"].pop("imagination"), way="rollout_matmuls: the rollout's matrix products "
                           "alone, best loop", multiply_adds_per_step=macs, gmac_per_s=rate * macs / 1e9,
                           interleaved_with=[turns["config"]["way"], "imagination.imagine (inference mode)", *torch_turn])}
        for preset in args.presets:
            record(f"decode_{preset}", measure_decoding, preset=preset, frames=s["decode_frames"], threads=threads,
                   image_size=image_size)
        if args.hot_paths:
            for preset in args.presets:
                steps = s["train_steps"].get(preset, 2)
                flipped = not _default_channels_last(preset)
                name = f"train_{preset}_channels_last_{'on' if flipped else 'off'}"
                if preset == "faithful":  # minutes per step: not again beside the plain one
                    record(name, measure_training, preset=preset, steps=steps, channels_last=flipped, **train)
                else:  # in turns, step by step, with the preset's own layout in a process of its own
                    record(name, measure_training, preset=preset, steps=2 * steps, ways=("flipped", "ours"), **train)
                    results[f"{name}_beside"] = paired(results[name], "ours", f"the preset's own layout, in turns with "
                                                       f"{name}", channels_last=not flipped)
                if preset != "faithful":  # a faithful step takes minutes on this machine: one variant only
                    name = f"train_{preset}_every_step"  # tokens, frame metrics and unfused Adam every step
                    record(name, measure_training, preset=preset, steps=2 * steps, ways=("every_step", "ours"), **train)
                    results[f"{name}_beside"] = paired(results[name], "ours", f"train_rssm.py's step, in turns with {name}")
                    other = 2 if threads == 1 else 1
                    record(f"train_{preset}_{other}_threads", measure_training, preset=preset, steps=steps,
                           **dict(train, threads=other))
            if "default" in args.presets:
                try:
                    record("train_default_compiled", measure_training, preset="default",
                           steps=s["train_steps"]["default"] + 2, compile_model=True, **train)
                except RuntimeError as err:  # torch.compile needs a working C++ toolchain on CPU
                    print(f"  torch.compile failed, not measured: {str(err).splitlines()[-1]}", flush=True)

    workers = results[f"collect_{args.workers}_workers"]
    ratios["collector_vs_original_per_worker"] = ratio(results["collect_1_worker"], results["collect_original"], 3.0,
                                                       "collect_data.py --workers 1 / the original's loop")
    ratios[f"workers_{args.workers}_vs_1"] = ratio(workers, results["collect_1_worker"],
                                                   1.7 if args.workers == 2 else None,
                                                   "needs as many free cores as workers")
    ratios["env_vs_original_collect"] = ratio(results["env_steps"], results["collect_original"], None,
                                              "PokemonEnv.step alone / the original's loop")
    if "faithful" in args.presets:
        ratios["train_faithful_vs_original"] = ratio(results["train_faithful"], results["train_faithful_original"],
                                                     1.25, "whole training step, data included")
        ratios["imagine_faithful_vs_original"] = ratio(results["imagine_faithful"], results["imagine_original"])
    for preset in args.presets:
        if preset != "faithful":
            ratios[f"imagine_{preset}_vs_original"] = ratio(results[f"imagine_{preset}"], results["imagine_original"],
                                                            3.0 if preset == "default" else None)
            if "faithful" in args.presets:
                ratios[f"train_{preset}_vs_faithful"] = ratio(results[f"train_{preset}"], results["train_faithful"],
                                                              10.0 if preset == "default" else None)
    for preset in args.presets:
        if f"imagine_{preset}_torch_loop" in results:
            ratios[f"imagine_{preset}_fused_vs_torch_loop"] = ratio(
                results[f"imagine_{preset}"], results[f"imagine_{preset}_torch_loop"], None,
                "fused.cpp's greedy rollout / the same in torch's loop, in turns")
    for name in IMAGINATION_VARIANTS:
        if f"imagine_default_{name}" in results:
            ratios[f"imagine_default_vs_{name}"] = ratio(results["imagine_default"], results[f"imagine_default_{name}"],
                                                         None, f"the default preset / the same model with {name}")
    if args.against and f"imagine_default_at_{args.against}" in results:
        ratios[f"imagine_default_vs_{args.against}"] = ratio(
            results["imagine_default"], results[f"imagine_default_at_{args.against}"], None,
            f"this tree's imagination / models.py as of {args.against}, in turns")
        ratios[f"train_default_vs_{args.against}"] = ratio(
            results[f"train_default_at_{args.against}_beside"], results[f"train_default_at_{args.against}"], None,
            f"this tree's training step / models.py as of {args.against}, in turns step by step")
    best = "default" if "default" in args.presets else args.presets[0]
    ratios["imagined_per_emulator_step"] = ratio(results[f"imagine_{best}_in_turns"], results["env_steps_in_turns"],
                                                 200.0, f"imagine_{best}_in_turns / env_steps_in_turns (one process, "
                                                        "taking turns)")
    ratios["imagined_per_emulator_step_matmul_ceiling"] = ratio(
        results[f"imagine_{best}_matmuls_in_turns"], results["env_steps_in_turns"], None,
        f"imagine_{best}_matmuls_in_turns / env_steps_in_turns: the ratio if everything in a rollout but its matrix "
        "products were free")
    if f"imagine_{best}_torch_loop_in_turns" in results:
        ratios["imagined_per_emulator_step_torch_loop"] = ratio(
            results[f"imagine_{best}_torch_loop_in_turns"], results["env_steps_in_turns"], None,
            f"imagine_{best}_torch_loop_in_turns / env_steps_in_turns: the ratio without fused.cpp")
    ratios["imagined_per_emulator_step_apart"] = ratio(results[f"imagine_{best}"], results["env_steps"], None,
                                                       f"imagine_{best} / env_steps (measured minutes apart)")
    ratios["imagined_per_emulator_step_per_core"] = {
        "value": ratios["imagined_per_emulator_step"]["value"] / threads,
        "note": f"imagination uses {threads} torch threads, the emulator 1 core"}
    for name, r in results.items():  # each training variant against the plain way: the one timed beside it if any
        if not name.startswith("train_") or name.count("_") < 2 or name.endswith(("_original", "_beside")) \
                or (args.against and name.startswith(f"train_default_at_{args.against}")):
            continue
        plain = f"{name}_beside" if f"{name}_beside" in results else f"train_{r['config']['preset']}"
        if plain in results:
            note = " (in turns, step by step)" if plain.endswith("_beside") else ""
            ratios[f"{name}_vs_plain"] = ratio(r, results[plain], None, "> 1: this variant helps" + note)
    return {"results": results, "ratios": ratios}


def _default_channels_last(preset: str) -> bool:
    from models import RSSMConfig

    return RSSMConfig.from_preset(preset).channels_last


def environment() -> dict:
    import pyboy

    return {"python": platform.python_version(), "pyboy": getattr(pyboy, "__version__", "?"),
            "cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
            "machine": platform.machine(), "note": "ratios are within this run; absolute speeds depend on the load"}


def print_table(report: dict) -> None:
    print(f"\n{'measurement':38s} {'figure':>12s} {'unit':16s} {'peak RSS':>9s}  configuration")
    for name, r in report["results"].items():
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k != "command")
        print(f"{name:38s} {r['value']:12.4g} {r['unit']:16s} {r['peak_rss_mb']:7.0f}MB  {config}")
    print(f"\n{'ratio':38s} {'value':>12s}  target")
    for name, r in report["ratios"].items():
        target = f">= {r['target']} ({'met' if r['meets_target'] else 'NOT met'})" if "target" in r else ""
        print(f"{name:38s} {r['value']:12.3g}  {target}  {r.get('note', '')}")


@cli
def main(argv=None):
    args = parse_args(argv)
    identify_rom(args.rom)
    began, load = time.time(), list(os.getloadavg())
    import torch  # imported once here, used only in the forked measurements (no thread pool exists yet)

    report = run(args)

    report["partial"] = False
    report["config"] = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k != "against_models"},
                        "torch": torch.__version__, **environment(), "load_average_at_start": load,
                        "total_seconds": time.time() - began}
    print_table(report)
    artifacts.write_json(args.out, report)
    print(f"\nwrote {args.out} ({report['config']['total_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
