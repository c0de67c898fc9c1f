"""Side-by-side video: the real emulator | the RSSM dreaming alone | the error between them.

    python scripts/generate_demo_video_v2.py --checkpoint checkpoints/rssm_v2/best_world_model.pt \
        --out-video outputs/demo_v2.mp4 --max-steps 30

The model observes the first --context real frames (default 1: the start frame), then only the
actions: from then on the middle panel is the prior's imagination, decoded as is (no contrast or
sharpening). Actions come from a fixed walking loop, an --actions-file, or a --policy checkpoint.
Frames are scaled --scale times (2) with a label bar; the video has max-steps + 1 frames (fewer if the episode ends).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import artifacts
import checkpoint
import imagination
from dataset import frames_to_float
from env import ACTIONS, DEFAULT_ROM, PokemonEnv
from errors import UserError, cli
from models import psnr

# The walking loop: 4 steps each way, three times (48 actions), then it repeats.
WALK_LOOP = (("right",) * 4 + ("down",) * 4 + ("left",) * 4 + ("up",) * 4) * 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rom", default=str(DEFAULT_ROM), help="Game Boy ROM (default: the open cartridge)")
    p.add_argument("--checkpoint", default="checkpoints/rssm_v2/best_world_model.pt", help="RSSM checkpoint (.pt)")
    p.add_argument("--save-state", default=None, help="PyBoy save state to start from (default: made in memory)")
    p.add_argument("--out-video", default="outputs/demo_v2.mp4", help="output .mp4 (or .gif)")
    p.add_argument("--gif", default=None, help="also write an animated GIF here")
    p.add_argument("--ticks-per-action", type=int, default=24, help="emulator frames per action")
    p.add_argument("--fps", type=float, default=5, help="video frames per second")
    p.add_argument("--scale", type=int, default=2, help="whole-pixel upscaling of each panel (1 keeps a README GIF small)")
    p.add_argument("--max-steps", type=int, default=30, help="actions to play")
    p.add_argument("--context", type=int, default=1, help="real frames the model observes before it dreams alone")
    p.add_argument("--actions-file", default=None,
                   help="actions to play, one per line or a JSON list, as names (down, left, ...) or indices 0-7")
    p.add_argument("--policy", default=None, help="a 'policy' checkpoint choosing the actions from the real frames")
    p.add_argument("--seed", type=int, default=0, help="seed of the policy's sampling")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    args = p.parse_args(argv)
    if args.max_steps < 1 or args.context < 1:
        raise UserError("--max-steps and --context must be at least 1")
    if args.context > args.max_steps:
        raise UserError(f"--context {args.context} leaves nothing to imagine within --max-steps {args.max_steps}")
    if args.actions_file and args.policy:
        raise UserError("give either --actions-file or --policy, not both")
    return args


def read_actions(path) -> list[int]:
    """An actions file: a JSON list or one action per line; names from env.ACTIONS or indices."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UserError(f"actions file {path} cannot be read ({err.strerror})") from None
    items = json.loads(text) if text.lstrip().startswith("[") else [line.strip() for line in text.splitlines()]
    actions = []
    for item in items:
        if item == "" or (isinstance(item, str) and item.startswith("#")):
            continue
        if isinstance(item, int) or str(item).isdigit():
            index = int(item)
        elif str(item).lower() in ACTIONS:
            index = ACTIONS.index(str(item).lower())
        else:
            raise UserError(f"actions file {path}: {item!r} is not an action; use {', '.join(ACTIONS)} or 0-7")
        if not 0 <= index < len(ACTIONS):
            raise UserError(f"actions file {path}: index {index} is outside 0-7")
        actions.append(index)
    if not actions:
        raise UserError(f"actions file {path} holds no actions")
    return actions


def action_source(args):
    """A function (step, obs) -> action index: the walking loop, a file, or a policy checkpoint."""
    if args.actions_file:
        actions = read_actions(args.actions_file)
        return lambda step, obs: actions[step % len(actions)]
    if args.policy:
        # Hook for policy checkpoints: build_model(kind "policy") returns an object with
        # act(obs uint8 (H, W, 3), deterministic) -> int (and optionally reset()), as collect_data uses.
        policy = checkpoint.build_model(checkpoint.load_checkpoint(args.policy, kind="policy"))
        if hasattr(policy, "reset"):
            policy.reset()
        torch.manual_seed(args.seed)
        return lambda step, obs: int(policy.act(obs, deterministic=True))
    walk = [ACTIONS.index(name) for name in WALK_LOOP]
    return lambda step, obs: walk[step % len(walk)]


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) floats in [0, 1] -> (T, H, W, 3) uint8 (plain rounding, nothing else)."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@cli
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(checkpoint.resolve_device(args.device))
    wm = checkpoint.build_model(checkpoint.load_checkpoint(args.checkpoint, kind="rssm"), device=device)
    height, width = wm.cfg.image_size
    env = PokemonEnv(rom=args.rom, save_states=[args.save_state] if args.save_state else None,
                     resolution=(height, width), ticks_per_action=args.ticks_per_action, episode_length=args.max_steps)
    choose = action_source(args)
    obs, _ = env.reset(options={"state_index": 0})
    real, actions = [obs], []
    for step in tqdm(range(args.max_steps), desc="emulator", unit="step"):
        action = choose(step, obs)
        obs, _, terminated, _, _ = env.step(action)
        real.append(obs)
        actions.append(action)
        if terminated:
            break
    env.close()
    if len(real) <= args.context:
        raise UserError(f"the episode ended after {len(real) - 1} steps, before the {args.context} context frames")

    frames = frames_to_float(torch.from_numpy(np.stack(real))[None], device)  # (1, N, 3, H, W)
    acts = torch.tensor(actions + [ACTIONS.index("pass")], device=device)[None]  # (1, N): a_t after frame t
    out = imagination.open_loop(wm, frames, acts, context=args.context, horizon=len(real) - args.context)
    dream = torch.cat([out["recon"], out["pred"]], 1)[0]  # (N, 3, H, W): context reconstructions, then imagined
    frame_mse = (dream - frames[0]).pow(2).mean((-3, -2, -1)).cpu()  # (N,)
    frame_psnr = psnr(frame_mse).tolist()  # 100 dB marks an exact frame
    dream_u8 = to_uint8(dream)
    error_u8 = np.abs(dream_u8.astype(np.int16) - np.stack(real).astype(np.int16)).astype(np.uint8)

    video = []
    for t in range(len(real)):
        imagined = t >= args.context
        left = artifacts.panel(real[t], f"emulator t={t}", scale=args.scale)
        middle = artifacts.panel(dream_u8[t], f"RSSM dream +{t - args.context + 1}" if imagined else f"RSSM context t={t}",
                                 scale=args.scale, color=(255, 120, 120) if imagined else (120, 255, 120))
        right = artifacts.panel(error_u8[t], f"|error| PSNR {frame_psnr[t]:.1f} dB", scale=args.scale)
        video.append(np.concatenate([left, middle, right], 1))
    artifacts.write_video(video, args.out_video, fps=args.fps)
    if args.gif:
        artifacts.write_video(video, args.gif, fps=args.fps)
    print(f"wrote {args.out_video} ({len(video)} frames; imagined PSNR {psnr(frame_mse[args.context:].mean()):.2f} dB "
          f"of the mean squared error)" + (f" and {args.gif}" if args.gif else ""), flush=True)


if __name__ == "__main__":
    main()
