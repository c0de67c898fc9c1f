"""Goal-reaching in the emulator with the v1 world-model planner, next to baselines, in one run.

    python scripts/run_planner.py --vae-checkpoint checkpoints/vae_v1/best_vae.pt \\
        --probe-checkpoint checkpoints/probe_v1/best_probe.pt --checkpoint checkpoints/dynamics_v1/best_dynamics.pt

Goals are tiles on the start map, 2..--goal-radius tiles (Manhattan) from the start, that a random
walk from the start state stood on (so they are reachable). With --start-walk N the start states
are first moved: the scripted explorer walks N actions from the game's start (a different walk for
each of --start-states), so goals lie on many maps and places. For every goal each policy starts
from the same state and has --max-steps actions to stand on the goal tile:
  mpc     the original's planner: the fixed macro-sequences of --horizon actions, imagined in the
          latent model, scored by the probe on the final latent; runs --execute-steps, replans
  cem     cross-entropy method over action sequences with the same model and score
  greedy  no world model: steps toward the goal from the true (RAM) position, sidestepping walls
  random  uniformly random buttons
Writes planner.json and planner.md (success rate and steps to goal per policy) to --out-dir.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from artifacts import write_json, write_text
from env import DEFAULT_ROM, PokemonEnv
from checkpoint import resolve_device
from errors import UserError, cli
from explorer import walk_start_states
from latents import LatentMemory, load_network
from planner import GreedyPolicy, LatentPlanner, PlannerPolicy, RandomPolicy, run_goal_episode, sample_goal

DESCRIPTIONS = {
    "mpc": "world model + macro MPC (original)",
    "cem": "world model + CEM",
    "greedy": "no world model, greedy on the true position",
    "random": "random buttons",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rom", default=str(DEFAULT_ROM), help="Game Boy ROM (default: the open cartridge)")
    p.add_argument("--save-state", nargs="+", default=None, help="start save state file(s); default: made in memory from the ROM")
    p.add_argument("--start-states", type=int, default=2, help="start states made in memory when --save-state is not given")
    p.add_argument("--start-walk", type=int, default=0,
                   help="walk the scripted explorer this many actions from the start to make each start state (0: the game's start)")
    p.add_argument("--vae-checkpoint", default="checkpoints/vae_v1/best_vae.pt", help="v1 VAE (its frame size sets the env resolution)")
    p.add_argument("--probe-checkpoint", default="checkpoints/probe_v1/best_probe.pt", help="v1 RAM probe used to score plans")
    p.add_argument("--checkpoint", default="checkpoints/dynamics_v1/best_dynamics.pt", help="v1 latent dynamics used to imagine plans")
    p.add_argument("--planner", nargs="+", choices=("mpc", "cem"), default=["mpc", "cem"], help="world-model planner(s) to evaluate")
    p.add_argument("--goals", type=int, default=20, help="number of goals")
    p.add_argument("--goal-radius", type=int, default=10, help="largest Manhattan distance of a goal from the start tile")
    p.add_argument("--min-distance", type=int, default=2, help="smallest Manhattan distance of a goal from the start tile")
    p.add_argument("--max-steps", type=int, default=60, help="actions allowed per goal")
    p.add_argument("--horizon", type=int, default=15, help="length of every imagined action sequence")
    p.add_argument("--execute-steps", type=int, default=5, help="actions of each plan run in the emulator before replanning")
    p.add_argument("--cem-population", type=int, default=128, help="CEM: sequences sampled per iteration")
    p.add_argument("--cem-iterations", type=int, default=4, help="CEM: iterations per plan")
    p.add_argument("--snap-data", default=None,
                   help="CEM: a folder of collected chunks at the VAE's resolution; every imagined latent is snapped to "
                        "the nearest latent of its frames (default: no snapping)")
    p.add_argument("--belief", action="store_true",
                   help="CEM: carry the dynamics' GRU state along the episode and imagine from it (default: from the frame alone)")
    p.add_argument("--ticks-per-action", type=int, default=24, help="emulator frames per action")
    p.add_argument("--seed", type=int, default=0, help="seed of goals and policies")
    p.add_argument("--out-dir", default="outputs/planner_v1", help="where planner.json and planner.md go")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    args = p.parse_args(argv)
    for name in ("start_states", "goals", "goal_radius", "max_steps", "horizon", "execute_steps", "cem_population", "cem_iterations"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.start_walk < 0:
        raise UserError(f"--start-walk {args.start_walk} must be >= 0")
    if not 0 <= args.min_distance <= args.goal_radius:
        raise UserError(f"--min-distance {args.min_distance} must be between 0 and --goal-radius {args.goal_radius}")
    args.device = resolve_device(args.device)
    return args


def world_model_policies(args) -> dict:
    """One PlannerPolicy per --planner method, sharing the three networks."""
    vae = load_network(args.vae_checkpoint, "vae", args.device)
    dynamics = load_network(args.checkpoint, "dynamics", args.device)
    probe = load_network(args.probe_checkpoint, "probe", args.device)
    planners = {m: LatentPlanner(vae, dynamics, probe, device=args.device) for m in args.planner}
    if args.snap_data and "cem" in planners:
        planners["cem"].memory = LatentMemory.of_data_dir(vae, args.snap_data, args.device)
    kwargs = {"mpc": {}, "cem": {"population": args.cem_population, "iterations": args.cem_iterations}}
    return {m: PlannerPolicy(planners[m], method=m, horizon=args.horizon, execute_steps=args.execute_steps, seed=args.seed,
                             plan_kwargs=kwargs[m], belief=args.belief and m == "cem") for m in args.planner}


def summarise(results: list) -> dict:
    steps = [r["steps"] for r in results if r["success"]]
    return {"success_rate": float(np.mean([r["success"] for r in results])), "successes": len(steps),
            "goals": len(results), "mean_steps_to_goal": float(np.mean(steps)) if steps else None,
            "median_steps_to_goal": float(np.median(steps)) if steps else None}


def markdown(summary: dict, args, goal_distances: list, starts: set) -> str:
    maps = sorted({m for m, _, _ in starts})
    lines = [f"Goal reaching on the open cartridge: {len(goal_distances)} goals on the start map, from {len(starts)} start "
             f"tile(s) on map(s) {', '.join(f'0x{m:02X}' for m in maps)}, "
             f"{min(goal_distances)}..{max(goal_distances)} tiles away (mean {np.mean(goal_distances):.1f}), "
             f"{args.max_steps} actions allowed; plans of {args.horizon}, {args.execute_steps} actions run before replanning.",
             "", "| Policy | Success rate | Mean steps to goal (successes) | Median steps |", "|---|---|---|---|"]
    for name, s in summary.items():
        mean = f"{s['mean_steps_to_goal']:.1f}" if s["mean_steps_to_goal"] is not None else "-"
        median = f"{s['median_steps_to_goal']:.0f}" if s["median_steps_to_goal"] is not None else "-"
        extras = [x for x, on in (("belief state", args.belief), ("snapped to real frames", args.snap_data)) if on]
        desc = DESCRIPTIONS[name] + (f" ({', '.join(extras)})" if name == "cem" and extras else "")
        lines.append(f"| {name}: {desc} | {100 * s['success_rate']:.0f}% ({s['successes']}/{s['goals']}) | {mean} | {median} |")
    return "\n".join(lines) + "\n"


@cli
def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    vae_config = load_network(args.vae_checkpoint, "vae", "cpu").config
    env = PokemonEnv(rom=args.rom, save_states=args.save_state, resolution=(vae_config.height, vae_config.width),
                     ticks_per_action=args.ticks_per_action, episode_length=10 ** 9, start_state_count=args.start_states)
    try:
        if args.start_walk:
            env.start_states = walk_start_states(env, args.start_states, args.start_walk, args.seed)
        rng = np.random.default_rng(args.seed)
        goals = []
        for i in tqdm(range(args.goals), desc="sampling goals", unit="goal", leave=False):
            index = i % len(env.start_states)
            goal = sample_goal(env, index, rng, radius=args.goal_radius, min_distance=args.min_distance)
            if goal is None:
                raise UserError(f"a random walk from start state {index} reached no tile {args.min_distance}.."
                                f"{args.goal_radius} tiles away on its map; use other --save-state files or a larger --goal-radius")
            goals.append((index, goal))
        policies = world_model_policies(args)
        policies["greedy"] = GreedyPolicy(args.seed)
        policies["random"] = RandomPolicy(args.seed)
        results = {name: [] for name in policies}
        for name, policy in policies.items():
            for index, goal in tqdm(goals, desc=name, unit="goal", leave=False):
                outcome = run_goal_episode(env, index, goal, policy, max_steps=args.max_steps)
                outcome.update(goal=[goal.map_id, goal.x, goal.y], state_index=index,
                               distance=abs(goal.x - outcome["start"][0]) + abs(goal.y - outcome["start"][1]))
                results[name].append(outcome)
    finally:
        env.close()
    summary = {name: summarise(r) for name, r in results.items()}
    distances = [r["distance"] for r in results["random"]]
    starts = {(r["goal"][0], *r["start"]) for r in results["random"]}
    table = markdown(summary, args, distances, starts)
    out_dir = Path(args.out_dir)
    write_json(out_dir / "planner.json", {"args": vars(args), "summary": summary, "episodes": results})
    write_text(out_dir / "planner.md", table)
    print(table)
    print(f"wrote {out_dir / 'planner.md'} and planner.json")


if __name__ == "__main__":
    main()
