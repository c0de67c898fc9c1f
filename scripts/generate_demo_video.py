"""v1 demo video: the emulator (left) and the v1 world model's open-loop imagination (right).

    python scripts/generate_demo_video.py --vae-checkpoint checkpoints/vae_v1/best_vae.pt \\
        --checkpoint checkpoints/dynamics_v1/best_dynamics.pt --out-video outputs/demo_v1.mp4 --gif

The start frame is encoded once; then a fixed walking loop is played both in the emulator and in
the latent GRU, which never sees another frame. Both panels are shown at the model's resolution,
scaled up by whole pixels: no sharpening or contrast stretch.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from artifacts import panel, side_by_side, write_video
from env import ACTIONS, DEFAULT_ROM, PokemonEnv
from checkpoint import resolve_device
from errors import UserError, cli
from latents import LatentMemory, load_network
from planner import LatentPlanner

WALK_LOOP = ["right"] * 6 + ["down"] * 6 + ["left"] * 6 + ["up"] * 6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rom", default=str(DEFAULT_ROM), help="Game Boy ROM (default: the open cartridge)")
    p.add_argument("--save-state", default=None, help="start save state file; default: made in memory from the ROM")
    p.add_argument("--vae-checkpoint", default="checkpoints/vae_v1/best_vae.pt", help="v1 VAE")
    p.add_argument("--checkpoint", default="checkpoints/dynamics_v1/best_dynamics.pt", help="v1 latent dynamics")
    p.add_argument("--actions", default=",".join(WALK_LOOP), help="comma-separated action names played in a loop: " + " ".join(ACTIONS))
    p.add_argument("--snap-data", default=None,
                   help="ours: a folder of collected chunks at the VAE's resolution; every imagined latent is snapped to "
                        "the nearest latent of its frames before it is fed back (default: the plain open loop)")
    p.add_argument("--max-steps", type=int, default=30, help="actions played (video frames after the first)")
    p.add_argument("--ticks-per-action", type=int, default=24, help="emulator frames per action")
    p.add_argument("--fps", type=float, default=5.0, help="video frames per second")
    p.add_argument("--scale", type=int, default=6, help="whole-pixel upscaling of each panel")
    p.add_argument("--out-video", default="outputs/demo_v1.mp4", help="mp4 to write")
    p.add_argument("--gif", action="store_true", help="also write an animated GIF beside the mp4")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    args = p.parse_args(argv)
    args.actions = [a.strip() for a in args.actions.split(",") if a.strip()]
    unknown = [a for a in args.actions if a not in ACTIONS]
    if unknown or not args.actions:
        raise UserError(f"--actions has unknown names {unknown or '(none given)'}; use names from {', '.join(ACTIONS)}")
    if args.max_steps < 1 or args.scale < 1 or args.fps <= 0:
        raise UserError("--max-steps and --scale must be >= 1 and --fps > 0")
    args.device = resolve_device(args.device)
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    planner = LatentPlanner(load_network(args.vae_checkpoint, "vae", args.device),
                            load_network(args.checkpoint, "dynamics", args.device),
                            probe=None, device=args.device)
    config = planner.vae.config
    actions = [ACTIONS.index(args.actions[t % len(args.actions)]) for t in range(args.max_steps)]
    env = PokemonEnv(rom=args.rom, save_states=[args.save_state] if args.save_state else None,
                     resolution=(config.height, config.width), ticks_per_action=args.ticks_per_action, episode_length=10 ** 9)
    try:
        obs, _ = env.reset(options={"state_index": 0})
        real = [obs]
        for action in actions:
            obs, *_ = env.step(action)
            real.append(obs)
    finally:
        env.close()
    z0 = planner.encode(real[0])  # (1, D)
    snap = LatentMemory.of_data_dir(planner.vae, args.snap_data, args.device).snap if args.snap_data else None
    with torch.no_grad():
        latents, _ = planner.dynamics.rollout(z0, torch.tensor([actions], device=args.device), project=snap)  # (1, K, D)
    imagined = planner.decode(torch.cat([z0, latents[0]]))  # (K+1, H, W, 3); frame 0 = the start frame's reconstruction
    frames = []
    for t, (r, m) in enumerate(zip(real, imagined)):
        label = "start" if t == 0 else f"step {t}: {ACTIONS[actions[t - 1]]}"
        frames.append(side_by_side([panel(r, f"real  {label}", args.scale),
                                    panel(m, f"imagined (v1, open loop{', snapped' if snap else ''})" if t else "imagined: reconstruction", args.scale)]))
    out = Path(args.out_video)
    write_video(frames, out, fps=args.fps)
    if args.gif:
        write_video(frames, out.with_suffix(".gif"), fps=args.fps)
    mse = float(np.mean([(r.astype(np.float32) / 255 - m.astype(np.float32) / 255) ** 2 for r, m in zip(real[1:], imagined[1:])]))
    print(f"wrote {out}{' and ' + str(out.with_suffix('.gif')) if args.gif else ''}: {len(frames)} frames; "
          f"mean pixel MSE real vs imagined {mse:.4f}")


if __name__ == "__main__":
    main()
