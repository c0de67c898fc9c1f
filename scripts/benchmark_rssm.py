"""Speed and size of the v2 world model presets, measured in one process so they compare fairly.

    python scripts/benchmark_rssm.py --data-dir data --presets faithful default --threads 2

Per preset: parameters (world model, encoder, decoder, RSSM), checkpoint file size, training
frames/s at --batch-size x --seq-len (the real training step: dataset batch -> floats -> forward,
backward, Adam), and imagination latent steps/s of the prior alone at --imagine-batch (no decoding).
Writes --out (JSON) and prints one line per figure.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import artifacts
import checkpoint
import imagination
from dataset import PokemonDataset, frames_to_float
from errors import cli
from models import RSSM_PRESETS, RSSMConfig, WorldModel


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", choices=RSSM_PRESETS, default=["faithful", "default"], help="presets to measure")
    p.add_argument("--data-dir", default=None, help="real data for the training step (default: random frames)")
    p.add_argument("--batch-size", type=int, default=8, help="training windows per batch")
    p.add_argument("--seq-len", type=int, default=15, help="training window length")
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps per preset (after one warm-up)")
    p.add_argument("--imagine-batch", type=int, default=1024, help="imagination batch")
    p.add_argument("--imagine-steps", type=int, default=15, help="imagined steps per timed rollout")
    p.add_argument("--repeats", type=int, default=6, help="timed rollouts per preset (best one counts)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="outputs/benchmark_rssm.json", help="JSON results")
    return p.parse_args(argv)


def training_batches(args, image_size):
    if args.data_dir:
        ds = PokemonDataset(args.data_dir, seq_len=args.seq_len)
        rng = np.random.default_rng(0)
        while True:
            yield ds.get_batch(rng.choice(ds.window_starts, args.batch_size, replace=False))
    generator = torch.Generator().manual_seed(0)
    B, T = args.batch_size, args.seq_len
    while True:
        yield {"obs": torch.randint(0, 256, (B, T, *image_size, 3), dtype=torch.uint8, generator=generator),
               "actions": torch.randint(0, 8, (B, T), generator=generator), "rewards": torch.zeros(B, T),
               "continues": torch.ones(B, T)}


def train_speed(wm: WorldModel, batches, steps: int, frames_per_step: int) -> float:
    optimizer = torch.optim.Adam(wm.parameters(), lr=1e-4)
    wm.train()
    timings = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        batch = next(batches)
        total, _, _, _ = wm(frames_to_float(batch["obs"], "cpu"), batch["actions"], batch["rewards"], batch["continues"])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(wm.parameters(), wm.cfg.grad_clip)
        optimizer.step()
        if i:  # the first step warms up
            timings.append(time.perf_counter() - t0)
    return frames_per_step / float(np.median(timings))


def imagine_speeds(models: dict, batch: int, steps: int, repeats: int) -> dict:
    """Latent steps/s of the prior alone, presets timed in turn (interleaved) so that a shared,
    busy CPU slows them alike; the best of `repeats` rollouts counts."""
    actions = torch.randint(0, 8, (batch, steps))
    best = {name: float("inf") for name in models}
    for wm in models.values():
        wm.eval()
        imagination.imagine(wm, wm.rssm.initial(batch), actions[:, :2])  # warm-up
    for _ in range(repeats):
        for name, wm in models.items():
            t0 = time.perf_counter()
            imagination.imagine(wm, wm.rssm.initial(batch), actions)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: batch * steps / seconds for name, seconds in best.items()}


@cli
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    torch.manual_seed(0)
    models = {preset: WorldModel(RSSMConfig.from_preset(preset)) for preset in args.presets}
    imagine = imagine_speeds(models, args.imagine_batch, args.imagine_steps, args.repeats)
    for preset, wm in models.items():
        count = lambda m: sum(p.numel() for p in m.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            path = checkpoint.save_checkpoint(Path(tmp) / "wm.pt", kind="rssm", config=wm.cfg.to_dict(),
                                              model_state=wm.state_dict())
            size_mb = path.stat().st_size / 2**20
        res = {"parameters": count(wm), "encoder": count(wm.encoder), "decoder": count(wm.decoder), "rssm": count(wm.rssm),
               "file_mb": size_mb,
               "imagine_steps_per_s": imagine[preset],
               "train_frames_per_s": train_speed(wm, training_batches(args, wm.cfg.image_size), args.train_steps,
                                                 args.batch_size * args.seq_len)}
        results[preset] = res
        print(f"{preset}: {res['parameters'] / 1e6:.2f} M parameters (encoder {res['encoder'] / 1e6:.2f} M, decoder "
              f"{res['decoder'] / 1e6:.2f} M, RSSM {res['rssm'] / 1e6:.2f} M), file {size_mb:.1f} MB, training "
              f"{res['train_frames_per_s']:.1f} frames/s at {args.batch_size}x{args.seq_len}, imagination "
              f"{res['imagine_steps_per_s']:.0f} latent steps/s at batch {args.imagine_batch}", flush=True)
    if "faithful" in results and "default" in results:
        f, d = results["faithful"], results["default"]
        results["ratios_default_over_faithful"] = {
            "train_frames_per_s": d["train_frames_per_s"] / f["train_frames_per_s"],
            "imagine_steps_per_s": d["imagine_steps_per_s"] / f["imagine_steps_per_s"]}
        print(f"default / faithful: training {results['ratios_default_over_faithful']['train_frames_per_s']:.1f}x, "
              f"imagination {results['ratios_default_over_faithful']['imagine_steps_per_s']:.1f}x", flush=True)
    artifacts.write_json(args.out, {"args": vars(args), "torch_threads": torch.get_num_threads(), "results": results})


if __name__ == "__main__":
    main()
