"""Video of the v1 planner walking to a goal, with its imagined lookahead drawn beside the frame.

    python scripts/generate_planner_demo.py --vae-checkpoint checkpoints/vae_v1/best_vae.pt \\
        --probe-checkpoint checkpoints/probe_v1/best_probe.pt --checkpoint checkpoints/dynamics_v1/best_dynamics.pt \\
        --planner cem --out-video outputs/planner_demo_v1.mp4 --gif

Each video frame shows, left to right: the emulator frame (the planner's input); the decoded
final latent of the plan being executed (where the model imagines the plan ends); and a tile map
around the player with the true position (blue), the goal (green) and the probe's reading of
every imagined step of the plan (red path, ending in the imagined final tile).
"""
import argparse
from pathlib import Path

import cv2
import numpy as np

from artifacts import panel, side_by_side, write_video
from env import ACTIONS, DEFAULT_ROM, PokemonEnv
from checkpoint import resolve_device
from errors import UserError, cli
from latents import LatentMemory, load_network
from planner import Goal, LatentPlanner, PlannerPolicy, run_goal_episode, sample_goal


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rom", default=str(DEFAULT_ROM), help="Game Boy ROM (default: the open cartridge)")
    p.add_argument("--save-state", default=None, help="start save state file; default: made in memory from the ROM")
    p.add_argument("--vae-checkpoint", default="checkpoints/vae_v1/best_vae.pt", help="v1 VAE")
    p.add_argument("--probe-checkpoint", default="checkpoints/probe_v1/best_probe.pt", help="v1 RAM probe")
    p.add_argument("--checkpoint", default="checkpoints/dynamics_v1/best_dynamics.pt", help="v1 latent dynamics")
    p.add_argument("--planner", choices=("mpc", "cem"), default="cem", help="macro MPC (the original's) or CEM")
    p.add_argument("--goal", type=int, nargs=2, metavar=("X", "Y"), default=None,
                   help="goal tile on the start map; default: a reachable tile drawn as in run_planner.py")
    p.add_argument("--goal-radius", type=int, default=10, help="largest distance of a drawn goal from the start")
    p.add_argument("--max-steps", type=int, default=60, help="actions allowed")
    p.add_argument("--horizon", type=int, default=15, help="length of every imagined action sequence")
    p.add_argument("--execute-steps", type=int, default=5, help="actions of each plan run before replanning")
    p.add_argument("--belief", action="store_true", help="CEM: imagine from the GRU state carried along the episode")
    p.add_argument("--snap-data", default=None, help="CEM: snap imagined latents to the frames collected in this folder")
    p.add_argument("--ticks-per-action", type=int, default=24, help="emulator frames per action")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn goal and the planner")
    p.add_argument("--fps", type=float, default=5.0, help="video frames per second")
    p.add_argument("--scale", type=int, default=6, help="whole-pixel upscaling of the frame panels")
    p.add_argument("--out-video", default="outputs/planner_demo_v1.mp4", help="mp4 to write")
    p.add_argument("--gif", action="store_true", help="also write an animated GIF beside the mp4")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    args = p.parse_args(argv)
    if min(args.max_steps, args.horizon, args.execute_steps, args.scale, args.goal_radius) < 1 or args.fps <= 0:
        raise UserError("--max-steps, --horizon, --execute-steps, --scale, --goal-radius must be >= 1 and --fps > 0")
    args.device = resolve_device(args.device)
    return args


def tile_map(state, goal: Goal, path_xy: np.ndarray, size: int, radius: int = 10) -> np.ndarray:
    """(size, size, 3) picture of the tiles within `radius` of the player: grid, goal, player, imagined path."""
    cell = size / (2 * radius + 1)
    image = np.full((size, size, 3), 24, np.uint8)
    for i in range(2 * radius + 2):
        edge = int(round(i * cell))
        image[min(edge, size - 1), :] = image[:, min(edge, size - 1)] = 60

    def centre(x, y):
        return (int((x - state.x + radius + 0.5) * cell), int((y - state.y + radius + 0.5) * cell))

    cv2.circle(image, centre(goal.x, goal.y), int(cell * 0.45), (60, 200, 60), -1)
    points = [centre(state.x, state.y)] + [centre(x, y) for x, y in path_xy]
    for a, b in zip(points[:-1], points[1:]):
        cv2.line(image, a, b, (230, 70, 70), 2, cv2.LINE_AA)
    for p in points[1:]:
        cv2.circle(image, p, max(2, int(cell * 0.15)), (230, 70, 70), -1)
    cv2.circle(image, points[0], int(cell * 0.35), (80, 140, 255), -1)
    return image


@cli
def main(argv=None):
    args = parse_args(argv)
    planner = LatentPlanner(load_network(args.vae_checkpoint, "vae", args.device),
                            load_network(args.checkpoint, "dynamics", args.device),
                            load_network(args.probe_checkpoint, "probe", args.device), device=args.device)
    if args.snap_data and args.planner == "cem":  # MPC stays the original's
        planner.memory = LatentMemory.of_data_dir(planner.vae, args.snap_data, args.device)
    config = planner.vae.config
    env = PokemonEnv(rom=args.rom, save_states=[args.save_state] if args.save_state else None,
                     resolution=(config.height, config.width), ticks_per_action=args.ticks_per_action, episode_length=10 ** 9)
    frames = []

    def draw(obs, state, action, policy):
        plan = policy.last_plan
        if action is None:
            reached = "reached" if (state.x, state.y) == (goal.x, goal.y) else "not reached"
            title = f"end: goal {reached} after {len(frames)} steps"
        else:
            title = f"step {len(frames) + 1}: {ACTIONS[action]}  at ({state.x},{state.y})"
        panels = [panel(obs, title, args.scale)]
        if plan is not None:
            panels += [panel(plan.final_frame, f"imagined end of plan (score {plan.scores[plan.best]:.1f})", args.scale),
                       panel(tile_map(state, goal, plan.path_xy, config.height * args.scale),
                             f"goal ({goal.x},{goal.y}); red = imagined path")]
        frames.append(side_by_side(panels))

    try:
        if args.goal is None:
            goal = sample_goal(env, 0, np.random.default_rng(args.seed), radius=args.goal_radius)
            if goal is None:
                raise UserError("a random walk from the start state found no goal tile; pass --goal X Y")
        else:
            start_state = env.reset(options={"state_index": 0})[1]["state"]
            goal = Goal(start_state.map_id, *args.goal)
        policy = PlannerPolicy(planner, method=args.planner, horizon=args.horizon, execute_steps=args.execute_steps, seed=args.seed,
                               belief=args.belief and args.planner == "cem")
        outcome = run_goal_episode(env, 0, goal, policy, max_steps=args.max_steps, on_step=draw)
    finally:
        env.close()
    width = max(f.shape[1] for f in frames)  # the final frame may lack the plan panels
    frames = [np.pad(f, ((0, 0), (0, width - f.shape[1]), (0, 0)), constant_values=40) for f in frames]
    final_title = f"{'reached' if outcome['success'] else 'not reached'} in {outcome['steps'] or args.max_steps} steps"
    out = Path(args.out_video)
    write_video(frames, out, fps=args.fps)
    if args.gif:
        write_video(frames, out.with_suffix(".gif"), fps=args.fps)
    print(f"goal ({goal.x},{goal.y}) on map {goal.map_id}: {final_title}; wrote {out}"
          f"{' and ' + str(out.with_suffix('.gif')) if args.gif else ''} ({len(frames)} frames)")


if __name__ == "__main__":
    main()
