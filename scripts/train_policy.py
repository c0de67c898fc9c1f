"""Train a policy in the world model's imagination, then evaluate it zero-shot in the emulator.

    python scripts/train_policy.py --wm-checkpoint checkpoints/rssm_v2/best_world_model.pt --data-dir data
    python scripts/train_policy.py ... --algo ppo            # or grpo (GRPO: --group rollouts per start state)
    python scripts/train_policy.py ... --compare             # reinforce, ppo and grpo, same budget, one table
    python scripts/train_policy.py --eval-only --policy OUT/policy.pt --eval-episodes 5 --eval-steps 500

An epoch is one pass over the training windows (capped by --steps-per-epoch updates); every window's
posterior beliefs are start states. Writes into --out-dir: config.json, metrics.jsonl, policy.pt (kind
"policy": world model + actor + critic, usable by collect_data.py --policy checkpoint and the demo
video), eval.json + eval.md (policy vs random vs scripted explorer on start states not used in
training), eval_episode.mp4; with --compare, one folder per algorithm and comparison.json/.md.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import agent as agent_lib
import artifacts
import checkpoint
from dataset import PokemonDataset
from env import DEFAULT_ROM, identify_rom
from errors import UserError, cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wm-checkpoint", default="checkpoints/rssm_v2/best_world_model.pt",
                   help="world-model checkpoint (kind 'rssm', from train_rssm.py) the policy dreams in")
    p.add_argument("--rom", default=str(DEFAULT_ROM), help="Game Boy ROM for the zero-shot evaluation")
    p.add_argument("--data-dir", default="data", help="NPZ chunks whose windows give the start states")
    p.add_argument("--epochs", type=int, default=50, help="passes over the training windows")
    p.add_argument("--steps-per-epoch", type=int, default=100, help="cap on actor-critic updates per epoch")
    p.add_argument("--batch-size", type=int, default=16, help="windows per update (every step of each is a start state)")
    p.add_argument("--seq-len", type=int, default=15, help="frames per window")
    p.add_argument("--imag-horizon", type=int, default=15, help="imagined steps per rollout (1..50)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate of actor and critic")
    p.add_argument("--discount", type=float, default=0.99, help="gamma (original 0.99; DreamerV3 0.997)")
    p.add_argument("--lambda-gae", type=float, default=0.95, help="lambda of the returns and of GAE")
    p.add_argument("--entropy-scale", type=float, default=3e-4, help="entropy bonus (DreamerV3 3e-4; original 1e-3)")
    p.add_argument("--algo", choices=agent_lib.ALGOS, default="reinforce", help="actor gradient estimator")
    p.add_argument("--compare", action="store_true", help="train reinforce, ppo and grpo with the same budget; table")
    p.add_argument("--group", type=int, default=8, help="GRPO: imagined rollouts per start state")
    p.add_argument("--ppo-epochs", type=int, default=4, help="PPO/GRPO: passes over each imagined batch")
    p.add_argument("--ppo-clip", type=float, default=0.2, help="PPO/GRPO: ratio clip")
    p.add_argument("--intrinsic-scale", type=float, default=0.0,
                   help="weight of the intrinsic reward: predicted prior/posterior KL (surprise) of imagined states")
    p.add_argument("--reward", choices=agent_lib.REWARDS, default="world-model",
                   help="what the imagined steps earn: the world model's reward head (learned from the data's env "
                        "rewards) or 'novelty': a head fitted first on replayed windows to standing on a tile "
                        "not among the last --novelty-memory steps' tiles")
    p.add_argument("--novelty-memory", type=int, default=20, help="steps a tile counts as recently seen (--reward novelty)")
    p.add_argument("--reward-fit-steps", type=int, default=600, help="updates of the novelty head (batch --batch-size windows)")
    p.add_argument("--actor-change", action="store_true",
                   help="the actor also reads z_t - z_{t-1}, what the last step changed (a press into a wall: nothing)")
    p.add_argument("--eval-episodes", type=int, default=5, help="evaluation episodes per policy (each its own start state)")
    p.add_argument("--eval-steps", type=int, default=500, help="steps per evaluation episode")
    p.add_argument("--eval-start-walk", type=int, default=0, metavar="N",
                   help="evaluation episodes start where the scripted explorer stands after N actions from each start "
                        "state (on other tiles and maps; 0: the cartridge's start states, all on one tile)")
    p.add_argument("--eval-start-states", type=int, default=None,
                   help="distinct evaluation start states (default: --eval-episodes, at most 10)")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate the policy alone every N epochs (0: only at the end)")
    p.add_argument("--eval-deterministic", action="store_true", help="evaluate with the most likely action, not samples")
    p.add_argument("--no-baselines", action="store_true", help="final evaluation without the random / explorer rows")
    p.add_argument("--out-dir", default="checkpoints/policy", help="run folder")
    p.add_argument("--init-policy", default=None, help="continue from this policy checkpoint (its world model is "
                   "replaced by --wm-checkpoint's weights when given)")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --policy (no training)")
    p.add_argument("--policy", default=None, help="with --eval-only: the policy checkpoint to evaluate")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop training (per algorithm) after this long, then evaluate and save")
    p.add_argument("--seed", type=int, default=0, help="seed of init, window order and sampling")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    for name in ("epochs", "steps_per_epoch", "batch_size", "eval_episodes", "eval_steps", "ppo_epochs",
                 "novelty_memory", "reward_fit_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.eval_start_walk < 0:
        raise UserError(f"--eval-start-walk must be >= 0, got {args.eval_start_walk}")
    if args.eval_start_states is None:
        args.eval_start_states = min(args.eval_episodes, 10)
    elif args.eval_start_states < 1:
        raise UserError(f"--eval-start-states must be at least 1, got {args.eval_start_states}")
    if not 1 <= args.imag_horizon <= 50:
        raise UserError(f"--imag-horizon must be in 1..50, got {args.imag_horizon}")
    if args.eval_only and not args.policy:
        raise UserError("--eval-only needs --policy PATH (a policy.pt written by this script)")
    args.device = torch.device(checkpoint.resolve_device(args.device))
    return args


def agent_config(args, algo: str) -> agent_lib.AgentConfig:
    try:
        return agent_lib.AgentConfig.from_dict(dict(
            algo=algo, horizon=args.imag_horizon, gamma=args.discount, lam=args.lambda_gae,
            entropy_scale=args.entropy_scale, actor_lr=args.lr, critic_lr=args.lr, group=args.group,
            ppo_epochs=args.ppo_epochs, ppo_clip=args.ppo_clip, intrinsic_scale=args.intrinsic_scale,
            reward=args.reward, novelty_memory=args.novelty_memory, actor_change=args.actor_change))
    except ValueError as err:
        raise UserError(f"agent config: {err}") from err


def make_agent(args, algo: str):
    """A fresh (or --init-policy) agent holding the world model of --wm-checkpoint, and its learner."""
    cfg = agent_config(args, algo)
    learner_state = None
    if args.init_policy:
        agent, ckpt = agent_lib.load_policy(args.init_policy, args.device)
        agent.reconfigure(cfg)
        learner_state = ckpt["extra"].get("learner")
        if args.wm_checkpoint and Path(args.wm_checkpoint).exists():
            agent.wm.load_state_dict(agent_lib.load_world_model(args.wm_checkpoint, args.device).state_dict())
    else:
        wm = agent_lib.load_world_model(args.wm_checkpoint, args.device)
        torch.manual_seed(args.seed)
        agent = agent_lib.PolicyAgent(wm.cfg, cfg).to(args.device)
        agent.wm.load_state_dict(wm.state_dict())
    learner = agent_lib.Learner(agent).to(args.device)
    if learner_state is not None and learner_state["modules"].keys() == learner.state_dict().keys():
        learner.load_full_state(learner_state)
    return agent, learner


def evaluate_and_write(agent, args, out_dir: Path, policies) -> dict:
    results = agent_lib.evaluate(agent, rom=args.rom, policies=policies, episodes=args.eval_episodes,
                                 steps=args.eval_steps, start_state_count=args.eval_start_states, seed=args.seed,
                                 deterministic=args.eval_deterministic, video_path=out_dir / "eval_episode.mp4",
                                 start_walk=args.eval_start_walk)
    starts = "cartridge title waits 1000 + 7 i frames"
    if args.eval_start_walk:
        starts += f", then {args.eval_start_walk} scripted-explorer actions (seed [{args.seed}, i])"
    artifacts.write_json(out_dir / "eval.json", {"settings": {"episodes": args.eval_episodes, "steps": args.eval_steps,
                                                              "deterministic": args.eval_deterministic,
                                                              "start_states": starts,
                                                              "distinct_start_states": args.eval_start_states},
                                                 "results": results})
    artifacts.write_text(out_dir / "eval.md", agent_lib.eval_table(
        results, f"Zero-shot evaluation: {args.eval_episodes} episodes x {args.eval_steps} steps"))
    return results


def novelty_head(args, ds, log):
    """With --reward novelty: a NoveltyHead fitted on the replayed windows (once, shared by --compare's
    algorithms); else None."""
    if args.reward != "novelty":
        return None
    wm = agent_lib.load_world_model(args.wm_checkpoint, args.device)
    head = agent_lib.NoveltyHead(wm.cfg).to(args.device)
    metrics = agent_lib.fit_novelty_head(head, wm, ds, args.novelty_memory, steps=args.reward_fit_steps,
                                         batch_size=args.batch_size, seed=args.seed, device=args.device)
    log.record({"reward": "novelty", "novelty_memory": args.novelty_memory, **metrics}, epoch_end=False)
    print("novelty reward, held-out windows: " + ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in metrics.items()))
    return head


def train_one(args, algo: str, out_dir: Path, ds, train_starts, log, reward_head=None) -> tuple:
    agent, learner = make_agent(args, algo)
    if reward_head is not None:
        agent.novelty.load_state_dict(reward_head.state_dict())
    updates_per_epoch = min(max(1, len(train_starts) // args.batch_size), args.steps_per_epoch)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        records = agent_lib.train_in_imagination(
            agent, learner, ds, train_starts, updates=updates_per_epoch, batch_size=args.batch_size,
            seed=args.seed, device=args.device, log=log, desc=f"{algo} epoch {epoch + 1}/{args.epochs}")
        log.record({"epoch": epoch + 1, "algo": algo, "update": learner.updates,
                    **{k: v for k, v in records[-1].items() if k.startswith("imag/")},
                    "perf/elapsed_s": time.perf_counter() - started}, epoch_end=False)
        agent_lib.save_policy(out_dir / "policy.pt", agent, learner, extra={"epoch": epoch + 1, "run_config": config_of(args)})
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            res = agent_lib.evaluate(agent, rom=args.rom, policies=("agent",), episodes=args.eval_episodes,
                                     steps=args.eval_steps, start_state_count=args.eval_start_states,
                                     seed=args.seed, deterministic=args.eval_deterministic, start_walk=args.eval_start_walk)
            log.record({"epoch": epoch + 1, "algo": algo, **agent_lib.flat_eval_metrics(res)}, epoch_end=False)
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget * 60:
            log.record({"epoch": epoch + 1, "algo": algo, "stopped": "time budget"}, epoch_end=False)
            break
    return agent, learner, time.perf_counter() - started


def config_of(args) -> dict:
    return {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}


@cli
def main(argv=None):
    args = parse_args(argv)
    checkpoint.keep_freed_memory()  # the encoder's activations are re-allocated every update
    if args.threads:
        torch.set_num_threads(args.threads)
    identify_rom(args.rom)  # a bad ROM fails now, not after training
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = artifacts.RunLog(out_dir)
    if args.eval_only:
        agent, _ = agent_lib.load_policy(args.policy, args.device)
        results = evaluate_and_write(agent, args, out_dir, ("agent",) if args.no_baselines else agent_lib.ALL_POLICIES)
        log.record({"eval_only": str(args.policy), **agent_lib.flat_eval_metrics(results)}, epoch_end=False)
        print(agent_lib.eval_table(results))
        return
    ds = PokemonDataset(args.data_dir, seq_len=args.seq_len)
    episodes = len(np.unique(ds.segment_ids[ds.window_starts]))
    train_starts, _ = ds.split(0.1 if episodes >= 2 else 0.0, seed=args.seed)
    artifacts.write_json(out_dir / "config.json", {"run": config_of(args), "train_windows": int(len(train_starts)),
                                                   "agent": agent_config(args, args.algo).to_dict()})
    reward_head = novelty_head(args, ds, log)
    algos = agent_lib.ALGOS if args.compare else (args.algo,)
    rows = {}
    for algo in algos:
        run_dir = out_dir / algo if args.compare else out_dir
        torch.manual_seed(args.seed)
        agent, learner, seconds = train_one(args, algo, run_dir, ds, train_starts, log, reward_head)
        policies = ("agent",) if args.compare or args.no_baselines else agent_lib.ALL_POLICIES
        results = evaluate_and_write(agent, args, run_dir, policies)
        log.record({"algo": algo, "update": learner.updates, **agent_lib.flat_eval_metrics(results)}, epoch_end=False)
        rows[algo] = {"updates": learner.updates, "train_seconds": seconds, **results["agent"]["mean"]}
        print(agent_lib.eval_table(results, f"{algo}"))
    if args.compare:
        baselines = {} if args.no_baselines else agent_lib.evaluate(
            None, rom=args.rom, policies=("random", "explore"), episodes=args.eval_episodes, steps=args.eval_steps,
            start_state_count=args.eval_start_states, seed=args.seed, start_walk=args.eval_start_walk)
        for name, res in baselines.items():
            rows[name] = {"updates": 0, "train_seconds": 0.0, **res["mean"]}
        best = max(agent_lib.ALGOS, key=lambda a: rows[a]["unique_tiles"])
        shutil.copyfile(out_dir / best / "policy.pt", out_dir / ".policy.pt.tmp")
        (out_dir / ".policy.pt.tmp").replace(out_dir / "policy.pt")
        artifacts.write_json(out_dir / "comparison.json", {"rows": rows, "best": best, "settings": config_of(args)})
        keys = ("updates", "train_seconds", "unique_tiles", "maps", "battles_won", "badges", "return")
        lines = [f"### Actor-critic estimators in imagination: same budget, {args.eval_episodes} x {args.eval_steps}-step "
                 f"episodes (policy.pt = {best})", "", "| policy | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys)
                  + " |" for name, row in rows.items()]
        artifacts.write_text(out_dir / "comparison.md", "\n".join(lines) + "\n")
        print("\n".join(lines))
    print(f"done: run folder {out_dir}")


if __name__ == "__main__":
    main()
