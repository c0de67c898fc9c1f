"""Open-loop drift of the v1 dynamics on held-out episodes: latent MSE and probe tile error per step.

    python scripts/evaluate_drift.py --data-dir data/v1 \\
        --vae-checkpoint checkpoints/vae_v1/best_vae.pt --probe-checkpoint checkpoints/probe_v1/best_probe.pt \\
        --checkpoint checkpoints/dynamics_v1/best_dynamics.pt \\
        --ablation-checkpoint checkpoints/dynamics_v1_tf/best_dynamics.pt

Each validation window of --seq-len steps is encoded with the VAE; the dynamics roll out from its
first latent z_0 with the logged actions only (no later frame is seen), and at every step
k = 1..K the script reports the latent MSE against the encoding of the real frame k and the
Manhattan distance, in tiles, between the probe's (x, y) read off the imagined latent and RAM's.
Writes drift.md (the project page's table), drift.json and drift.png to --out-dir. With
--ablation-checkpoint (the teacher-forcing model) both models share one table with the
improvement column (TF tile error / SS tile error). The "probe floor" is the probe's error on
the real frames' latents: the best a rollout could score; the "static baseline" reads z_0 at
every step (a model that predicts no motion), which a useful rollout must beat.
With --snap (ours) every imagined latent is replaced by the nearest latent of a training frame
before it is fed back (`latents.LatentMemory`); with --reproject it is decoded and encoded again.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from artifacts import save_figure, write_json, write_text
from checkpoint import load_checkpoint, resolve_device
from errors import UserError, cli
from latents import LatentMemory, LatentTable, encode_rows, load_network, load_v1_data


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data", help="folder of transitions_NNNN.npz chunks (the training data: its held-out episodes are used)")
    p.add_argument("--vae-checkpoint", default="checkpoints/vae_v1/best_vae.pt", help="the VAE the dynamics were trained on")
    p.add_argument("--probe-checkpoint", default="checkpoints/probe_v1/best_probe.pt", help="RAM probe reading (x, y) off latents")
    p.add_argument("--checkpoint", default="checkpoints/dynamics_v1/best_dynamics.pt", help="dynamics trained with scheduled sampling (SS)")
    p.add_argument("--ablation-checkpoint", default=None, help="dynamics trained with teacher forcing only (TF), for the side-by-side table")
    p.add_argument("--reproject", action="store_true",
                   help="ours: decode every imagined latent to a frame and encode it again before feeding it back "
                        "(keeps rollouts on the VAE's latents of real frames); default: the plain open loop")
    p.add_argument("--snap", action="store_true",
                   help="ours: replace every imagined latent by the nearest latent of a training frame (the "
                        "training episodes' frames only) before feeding it back; default: the plain open loop")
    p.add_argument("--steps", type=int, default=29, help="rollout steps K reported (at most --seq-len - 1)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the one --checkpoint was trained with)")
    p.add_argument("--val-split", type=float, default=None, help="held-out fraction of episodes (default: --checkpoint's)")
    p.add_argument("--seed", type=int, default=None, help="seed of the episode split (default: --checkpoint's)")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N chunks")
    p.add_argument("--max-sequences", type=int, default=0, help="evaluate at most this many validation windows (0: all)")
    p.add_argument("--batch-size", type=int, default=512, help="windows rolled out at once")
    p.add_argument("--out-dir", default="outputs/drift_v1", help="where drift.md, drift.json and drift.png go")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    args = p.parse_args(argv)
    if args.reproject and args.snap:
        raise UserError("--reproject and --snap are two ways to project imagined latents; pass one")
    if args.steps < 1 or args.batch_size < 1 or args.max_sequences < 0:
        raise UserError("--steps and --batch-size must be >= 1, --max-sequences >= 0")
    args.device = resolve_device(args.device)
    return args


@torch.no_grad()
def drift_curves(dynamics, probe, table, data, starts, steps, batch_size, project=None) -> dict:
    """Per-step sums over windows: latent MSE, rollout tile error and the probe floor; divided by the count.
    `project` maps every imagined latent before it is fed back (--reproject, --snap)."""
    mse, tile, floor, static = torch.zeros(steps), torch.zeros(steps), torch.zeros(steps), torch.zeros(steps)
    for i in tqdm(range(0, len(starts), batch_size), desc="rollouts", unit="batch", leave=False):
        chunk = starts[i:i + batch_size]
        batch = data.seqs.get_batch(chunk, keys=("actions", "xs", "ys"))  # no frames: the latents are in `table`
        z = table.windows(chunk, data.seq_len)  # (B, T, D)
        actions = batch["actions"][:, :steps].to(z.device)  # a_0 .. a_{K-1}
        pred, _ = dynamics.rollout(z[:, 0], actions, project=project)  # (B, K, D): z_1 .. z_K
        true = z[:, 1:steps + 1]
        xy = torch.stack([batch["xs"], batch["ys"]], -1)[:, 1:steps + 1].float()  # (B, K, 2)
        b, k, d = pred.shape
        pred_xy = probe(pred.reshape(b * k, d))["xy"].reshape(b, k, 2).cpu()
        true_xy = probe(true.reshape(b * k, d))["xy"].reshape(b, k, 2).cpu()
        mse += ((pred - true) ** 2).mean(-1).sum(0).cpu()
        tile += (pred_xy - xy).abs().sum(-1).sum(0)
        floor += (true_xy - xy).abs().sum(-1).sum(0)
        static += (probe(z[:, 0])["xy"].cpu()[:, None] - xy).abs().sum(-1).sum(0)  # "nothing moves": z_0 read at every step
    n = len(starts)
    return {"latent_mse": (mse / n).tolist(), "tile_error": (tile / n).tolist(), "probe_floor_tile_error": (floor / n).tolist(),
            "static_tile_error": (static / n).tolist()}


PROJECTIONS = {None: "", "reproject": ", every imagined latent decoded and re-encoded before it is fed back",
               "snap": ", every imagined latent replaced by the nearest training frame's latent before it is fed back"}


def markdown_table(curves: dict, sequences: int, projection: str | None = None) -> str:
    ss, tf = curves["ss"], curves.get("tf")
    steps = len(ss["latent_mse"])
    how = PROJECTIONS[projection]
    lines = [f"Open-loop drift over {sequences:,} validation windows (held-out episodes), {steps} imagined steps{how}.", ""]
    if tf:
        lines += ["| Rollout Step | SS Latent MSE | TF Latent MSE | SS Tile Error | TF Tile Error | Improvement |",
                  "|---|---|---|---|---|---|"]
        for k in range(steps):
            ratio = tf["tile_error"][k] / max(ss["tile_error"][k], 1e-9)
            lines.append(f"| Step {k + 1} | {ss['latent_mse'][k]:.5f} | {tf['latent_mse'][k]:.5f} | "
                         f"{ss['tile_error'][k]:.2f} tiles | {tf['tile_error'][k]:.2f} tiles | {ratio:.2f}× |")
    else:
        lines += ["| Rollout Step | Latent MSE | Tile Error |", "|---|---|---|"]
        for k in range(steps):
            lines.append(f"| Step {k + 1} | {ss['latent_mse'][k]:.5f} | {ss['tile_error'][k]:.2f} tiles |")
    floor, static = ss["probe_floor_tile_error"], ss["static_tile_error"]
    lines += ["", f"Probe floor (the probe on the real frames' latents): {floor[0]:.2f} tiles at step 1, "
                  f"{floor[-1]:.2f} tiles at step {steps}.",
              f"Static baseline (no dynamics: the probe on z_0 at every step): {static[0]:.2f} tiles at step 1, "
              f"{static[-1]:.2f} tiles at step {steps}."]
    return "\n".join(lines) + "\n"


def plot(curves: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, label in (("ss", "scheduled sampling"), ("tf", "teacher forcing")):
        if name in curves:
            steps = np.arange(1, len(curves[name]["latent_mse"]) + 1)
            axes[0].plot(steps, curves[name]["latent_mse"], marker=".", label=label)
            axes[1].plot(steps, curves[name]["tile_error"], marker=".", label=label)
    axes[1].plot(steps, curves["ss"]["probe_floor_tile_error"], "k--", label="probe on real latents")
    axes[0].set(xlabel="rollout step", ylabel="latent MSE")
    axes[1].set(xlabel="rollout step", ylabel="tile error (Manhattan)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("v1 open-loop drift on held-out episodes")
    save_figure(fig, path)


@cli
def main(argv=None):
    args = parse_args(argv)
    trained = load_checkpoint(args.checkpoint, kind="dynamics")["extra"]
    seq_len = args.seq_len or trained.get("seq_len", 30)
    val_split = args.val_split if args.val_split is not None else trained.get("val_split", 0.1)
    seed = args.seed if args.seed is not None else trained.get("seed", 0)
    if args.steps > seq_len - 1:
        raise UserError(f"--steps {args.steps} needs windows of {args.steps + 1} steps, but --seq-len is {seq_len}")
    vae = load_network(args.vae_checkpoint, "vae", args.device)
    probe = load_network(args.probe_checkpoint, "probe", args.device)
    models = {"ss": load_network(args.checkpoint, "dynamics", args.device)}
    if args.ablation_checkpoint:
        models["tf"] = load_network(args.ablation_checkpoint, "dynamics", args.device)
    for name, model in models.items():
        if model.config.latent_dim != vae.config.latent_dim or probe.config.latent_dim != vae.config.latent_dim:
            raise UserError(f"the VAE's latent size {vae.config.latent_dim} does not match the {name} dynamics' "
                            f"({model.config.latent_dim}) or the probe's ({probe.config.latent_dim}); pass checkpoints of one run")

    data = load_v1_data(args.data_dir, seq_len, val_split, seed, args.max_files)
    starts = data.val_starts
    if args.max_sequences:
        starts = starts[np.linspace(0, len(starts) - 1, min(args.max_sequences, len(starts))).astype(int)]
    table = LatentTable(vae, data, args.device, rows=np.unique(starts[:, None] + np.arange(seq_len)))
    project = None
    if args.reproject:
        def project(z):
            return vae.encode(vae.decode(z))[0]
    elif args.snap:
        memory = LatentMemory(encode_rows(vae, data.seqs.obs, data.train_rows, args.device))
        print(f"latent memory: {len(memory):,} distinct latents of {len(data.train_rows):,} training frames")
        project = memory.snap
    curves = {name: drift_curves(model, probe, table, data, starts, args.steps, args.batch_size, project)
              for name, model in models.items()}
    table_md = markdown_table(curves, len(starts), "reproject" if args.reproject else "snap" if args.snap else None)
    out_dir = Path(args.out_dir)
    write_text(out_dir / "drift.md", table_md)
    write_json(out_dir / "drift.json", {
        "sequences": len(starts), "steps": args.steps, "reproject": args.reproject, "snap": args.snap, "seq_len": seq_len, "val_split": val_split, "seed": seed,
        "data_dir": str(args.data_dir), "checkpoint": str(args.checkpoint), "ablation_checkpoint": args.ablation_checkpoint,
        "vae_checkpoint": str(args.vae_checkpoint), "probe_checkpoint": str(args.probe_checkpoint), **curves,
    })
    plot(curves, out_dir / "drift.png")
    print(table_md)
    print(f"wrote {out_dir / 'drift.md'}, drift.json, drift.png")


if __name__ == "__main__":
    main()
