"""Train the v1 latent dynamics (GRU over frozen VAE latents) with scheduled sampling.

    python scripts/train_dynamics.py --data-dir data/v1 --vae-checkpoint checkpoints/vae_v1/best_vae.pt
    python scripts/train_dynamics.py ... --no-scheduled-sampling --out-dir checkpoints/dynamics_v1_tf  # ablation

The teacher-forcing ratio (chance that a step's input is the true latent rather than the model's
own prediction) decays linearly from 1.0 at the first epoch to --min-teacher-forcing at epoch
--decay-epochs and stays there; --no-scheduled-sampling keeps it at 1.0. The best checkpoint
(best_dynamics.pt) has the lowest autoregressive validation loss: latent MSE + --reward-scale x
reward MSE of an open-loop rollout from the first latent of each held-out window. dynamics_latest.pt is for --resume.

Beyond the original: --probe-checkpoint with --probe-scale > 0 adds a frozen RAM probe's reading
of every predicted latent to the loss (position MSE + map cross-entropy against RAM), and with a
probe given the log reports the open-loop validation tile error of every epoch; the best
checkpoint's validation loss then includes the probe term, as weighted in training.
"""
import argparse
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from artifacts import RunLog, write_json
from checkpoint import resolve_device, save_checkpoint
from errors import UserError, cli
from latents import LatentTable, load_network, load_v1_data, resume_training
from models import DynamicsConfig, LatentDynamics


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data", help="folder of transitions_NNNN.npz chunks (the VAE's data)")
    p.add_argument("--vae-checkpoint", default="checkpoints/vae_v1/best_vae.pt", help="frozen VAE whose latent means are modelled")
    p.add_argument("--epochs", type=int, default=20, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=30, help="steps per training sequence")
    p.add_argument("--window-stride", type=int, default=1,
                   help="train on every N-th window per epoch (shifted each epoch) and validate on every N-th held-out window; "
                        "windows overlap by seq-len - 1 steps, so N > 1 mostly drops repeats")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--hidden", type=int, default=256, help="GRU hidden size")
    p.add_argument("--reward-scale", type=float, default=1.0, help="weight of the reward MSE next to the latent MSE")
    p.add_argument("--grad-clip", type=float, default=10.0, help="gradient-norm clip (0: none)")
    p.add_argument("--min-teacher-forcing", type=float, default=0.2, help="teacher-forcing ratio reached at --decay-epochs")
    p.add_argument("--decay-epochs", type=int, default=15, help="epochs over which the ratio decays linearly from 1.0")
    p.add_argument("--no-scheduled-sampling", action="store_true", help="keep the ratio at 1.0 (pure teacher forcing: the ablation)")
    p.add_argument("--probe-checkpoint", default=None,
                   help="frozen RAM probe of the same VAE: validation tile error every epoch, and the probe loss with --probe-scale")
    p.add_argument("--probe-scale", type=float, default=0.0,
                   help="weight of the probe's position + map error on predicted latents (0: the original's loss)")
    p.add_argument("--init-from-latent", action="store_true",
                   help="ours: start the GRU state from z_0 through a learned layer (the original starts from zeros)")
    p.add_argument("--state-scale", type=float, default=0.0,
                   help="ours: weight of RAM heads on the GRU state (tile, map, facing after each action); 0: none")
    p.add_argument("--out-dir", default="checkpoints/dynamics_v1", help="where checkpoints, metrics and plots go")
    p.add_argument("--val-split", type=float, default=0.1, help="fraction of episodes held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation, shuffling and sampling")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N chunks")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--resume", default=None, help="dynamics_latest.pt (or any dynamics checkpoint of this run) to continue from")
    args = p.parse_args(argv)
    if min(args.epochs, args.batch_size, args.hidden, args.decay_epochs, args.window_stride) < 1 or args.lr <= 0:
        raise UserError("--epochs, --batch-size, --hidden, --decay-epochs must be >= 1 and --lr > 0")
    if args.probe_scale < 0 or (args.probe_scale > 0 and not args.probe_checkpoint):
        raise UserError("--probe-scale must be >= 0, and > 0 needs --probe-checkpoint")
    if args.state_scale < 0:
        raise UserError(f"--state-scale {args.state_scale} must be >= 0")
    if not 0.0 <= args.min_teacher_forcing <= 1.0:
        raise UserError(f"--min-teacher-forcing {args.min_teacher_forcing} must be in [0, 1]")
    args.device = resolve_device(args.device)
    return args


