"""Train the v1 VAE (latent 32) on small frames: loss = BCE(sum) + beta * KL.

    python scripts/train_vae.py --data-dir data/v1 --out-dir checkpoints/vae_v1

Writes best_vae.pt (lowest validation loss), vae_latest.pt (every epoch; pass it to --resume),
metrics.json / metrics.jsonl, loss_curves.png, reconstruction.png and config.json to --out-dir.
Validation holds out whole episodes (the same ones every v1 stage holds out).
"""
import argparse
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from artifacts import RunLog, save_figure, write_json
from checkpoint import resolve_device, save_checkpoint
from errors import UserError, cli
from latents import load_v1_data, resume_training
from models import VAE, VAEConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data", help="folder of transitions_NNNN.npz chunks (v1: collected at 36x40)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="frames per batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the KL term")
    p.add_argument("--latent-dim", type=int, default=32, help="size of the latent")
    p.add_argument("--out-dir", default="checkpoints/vae_v1", help="where checkpoints, metrics and plots go")
    p.add_argument("--val-split", type=float, default=0.1, help="fraction of episodes held out for validation")
    p.add_argument("--seq-len", type=int, default=30, help="dynamics window length the episode split is made on (keep equal across v1 stages)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and shuffling")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N chunks")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--resume", default=None, help="vae_latest.pt (or any VAE checkpoint of this run) to continue from")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.latent_dim < 1:
        raise UserError("--epochs, --batch-size, --latent-dim must be >= 1 and --lr > 0")
    args.device = resolve_device(args.device)
    return args


@torch.no_grad()
def evaluate(model, data, rows, device, batch_size):
    model.eval()
    sums, count = {"recon": 0.0, "kl": 0.0}, 0
    for i in range(0, len(rows), batch_size):
        frames = data.frames(rows[i:i + batch_size], device)
        _, parts = model.loss(frames)
        for k in sums:
            sums[k] += parts[k] * len(frames)
        count += len(frames)
    parts = {k: v / count for k, v in sums.items()}
    return parts["recon"] + model.config.beta * parts["kl"], parts


def save_reconstructions(model, data, rows, device, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    pick = rows[np.linspace(0, len(rows) - 1, 8).astype(int)]
    frames = data.frames(pick, device)
    with torch.no_grad():
        recon = model(frames)[0]
    fig, axes = plt.subplots(2, 8, figsize=(12, 3.3))
    for i in range(8):
        for row, images in enumerate((frames, recon)):
            axes[row, i].imshow(images[i].permute(1, 2, 0).cpu().numpy())
            axes[row, i].axis("off")
    axes[0, 0].set_title("real", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    save_figure(fig, path)


@cli
def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    torch.manual_seed(args.seed)
    data = load_v1_data(args.data_dir, args.seq_len, args.val_split, args.seed, args.max_files)
    height, width = data.frames(data.train_rows[:1], "cpu").shape[-2:]
    config = VAEConfig(height=height, width=width, latent_dim=args.latent_dim, beta=args.beta)
    model = VAE(config).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start_epoch, best_val, history = resume_training(args.resume, "vae", config, model, optimizer)
    log = RunLog(out_dir, history)
    write_json(out_dir / "config.json", {"args": vars(args), "model": asdict(config),
                                         "train_frames": len(data.train_rows), "val_frames": len(data.val_rows)})
    print(f"VAE {sum(p.numel() for p in model.parameters()):,} parameters on {height}x{width} frames; "
          f"{len(data.train_rows)} training / {len(data.val_rows)} validation frames; device {args.device}")

    for epoch in range(start_epoch, args.epochs):
        model.train()
        rows = np.random.default_rng(args.seed + epoch).permutation(data.train_rows)
        sums, start = {"recon": 0.0, "kl": 0.0}, time.time()
        with tqdm(total=len(rows), desc=f"epoch {epoch + 1}/{args.epochs}", unit="frame", unit_scale=True, leave=False) as bar:
            for i in range(0, len(rows), args.batch_size):
                frames = data.frames(rows[i:i + args.batch_size], args.device)  # (B, 3, H, W)
                loss, parts = model.loss(frames)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for k in sums:
                    sums[k] += parts[k] * len(frames)
                bar.update(len(frames))
                bar.set_postfix(loss=f"{loss.item():.1f}")
        elapsed = time.time() - start
        val_loss, val_parts = evaluate(model, data, data.val_rows, args.device, 512)
        train = {k: v / len(rows) for k, v in sums.items()}
        log.record({
            "epoch": epoch + 1,
            "loss/train": train["recon"] + args.beta * train["kl"], "loss/train_recon": train["recon"], "loss/train_kl": train["kl"],
            "loss/val": val_loss, "loss/val_recon": val_parts["recon"], "loss/val_kl": val_parts["kl"],
            "perf/frames_per_s": len(rows) / max(elapsed, 1e-9),
        })
        is_best = val_loss < best_val
        best_val = min(best_val, val_loss)
        extra = {"best_val": best_val, "history": log.history, "data_dir": str(args.data_dir), "seed": args.seed,
                 "val_split": args.val_split, "seq_len": args.seq_len}
        state = dict(kind="vae", config=asdict(config), model_state=model.state_dict(), step=epoch + 1, extra=extra)
        save_checkpoint(out_dir / "vae_latest.pt", optimizer_state=optimizer.state_dict(), **state)
        if is_best:
            save_checkpoint(out_dir / "best_vae.pt", **state)
        log.plot([["loss/train", "loss/val"], ["loss/train_recon", "loss/val_recon"], ["loss/train_kl", "loss/val_kl"]],
                 title="v1 VAE")
    save_reconstructions(model, data, data.val_rows, args.device, out_dir / "reconstruction.png")
    print(f"best validation loss {best_val:.2f}; checkpoint {out_dir / 'best_vae.pt'}")


if __name__ == "__main__":
    main()
