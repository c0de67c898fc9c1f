"""Train the v1 RAM probe on frozen VAE latents: tile (x, y), map id, in-battle, dialog, party HP.

    python scripts/train_probe.py --data-dir data/v1 --vae-checkpoint checkpoints/vae_v1/best_vae.pt

Writes best_probe.pt (lowest validation loss), probe_latest.pt (pass it to --resume),
metrics.json / metrics.jsonl, loss_curves.png and config.json to --out-dir. The tile error is the
Manhattan distance |x - x'| + |y - y'| in tiles between the probe's (x, y) and RAM's.
"""
import argparse
import math
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
from models import ProbeConfig, RamProbe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data", help="folder of transitions_NNNN.npz chunks (the VAE's data)")
    p.add_argument("--vae-checkpoint", default="checkpoints/vae_v1/best_vae.pt", help="frozen VAE whose latent means the probe reads")
    p.add_argument("--epochs", type=int, default=40, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="latents per batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate at the start; cosine-annealed to 1%% of it by the last epoch")
    p.add_argument("--hidden", type=int, default=256, help="width of the probe's shared MLP")
    p.add_argument("--out-dir", default="checkpoints/probe_v1", help="where checkpoints, metrics and plots go")
    p.add_argument("--val-split", type=float, default=0.1, help="fraction of episodes held out for validation")
    p.add_argument("--seq-len", type=int, default=30, help="dynamics window length the episode split is made on (keep equal across v1 stages)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and shuffling")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N chunks")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--resume", default=None, help="probe_latest.pt (or any probe checkpoint of this run) to continue from")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.hidden < 1:
        raise UserError("--epochs, --batch-size, --hidden must be >= 1 and --lr > 0")
    args.device = resolve_device(args.device)
    return args


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine from `base` at epoch 0 down to base / 100 at the last epoch."""
    return base / 100 + (base - base / 100) * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs - 1, 1)))


def probe_targets(data, rows, device) -> dict:
    return {k: v.to(device) for k, v in RamProbe.targets(data.row_batch(rows)).items()}


@torch.no_grad()
def evaluate(model, latents, targets, batch_size=4096) -> dict:
    """Mean losses and metrics over a whole split."""
    model.eval()
    n, sums = len(latents), {}
    for i in range(0, n, batch_size):
        z = latents[i:i + batch_size]
        part = {k: v[i:i + batch_size] for k, v in targets.items()}
        total, losses = model.loss(z, part)
        stats = {"loss": total.item() * len(z), **{f"loss_{k}": v * len(z) for k, v in losses.items()},
                 **RamProbe.metrics(model(z), part)}
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
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
    train_z, val_z = table.rows(data.train_rows), table.rows(data.val_rows)  # (N, D)
    train_t, val_t = probe_targets(data, data.train_rows, args.device), probe_targets(data, data.val_rows, args.device)

    config = ProbeConfig(latent_dim=vae.config.latent_dim, hidden=args.hidden)
    model = RamProbe(config).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start_epoch, best_val, history = resume_training(args.resume, "probe", config, model, optimizer)
    log = RunLog(out_dir, history)
    write_json(out_dir / "config.json", {"args": vars(args), "model": asdict(config),
                                         "train_frames": len(train_z), "val_frames": len(val_z)})

    for epoch in range(start_epoch, args.epochs):
        lr = cosine_lr(args.lr, epoch, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        order = torch.from_numpy(np.random.default_rng(args.seed + epoch).permutation(len(train_z))).to(args.device)
        start, total = time.time(), 0.0
        with tqdm(total=len(order), desc=f"epoch {epoch + 1}/{args.epochs}", unit="latent", unit_scale=True, leave=False) as bar:
            for i in range(0, len(order), args.batch_size):
                idx = order[i:i + args.batch_size]
                loss, _ = model.loss(train_z[idx], {k: v[idx] for k, v in train_t.items()})
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                bar.update(len(idx))
        elapsed = time.time() - start
        train = evaluate(model, train_z, train_t)
        val = evaluate(model, val_z, val_t)
        log.record({
            "epoch": epoch + 1, "lr": lr, "loss/train": total / len(order), "loss/val": val["loss"],
            **{f"loss/val_{k[5:]}": v for k, v in val.items() if k.startswith("loss_")},
            "eval/train_tile_error": train["tile_error"], "eval/val_tile_error": val["tile_error"],
            "eval/val_tile_error_rounded": val["tile_error_rounded"], "eval/val_exact_tile": val["exact_tile"],
            "eval/train_map_acc": train["map_acc"], "eval/val_map_acc": val["map_acc"],
            "eval/val_battle_acc": val["battle_acc"], "eval/val_dialog_acc": val["dialog_acc"],
            "eval/val_hp_abs_error": val["hp_abs_error"],
            "perf/latents_per_s": len(order) / max(elapsed, 1e-9),
        })
        is_best = val["loss"] < best_val
        best_val = min(best_val, val["loss"])
        extra = {"best_val": best_val, "history": log.history, "vae_checkpoint": str(args.vae_checkpoint),
                 "data_dir": str(args.data_dir), "seed": args.seed, "val_split": args.val_split, "seq_len": args.seq_len}
        state = dict(kind="probe", config=asdict(config), model_state=model.state_dict(), step=epoch + 1, extra=extra)
        save_checkpoint(out_dir / "probe_latest.pt", optimizer_state=optimizer.state_dict(), **state)
        if is_best:
            save_checkpoint(out_dir / "best_probe.pt", **state)
        log.plot([["loss/train", "loss/val"], ["eval/train_tile_error", "eval/val_tile_error", "eval/val_tile_error_rounded"],
                  ["eval/train_map_acc", "eval/val_map_acc"]], title="v1 RAM probe")
    best = min(log.history, key=lambda rec: rec["loss/val"])
    print(f"best epoch {best['epoch']}: val tile error {best['eval/val_tile_error']:.3f} tiles, "
          f"map accuracy {100 * best['eval/val_map_acc']:.2f}%; checkpoint {out_dir / 'best_probe.pt'}")


if __name__ == "__main__":
    main()