def teacher_forcing_ratio(epoch: int, min_ratio: float, decay_epochs: int, scheduled: bool) -> float:
    """Epoch 0 -> 1.0, linearly down to `min_ratio` at `decay_epochs`, constant after."""
    if not scheduled:
        return 1.0
    return max(min_ratio, 1.0 - (1.0 - min_ratio) * epoch / decay_epochs)


@torch.no_grad()
def evaluate(model, table, starts, seq_len, fields, teacher_forcing, probe=None, batch_size=512) -> dict:
    """Mean losses over windows (and, with a probe, the mean Manhattan tile error of the
    probe's reading of every predicted latent; the total is the weighted training loss)."""
    model.eval()
    sums, n = {}, 0
    for i in range(0, len(starts), batch_size):
        z = table.windows(starts[i:i + batch_size], seq_len)  # (B, T, D)
        part = {k: v[i:i + batch_size] for k, v in fields.items()}
        states = [] if model.config.state_scale > 0 else None
        pred, pred_r = model.unroll(z, part["actions"], teacher_forcing, states=states)  # (B, T-1, D), (B, T-1)
        total, parts = model.loss_of(pred, pred_r, z, part["rewards"], probe, part, states)
        parts["total"] = total.item()
        if probe is not None:
            xy = probe(pred.reshape(-1, pred.shape[-1]))["xy"]  # (B*(T-1), 2)
            parts["tile_error"] = (xy - part["xy"][:, 1:].reshape(-1, 2)).abs().sum(-1).mean().item()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * len(z)
        n += len(z)
    return {k: v / n for k, v in sums.items()}


