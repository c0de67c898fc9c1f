"""The online Dreamer loop: collect with the policy, train the world model, train the policy in
imagination, evaluate in the emulator; repeat. Rerun the same command after a kill: it continues at
the iteration and phase it was in (dreamer_state.json).

    python scripts/dreamer.py --data-dir runs/dreamer/data --out-dir runs/dreamer --iterations 5

Iteration i:
    collect      --collect-steps env steps (iteration 0 with no policy yet: the scripted explorer,
                 --prefill-steps) with epsilon-random actions, appended to --data-dir as new
                 transitions_NNNN.npz chunks (the collector's format)
    world_model  scripts/train_rssm.py --resume for --wm-epochs more epochs of --wm-steps batches
                 (a subprocess; its run folder is OUT/world_model)
    policy       --policy-updates actor-critic updates in imagination, continuing the last policy
                 (OUT/policies/policy_iter_NNN.pt; OUT/policy.pt is always the latest)
    evaluate     the policy zero-shot on start states not used in training, by default where the
                 scripted explorer stands after --eval-start-walk actions (the random policy and the
                 explorer once per evaluation setting); a record in metrics.jsonl and progress.png;
                 OUT/best_policy.pt is the policy with the most unique tiles so far (chosen on these
                 starts: confirm it on others, train_policy.py --eval-only --seed S)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import agent as agent_lib
import artifacts
import checkpoint
from dataset import ChunkBuffer, PokemonDataset, chunk_name, chunk_number, list_chunks
from env import DEFAULT_ROM, PokemonEnv, identify_rom, parse_resolution
from errors import UserError, cli
from explorer import ExplorePolicy, walk_start_states
from models import RSSM_PRESETS

REPO = Path(__file__).resolve().parents[1]
PHASES = ("collect", "world_model", "policy", "evaluate")
COLLECT_WALK_SEED = 7_000_000  # walks of collection start states (evaluation's walks use [seed, i])
TEMP_PREFIX = ".tmp_"  # the collector's prefix for half-written files (it removes strays)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rom", default=str(DEFAULT_ROM), help="Game Boy ROM")
    p.add_argument("--data-dir", default="data", help="NPZ chunk folder: read for training, new chunks appended")
    p.add_argument("--out-dir", default="checkpoints/dreamer", help="run folder (state, world model, policies, metrics)")
    p.add_argument("--iterations", type=int, default=10, help="loop iterations in all (a rerun continues)")
    p.add_argument("--resolution", default="144x160", help="frame size HxW of new data and of a new world model")
    p.add_argument("--prefill-steps", type=int, default=2000, help="explorer steps collected at iteration 0")
    p.add_argument("--collect-steps", type=int, default=1000, help="env steps collected per later iteration")
    p.add_argument("--epsilon", type=float, default=0.1, help="chance of a uniformly random action while collecting")
    p.add_argument("--episode-length", type=int, default=500, help="steps per collection episode")
    p.add_argument("--save-interval", type=int, default=500, help="steps per chunk file")
    p.add_argument("--start-states", type=int, default=4, help="collection start states (title waits 17 i frames)")
    p.add_argument("--collect-start-walk", type=int, default=0,
                   help="N > 0: each iteration's collection episodes begin where the scripted explorer stands after N "
                        "actions from those start states (new walks every iteration): the policy acts all over the world")
    p.add_argument("--wm-preset", choices=RSSM_PRESETS, default="default", help="world-model preset of a new run")
    p.add_argument("--wm-init", default=None,
                   help="start the world model from this train_rssm.py checkpoint_latest.pt instead of from scratch")
    p.add_argument("--wm-epochs", type=int, default=1, help="world-model epochs per iteration")
    p.add_argument("--wm-steps", type=int, default=100, help="world-model batches per epoch")
    p.add_argument("--wm-batch-size", type=int, default=8, help="world-model windows per batch")
    p.add_argument("--seq-len", type=int, default=15, help="frames per window (world model and start states)")
    p.add_argument("--policy-updates", type=int, default=200, help="actor-critic updates per iteration")
    p.add_argument("--batch-size", type=int, default=16, help="windows per actor-critic update")
    p.add_argument("--imag-horizon", type=int, default=15, help="imagined steps per rollout")
    p.add_argument("--algo", choices=agent_lib.ALGOS, default="reinforce", help="actor gradient estimator")
    p.add_argument("--lr", type=float, default=3e-4, help="actor and critic learning rate")
    p.add_argument("--discount", type=float, default=0.99, help="gamma")
    p.add_argument("--lambda-gae", type=float, default=0.95, help="lambda")
    p.add_argument("--entropy-scale", type=float, default=3e-4, help="entropy bonus")
    p.add_argument("--intrinsic-scale", type=float, default=0.0, help="weight of the predicted-surprise reward")
    p.add_argument("--reward", choices=agent_lib.REWARDS, default="world-model",
                   help="what imagined steps earn (see train_policy.py --reward); 'novelty' refits its head every iteration")
    p.add_argument("--novelty-memory", type=int, default=20, help="steps a tile counts as recently seen (--reward novelty)")
    p.add_argument("--reward-fit-steps", type=int, default=300, help="novelty-head updates per iteration")
    p.add_argument("--actor-change", action="store_true", help="the actor also reads what the last step changed")
    p.add_argument("--eval-episodes", type=int, default=10, help="evaluation episodes per iteration")
    p.add_argument("--eval-steps", type=int, default=500, help="steps per evaluation episode")
    p.add_argument("--eval-start-states", type=int, default=10, help="evaluation start states (never used in training)")
    p.add_argument("--eval-start-walk", type=int, default=100,
                   help="evaluation episodes begin where the scripted explorer stands after N actions from those "
                        "states (0: the cartridge's start, one tile for every start state)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads here and in the world-model trainer")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models run")
    args = p.parse_args(argv)
    args.resolution = parse_resolution(args.resolution)
    for name in ("iterations", "prefill_steps", "collect_steps", "episode_length", "save_interval", "wm_epochs",
                 "wm_steps", "wm_batch_size", "policy_updates", "batch_size", "eval_episodes", "eval_steps",
                 "novelty_memory", "reward_fit_steps", "eval_start_states"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("collect_start_walk", "eval_start_walk"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    if not 0 <= args.epsilon <= 1:
        raise UserError(f"--epsilon must be in [0, 1], got {args.epsilon}")
    checkpoint.resolve_device(args.device)  # an unavailable CUDA device fails here, not in a later phase
    return args


class Loop:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out_dir)
        self.data = Path(args.data_dir)
        self.wm_dir = self.out / "world_model"
        self.state_path = self.out / "dreamer_state.json"
        self.out.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = artifacts.RunLog(self.out)
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
        else:
            self.state = {"iteration": 0, "phase": "collect", "first_badge_env_step": None}
            artifacts.write_json(self.out / "config.json", {k: (list(v) if isinstance(v, tuple) else v)
                                                            for k, v in vars(args).items()})

    def save_state(self) -> None:
        artifacts.write_json(self.state_path, self.state)

    def policy_path(self, iteration: int) -> Path:
        return self.out / "policies" / f"policy_iter_{iteration:03d}.pt"

    # --- data -----------------------------------------------------------------------------
    def data_rows(self) -> int:
        rows = 0
        for path in list_chunks(self.data):
            with np.load(path, allow_pickle=False) as npz:
                rows += len(npz["actions"])
        return rows

    def collect(self, it: int) -> None:
        args = self.args
        if self.state.get("collect_iteration") != it:  # the phase's goal is fixed once, so a rerun finishes it
            rows = self.data_rows()
            wanted = max(args.prefill_steps - rows, 0) if it == 0 else args.collect_steps
            self.state.update(collect_iteration=it, collect_target=rows + wanted)
            self.save_state()
        rows = self.data_rows()
        todo = self.state["collect_target"] - rows
        if todo <= 0:
            return
        policy_file = self.policy_path(it - 1)
        agent = None
        if it > 0 and policy_file.exists():
            agent, _ = agent_lib.load_policy(policy_file, args.device)
            agent.cfg.epsilon = args.epsilon
            agent.rng = np.random.default_rng([args.seed, it, rows])
        rng = np.random.default_rng([args.seed, it, rows, 1])
        env = PokemonEnv(rom=args.rom, resolution=args.resolution, episode_length=args.episode_length,
                         start_state_count=args.start_states)
        if args.collect_start_walk > 0:  # seeds of their own: evaluation walks from other states with [seed, i]
            env.start_states = walk_start_states(env, args.start_states, args.collect_start_walk,
                                                 seed=COLLECT_WALK_SEED + 1000 * args.seed + it)
        explorer = ExplorePolicy(rng)
        buffer = ChunkBuffer(min(args.save_interval, todo), args.resolution)
        stats = {"episodes": 0, "tiles": [], "badges": 0}
        done, collected, info = True, 0, {}
        for _ in tqdm(range(todo), desc=f"collect {it}", unit="step", dynamic_ncols=True):
            if done:
                if collected:
                    stats["tiles"].append(info["tiles_seen"])
                obs, info = env.reset(seed=int(rng.integers(2**31)))
                if agent is not None:
                    agent.reset()
                explorer.start_episode("stochastic")
                start, done = True, False
                stats["episodes"] += 1
            state = info["state"]
            if agent is not None:
                action = agent.act(obs)  # epsilon-random inside, the belief always gets the action taken
            else:
                action = explorer.act(obs, state)
            next_obs, reward, terminated, truncated, info = env.step(action)
            buffer.append(obs, state, action, reward, terminated, start)
            collected += 1
            if info["reward_terms"]["badge"] and self.state["first_badge_env_step"] is None:
                self.state["first_badge_env_step"] = rows + collected
            stats["badges"] += info["reward_terms"]["badge"]
            start, done, obs = False, terminated or truncated, next_obs
            if buffer.full() or collected == todo:
                self.write_chunk(buffer)
        stats["tiles"].append(info["tiles_seen"])
        env.close()
        self.state["collect_stats"] = {"policy": "agent" if agent is not None else "explore", "steps": collected,
                                       "episodes": stats["episodes"], "badges": stats["badges"],
                                       "mean_unique_tiles": float(np.mean(stats["tiles"]))}
        self.save_state()

    def write_chunk(self, buffer: ChunkBuffer) -> None:
        number = max([chunk_number(p) for p in list_chunks(self.data)], default=0) + 1
        temp = self.data / f"{TEMP_PREFIX}dreamer_{os.getpid()}.npz"
        buffer.save(temp)
        os.replace(temp, self.data / chunk_name(number))

    # --- world model ----------------------------------------------------------------------
    def world_model(self, it: int) -> None:
        args = self.args
        latest = self.wm_dir / "checkpoint_latest.pt"
        if not latest.exists() and args.wm_init:
            artifacts.copy_file(args.wm_init, latest)
        if self.state.get("wm_iteration") != it:
            done_epochs = checkpoint.load_checkpoint(latest, kind="rssm")["extra"]["epoch"] if latest.exists() else 0
            self.state.update(wm_iteration=it, wm_target_epochs=done_epochs + args.wm_epochs)
            self.save_state()
        command = [sys.executable, str(REPO / "scripts" / "train_rssm.py"), "--data-dir", str(self.data),
                   "--out-dir", str(self.wm_dir), "--epochs", str(self.state["wm_target_epochs"]),
                   "--steps-per-epoch", str(args.wm_steps), "--batch-size", str(args.wm_batch_size),
                   "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--seed", str(args.seed),
                   "--device", args.device, "--save-interval", "1000000", "--checkpoint-every", "25",
                   "--val-batches", "4"]
        command += ["--resume"] if latest.exists() else ["--preset", args.wm_preset]
        print("world model:", " ".join(command[1:]), flush=True)
        done = subprocess.run(command, cwd=REPO)
        if done.returncode != 0:
            raise UserError(f"world-model training failed (exit code {done.returncode}); see its output above; "
                            f"rerun this command to retry from {latest}")

    # --- policy ---------------------------------------------------------------------------
    def policy(self, it: int) -> None:
        args = self.args
        cfg = agent_lib.AgentConfig.from_dict(dict(
            algo=args.algo, horizon=args.imag_horizon, gamma=args.discount, lam=args.lambda_gae,
            entropy_scale=args.entropy_scale, actor_lr=args.lr, critic_lr=args.lr, intrinsic_scale=args.intrinsic_scale,
            reward=args.reward, novelty_memory=args.novelty_memory, actor_change=args.actor_change))
        wm = agent_lib.load_world_model(self.wm_dir / "checkpoint_latest.pt", args.device)
        previous = self.policy_path(it - 1)
        learner_state = None
        if it > 0 and previous.exists():
            agent, ckpt = agent_lib.load_policy(previous, args.device)
            learner_state = ckpt["extra"].get("learner")
            agent.reconfigure(cfg)
        else:
            torch.manual_seed(args.seed)
            agent = agent_lib.PolicyAgent(wm.cfg, cfg).to(args.device)
        agent.wm.load_state_dict(wm.state_dict())
        learner = agent_lib.Learner(agent).to(args.device)
        if learner_state is not None:
            learner.load_full_state(learner_state)
        ds = PokemonDataset(self.data, seq_len=args.seq_len)
        if agent.novelty is not None:  # the head reads this iteration's world model: refit it on all the data
            metrics = agent_lib.fit_novelty_head(agent.novelty, agent.wm, ds, cfg.novelty_memory,
                                                 steps=args.reward_fit_steps, batch_size=args.batch_size,
                                                 seed=args.seed + it, device=args.device)
            self.log.record({"iteration": it, **metrics}, epoch_end=False)
        agent_lib.train_in_imagination(agent, learner, ds, ds.window_starts, updates=args.policy_updates,
                                       batch_size=args.batch_size, seed=args.seed, device=args.device, log=self.log,
                                       log_every=50, desc=f"policy {it}")
        del ds
        path = agent_lib.save_policy(self.policy_path(it), agent, learner, extra={"iteration": it})
        artifacts.copy_file(path, self.out / "policy.pt")

    # --- evaluation -----------------------------------------------------------------------
    def evaluate(self, it: int) -> None:
        args = self.args
        agent, _ = agent_lib.load_policy(self.policy_path(it), args.device)
        settings = {"episodes": args.eval_episodes, "steps": args.eval_steps, "start_states": args.eval_start_states,
                    "start_walk": args.eval_start_walk, "seed": args.seed}
        saved = self.out / "baselines.json"  # the baselines of these settings, measured once
        baselines = json.loads(saved.read_text()) if saved.exists() else {}
        if baselines.get("settings") != settings:
            baselines = {}
        policies = ("agent",) if baselines else agent_lib.ALL_POLICIES
        results = agent_lib.evaluate(agent, rom=args.rom, policies=policies, episodes=args.eval_episodes,
                                     steps=args.eval_steps, start_state_count=args.eval_start_states,
                                     seed=args.seed, start_walk=args.eval_start_walk,
                                     video_path=self.out / f"eval_iter_{it:03d}.mp4")
        if not baselines:
            baselines = {"settings": settings, "results": {k: v for k, v in results.items() if k != "agent"}}
            artifacts.write_json(saved, baselines)
        results.update(baselines["results"])
        wm_record = {}
        wm_log = self.wm_dir / "metrics.jsonl"
        if wm_log.exists():
            last = [json.loads(line) for line in wm_log.read_text().splitlines() if '"loss/val"' in line]
            if last:
                wm_record = {f"wm/{k.split('/', 1)[1]}": last[-1][k] for k in ("loss/val", "loss/val_recon", "eval/psnr")
                             if k in last[-1]}
        record = {"iteration": it, "env_steps": self.data_rows(), **wm_record, **agent_lib.flat_eval_metrics(results),
                  "eval/start_walk": args.eval_start_walk,
                  "collect/mean_unique_tiles": self.state.get("collect_stats", {}).get("mean_unique_tiles"),
                  "first_badge_env_step": self.state["first_badge_env_step"]}
        self.log.record(record, epoch_end=False)
        best = self.state.get("best")  # the loop is unsteady: keep the policy that evaluated best (per setting)
        tiles = record["eval/agent/unique_tiles"]
        if best is None or best.get("settings") != settings or tiles > best["unique_tiles"]:
            artifacts.copy_file(self.policy_path(it), self.out / "best_policy.pt")
            self.state["best"] = {"iteration": it, "unique_tiles": tiles, "settings": settings}
            self.save_state()
        records = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()
                   if '"iteration"' in line and '"env_steps"' in line]
        agent_lib.plot_progress(records, self.out / "progress.png")
        artifacts.write_text(self.out / "progress.md", progress_table(records))

    def run(self) -> None:
        steps = {"collect": self.collect, "world_model": self.world_model, "policy": self.policy,
                 "evaluate": self.evaluate}
        while self.state["iteration"] < self.args.iterations:
            it, phase = self.state["iteration"], self.state["phase"]
            began = time.perf_counter()
            print(f"== iteration {it} phase {phase}", flush=True)
            steps[phase](it)
            self.log.record({"iteration_phase": f"{it}/{phase}", "perf/seconds": time.perf_counter() - began},
                            epoch_end=False)
            index = PHASES.index(phase) + 1
            if index == len(PHASES):
                self.state.update(iteration=it + 1, phase=PHASES[0])
            else:
                self.state["phase"] = PHASES[index]
            self.save_state()
        print(f"done: {self.state['iteration']} iterations; run folder {self.out}", flush=True)


def progress_table(records: list) -> str:
    keys = ("env_steps", "eval/start_walk", "eval/agent/unique_tiles", "eval/random/unique_tiles", "eval/agent/return",
            "eval/agent/maps", "eval/agent/badges")
    lines = ["| iteration | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in records:
        lines.append(f"| {r['iteration']} | " + " | ".join(f"{r.get(k, float('nan')):.2f}" if isinstance(r.get(k), float)
                                                          else str(r.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


@cli
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    identify_rom(args.rom)
    Loop(args).run()


if __name__ == "__main__":
    main()