@cli
def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    torch.manual_seed(args.seed)
    vae = load_network(args.vae_checkpoint, "vae", args.device)
    data = load_v1_data(args.data_dir, args.seq_len, args.val_split, args.seed, args.max_files)
    print(f"encoding {len(data.train_rows) + len(data.val_rows)} frames with {args.vae_checkpoint}")
    table = LatentTable(vae, data, args.device)

    def window_fields(starts):
        """Actions and rewards (N, T), RAM tile (x, y) (N, T, 2), map id and facing (0..3) (N, T) of windows."""
        batch = data.seqs.get_batch(starts, keys=("actions", "rewards", "map_ids", "xs", "ys", "facings"))  # no frames
        fields = {"actions": batch["actions"], "rewards": batch["rewards"], "map_id": batch["map_ids"],
                  "xy": torch.stack([batch["xs"], batch["ys"]], -1).float(), "facing": batch["facings"] // 4}
        return {k: v.to(args.device) for k, v in fields.items()}

    train_fields = window_fields(data.train_starts)
    val_starts = data.val_starts[::args.window_stride]
    val_fields = window_fields(val_starts)
    probe = None
    if args.probe_checkpoint:
        probe = load_network(args.probe_checkpoint, "probe", args.device).requires_grad_(False)
        if probe.config.latent_dim != vae.config.latent_dim:
            raise UserError(f"--probe-checkpoint reads {probe.config.latent_dim}-d latents, the VAE makes "
                            f"{vae.config.latent_dim}-d ones; pass the probe trained on this VAE")

    config = DynamicsConfig(latent_dim=vae.config.latent_dim, hidden=args.hidden, reward_scale=args.reward_scale,
                            probe_scale=args.probe_scale, init_from_latent=args.init_from_latent,
                            state_scale=args.state_scale)
    model = LatentDynamics(config).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start_epoch, best_val, history = resume_training(args.resume, "dynamics", config, model, optimizer)
    log = RunLog(out_dir, history)
    write_json(out_dir / "config.json", {"args": vars(args), "model": asdict(config),
                                         "train_windows": len(data.train_starts), "val_windows": len(val_starts)})
    print(f"dynamics {sum(p.numel() for p in model.parameters()):,} parameters; {len(data.train_starts)} training / "
          f"{len(val_starts)} validation windows of {args.seq_len}; device {args.device}")

    for epoch in range(start_epoch, args.epochs):
        ratio = teacher_forcing_ratio(epoch, args.min_teacher_forcing, args.decay_epochs, not args.no_scheduled_sampling)
        model.train()
        torch.manual_seed(args.seed * 1000 + epoch)  # the scheduled-sampling coin flips; reproducible on resume
        offset = epoch % args.window_stride
        order = np.random.default_rng(args.seed + epoch).permutation(len(data.train_starts))
        order = order[(data.train_starts[order] - data.train_starts[0]) % args.window_stride == offset]
        sums, start = {}, time.time()
        with tqdm(total=len(order), desc=f"epoch {epoch + 1}/{args.epochs} tf={ratio:.2f}", unit="seq", leave=False) as bar:
            for i in range(0, len(order), args.batch_size):
                idx = order[i:i + args.batch_size]
                z = table.windows(data.train_starts[idx], args.seq_len)  # (B, T, D)
                fields = {k: v[idx] for k, v in train_fields.items()}
                loss, parts = model.loss(z, fields["actions"], fields["rewards"], ratio, probe, fields)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v * len(idx)
                bar.update(len(idx))
                bar.set_postfix(latent=f"{parts['latent']:.4f}")
        elapsed = time.time() - start
        val_ar = evaluate(model, table, val_starts, args.seq_len, val_fields, 0.0, probe)
        val_tf = evaluate(model, table, val_starts, args.seq_len, val_fields, 1.0, probe)
        record = {"epoch": epoch + 1, "teacher_forcing": ratio,
                  **{f"loss/train_{k}": v / len(order) for k, v in sums.items()},
                  **{f"loss/val_ar_{k}": v for k, v in val_ar.items() if k != "tile_error"},
                  **{f"loss/val_tf_{k}": v for k, v in val_tf.items() if k != "tile_error"},
                  "perf/steps_per_s": len(order) * (args.seq_len - 1) / max(elapsed, 1e-9)}
        if probe is not None:
            record.update({"eval/val_ar_tile_error": val_ar["tile_error"], "eval/val_tf_tile_error": val_tf["tile_error"]})
        log.record(record)
        is_best = val_ar["total"] < best_val
        best_val = min(best_val, val_ar["total"])
        extra = {"best_val": best_val, "history": log.history, "vae_checkpoint": str(args.vae_checkpoint),
                 "scheduled_sampling": not args.no_scheduled_sampling, "data_dir": str(args.data_dir),
                 "probe_checkpoint": args.probe_checkpoint,
                 "seed": args.seed, "val_split": args.val_split, "seq_len": args.seq_len}
        state = dict(kind="dynamics", config=asdict(config), model_state=model.state_dict(), step=epoch + 1, extra=extra)
        save_checkpoint(out_dir / "dynamics_latest.pt", optimizer_state=optimizer.state_dict(), **state)
        if is_best:
            save_checkpoint(out_dir / "best_dynamics.pt", **state)
        panels = [["loss/train_latent", "loss/val_ar_latent", "loss/val_tf_latent"], ["loss/train_reward", "loss/val_ar_reward"],
                  ["teacher_forcing"]]
        if probe is not None:
            panels.insert(2, ["eval/val_ar_tile_error", "eval/val_tf_tile_error"])
        log.plot(panels, title="v1 latent dynamics" + (" (teacher forcing)" if args.no_scheduled_sampling else ""))
    print(f"best autoregressive validation loss {best_val:.5f}; checkpoint {out_dir / 'best_dynamics.pt'}")


if __name__ == "__main__":
    main()
