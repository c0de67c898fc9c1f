"""Play the game with a policy and write NPZ chunks of transitions (see dataset.py for the format).

Each worker process runs its own emulator for all its episodes and fills one preallocated
chunk at a time; a chunk is written under a temporary name and renamed into place by the
main process, which numbers the chunks and keeps manifest.json. Rerunning into the same
folder continues the numbering, and --total-steps counts what is already there.

    python scripts/collect_data.py --total-steps 20000 --workers 2 --policy explore
"""
import argparse
import ctypes
import json
import multiprocessing as mp
import os
import signal
import time
import traceback
from pathlib import Path
from queue import Empty

import numpy as np
from tqdm import tqdm

from dataset import ChunkBuffer, chunk_name, chunk_number, list_chunks
from env import ACTIONS, DEFAULT_ROM, PokemonEnv, identify_rom, parse_resolution, read_state_files
from errors import UserError, cli
from explorer import ExplorePolicy

MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp_"  # half-written files; removed at start
PROGRESS_EVERY = 50    # steps between progress messages from a worker


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rom", type=Path, default=DEFAULT_ROM, help="Game Boy ROM: the open cartridge (default) or Pokémon Red/Blue")
    p.add_argument("--checkpoint", type=Path, default=None, help="policy checkpoint, used only with --policy checkpoint")
    p.add_argument("--total-steps", type=int, default=200000, help="steps wanted in --out-dir in all (steps already there count)")
    p.add_argument("--episode-length", type=int, default=1000, help="steps per episode before a reset")
    p.add_argument("--save-interval", type=int, default=10000, help="steps per chunk file (also each worker's memory bound)")
    p.add_argument("--out-dir", type=Path, default=Path("data"), help="folder for transitions_NNNN.npz and manifest.json")
    p.add_argument("--ticks-per-action", type=int, default=24, help="emulator frames per step (the button is held 8)")
    p.add_argument("--det-prob", type=float, default=0.2, help="chance an episode uses the policy deterministically")
    p.add_argument("--rand-prob", type=float, default=0.1, help="chance an episode uses uniformly random actions")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own emulator")
    p.add_argument("--seed", type=int, default=0, help="seed of the policies and of the start-state choice")
    p.add_argument("--resolution", default="144x160", help="stored frame size HxW: 144x160 (native), 72x80, 36x40")
    p.add_argument("--policy", choices=("random", "explore", "checkpoint"), default="explore",
                   help="random actions, the scripted novelty-seeking explorer, or --checkpoint's policy")
    p.add_argument("--save-state", type=Path, nargs="+", default=None,
                   help="start save state file(s); default: made in memory from the ROM")
    p.add_argument("--start-states", type=int, default=4, help="start states made in memory when --save-state is not given")
    args = p.parse_args(argv)
    args.resolution = parse_resolution(args.resolution)
    for name in ("total_steps", "episode_length", "save_interval", "workers", "start_states"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if not (0 <= args.det_prob and 0 <= args.rand_prob and args.det_prob + args.rand_prob <= 1):
        raise UserError(f"--det-prob {args.det_prob} and --rand-prob {args.rand_prob} must be >= 0 and sum to at most 1")
    if args.policy == "checkpoint" and args.checkpoint is None:
        raise UserError("--policy checkpoint needs --checkpoint PATH")
    return args


# --- policies -----------------------------------------------------------------------------
class RandomPolicy:
    def __init__(self, rng):
        self.rng = rng

    def start_episode(self, mode: str) -> None:
        pass

    def act(self, obs, state) -> int:
        return int(self.rng.integers(len(ACTIONS)))


class CheckpointPolicy:
    """A trained policy from checkpoint.py: build_model(ckpt) must give an object with
    act(obs_uint8 (H, W, 3), deterministic: bool) -> int and reset() at episode start."""

    def __init__(self, path: Path, rng):
        try:
            import checkpoint
        except ImportError:
            raise UserError("--policy checkpoint needs checkpoint.py, which this checkout does not have yet; "
                            "use --policy explore") from None
        self.model = checkpoint.build_model(checkpoint.load_checkpoint(path, kind="policy"))
        if not hasattr(self.model, "act"):
            raise UserError(f"checkpoint {path} does not hold a policy with act(); pass a policy checkpoint")
        self.rng = rng

    def start_episode(self, mode: str) -> None:
        self.mode = mode
        if hasattr(self.model, "reset"):
            self.model.reset()

    def act(self, obs, state) -> int:
        if self.mode == "random":
            return int(self.rng.integers(len(ACTIONS)))
        return int(self.model.act(obs, deterministic=self.mode == "deterministic"))


def make_policy(args, rng):
    if args.policy == "random":
        return RandomPolicy(rng)
    if args.policy == "explore":
        return ExplorePolicy(rng)
    return CheckpointPolicy(args.checkpoint, rng)


def episode_mode(rng, det_prob: float, rand_prob: float) -> str:
    draw = rng.random()
    if draw < det_prob:
        return "deterministic"
    if draw < det_prob + rand_prob:
        return "random"
    return "stochastic"


# --- the folder: manifest, numbering, resuming -------------------------------------------
def write_json_atomic(path: Path, data) -> None:
    temp = path.with_name(TEMP_PREFIX + path.name)
    with open(temp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def count_rows(path: Path) -> int:
    """Rows of a chunk, from the header of its 'actions' array."""
    try:
        with np.load(path, allow_pickle=False) as npz, npz.zip.open("actions.npy") as member:
            version = np.lib.format.read_magic(member)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return int(header(member)[0][0])
    except Exception as err:
        raise UserError(f"chunk {path} is unreadable ({err}); delete it and rerun") from None


def open_folder(args, rom) -> dict:
    """Create or resume --out-dir: clean half-written files, check the settings match,
    and account for chunks renamed into place but not yet in the manifest."""
    out = args.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out-dir {out} cannot be created ({err.strerror}); choose a writable folder") from None
    for stray in out.glob(TEMP_PREFIX + "*"):
        stray.unlink()
    settings = {"rom_sha1": rom.sha1, "game": rom.game, "ticks_per_action": args.ticks_per_action,
                "resolution": list(args.resolution)}
    path = out / MANIFEST
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{path} is unreadable ({err}); delete it to rebuild it from the chunks") from None
        for key, value in settings.items():
            if manifest.get(key) != value:
                raise UserError(f"{out} holds data with {key} = {manifest.get(key)}, this run has {value}; "
                                "use another --out-dir or the same settings")
    else:
        manifest = {**settings, "chunks": []}
    known = {c["file"] for c in manifest["chunks"]}
    on_disk = list_chunks(out)
    manifest["chunks"] = [c for c in manifest["chunks"] if (out / c["file"]).exists()]
    for chunk in on_disk:
        if chunk.name not in known:  # renamed into place, then the run was killed
            manifest["chunks"].append({"file": chunk.name, "steps": count_rows(chunk), "recovered": True})
    manifest["chunks"].sort(key=lambda c: chunk_number(c["file"]))
    manifest["total_steps"] = sum(c["steps"] for c in manifest["chunks"])
    write_json_atomic(path, manifest)
    return manifest


# --- workers ------------------------------------------------------------------------------
def die_with_parent() -> None:
    """Ask Linux to kill this worker if the main process dies (e.g. SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_worker(worker: int, steps: int, args, run_tag: str, start_states, send, parent_pid=None) -> None:
    """Collect `steps` steps, sending ("progress", n), ("chunk", temp path, stats) and
    finally ("done", stats) through `send`."""
    rng = np.random.default_rng([args.seed, worker, args.resume_index])
    env = PokemonEnv(rom=args.rom, save_states=start_states, resolution=args.resolution,
                     ticks_per_action=args.ticks_per_action, episode_length=args.episode_length,
                     start_state_count=args.start_states)
    policy = make_policy(args, rng)
    buffer = ChunkBuffer(min(args.save_interval, steps), args.resolution)
    stats = {"episodes": 0, "battles": 0, "battles_won": 0, "badges": 0, "text_boxes": 0, "maps": set(), "reward": 0.0}
    chunk = {"episodes_started": 0, "maps": set()}
    chunks_written, unreported = 0, 0

    def flush():
        nonlocal chunk, chunks_written, unreported
        send(("progress", unreported))
        unreported = 0
        temp = args.out_dir / f"{TEMP_PREFIX}{run_tag}_w{worker}_{chunks_written}.npz"
        rows = buffer.size
        buffer.save(temp)
        send(("chunk", str(temp), {"steps": rows, "episodes_started": chunk["episodes_started"], "worker": worker,
                                   "maps": sorted(chunk["maps"])}))
        chunks_written += 1
        chunk = {"episodes_started": 0, "maps": set()}

    done = True
    for _ in range(steps):
        if done:
            obs, info = env.reset(seed=int(rng.integers(2**31)))
            policy.start_episode(episode_mode(rng, args.det_prob, args.rand_prob))
            episode_start, done = True, False
            stats["episodes"] += 1
            chunk["episodes_started"] += 1
        state = info["state"]
        action = policy.act(obs, state)
        next_obs, reward, terminated, truncated, info = env.step(action)
        buffer.append(obs, state, action, reward, terminated, episode_start)
        after = info["state"]
        stats["battles"] += after.in_battle and not state.in_battle
        stats["text_boxes"] += after.dialog_open and not state.dialog_open
        stats["battles_won"] += info["reward_terms"]["battle_won"]
        stats["badges"] += info["reward_terms"]["badge"]
        stats["maps"].add(state.map_id)
        chunk["maps"].add(state.map_id)
        stats["reward"] += reward
        episode_start, done, obs = False, terminated or truncated, next_obs
        unreported += 1
        if unreported == PROGRESS_EVERY:
            send(("progress", unreported))
            unreported = 0
        if buffer.full():
            flush()
            if parent_pid is not None and os.getppid() != parent_pid:
                return  # orphaned: the main process is gone
    if buffer.size:
        flush()
    env.close()
    stats["maps"] = sorted(stats["maps"])
    send(("done", stats))


def worker_main(worker, steps, args, run_tag, start_states, queue) -> None:
    die_with_parent()
    try:
        run_worker(worker, steps, args, run_tag, start_states, queue.put, parent_pid=os.getppid())
    except UserError as err:
        queue.put(("error", str(err), True))
    except BaseException:
        queue.put(("error", f"worker {worker} failed:\n{traceback.format_exc()}", False))


# --- main ---------------------------------------------------------------------------------
class Collector:
    """The main process's side: renames finished chunks into place and keeps the manifest."""

    def __init__(self, args, manifest):
        self.args, self.manifest = args, manifest
        self.next_number = max([chunk_number(c["file"]) for c in manifest["chunks"]], default=0) + 1
        self.summary = {"episodes": 0, "battles": 0, "battles_won": 0, "badges": 0, "text_boxes": 0, "maps": set(),
                        "reward": 0.0}

    def handle(self, message, bar) -> bool:
        """Process one worker message; True when a worker finished."""
        kind = message[0]
        if kind == "progress":
            bar.update(message[1])
        elif kind == "chunk":
            _, temp, stats = message
            name = chunk_name(self.next_number)
            self.next_number += 1
            os.replace(temp, self.args.out_dir / name)
            self.manifest["chunks"].append({"file": name, **stats, "policy": self.args.policy, "seed": self.args.seed})
            self.manifest["total_steps"] += stats["steps"]
            write_json_atomic(self.args.out_dir / MANIFEST, self.manifest)
        elif kind == "done":
            stats = message[1]
            for key in ("episodes", "battles", "battles_won", "badges", "text_boxes", "reward"):
                self.summary[key] += stats[key]
            self.summary["maps"].update(stats["maps"])
            return True
        elif kind == "error":
            _, text, is_user_error = message
            raise UserError(text) if is_user_error else RuntimeError(text)
        return False


def main(argv=None):
    args = parse_args(argv)
    rom = identify_rom(args.rom)
    if args.policy == "checkpoint":
        CheckpointPolicy(args.checkpoint, None)  # fail now, not in a worker
    start_states = None
    if args.save_state:
        PokemonEnv(rom=args.rom, save_states=args.save_state).close()  # a bad state file is named now, not in a worker
        start_states = read_state_files(args.save_state)  # bytes, shared by the workers
    manifest = open_folder(args, rom)
    already = manifest["total_steps"]
    remaining = args.total_steps - already
    args.resume_index = len(manifest["chunks"])  # new data on a rerun, not a replay of the old
    print(f"{args.out_dir}: {already} steps in {len(manifest['chunks'])} chunks already; collecting {max(remaining, 0)} more "
          f"({rom.game}, {args.resolution[0]}x{args.resolution[1]}, policy {args.policy}, {args.workers} worker(s))")
    if remaining <= 0:
        return
    manifest.update(policy=args.policy, seed=args.seed, episode_length=args.episode_length)
    shares = [remaining // args.workers + (i < remaining % args.workers) for i in range(args.workers)]
    shares = [s for s in shares if s > 0]
    collector = Collector(args, manifest)
    run_tag = f"{os.getpid()}_{int(time.time())}"
    began = time.time()
    with tqdm(total=remaining, unit="step", desc="collect", dynamic_ncols=True) as bar:
        if len(shares) == 1:
            def send(message):
                collector.handle(message, bar)
            run_worker(0, shares[0], args, run_tag, start_states, send)
        else:
            context = mp.get_context("fork")
            queue = context.Queue()
            processes = [context.Process(target=worker_main, args=(w, share, args, run_tag, start_states, queue),
                                         daemon=True) for w, share in enumerate(shares)]
            for process in processes:
                process.start()
            finished = 0
            try:
                while finished < len(processes):
                    try:
                        message = queue.get(timeout=10)
                    except Empty:
                        dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                        if dead:
                            raise RuntimeError(f"a worker died (exit code {dead[0]}) without a word") from None
                        continue
                    finished += collector.handle(message, bar)
            finally:
                for process in processes:
                    if process.is_alive() and finished < len(processes):
                        process.kill()
                    process.join()
    seconds = time.time() - began
    s = collector.summary
    maps = ", ".join(f"0x{m:02X}" for m in sorted(s["maps"]))
    print(f"done: {remaining} steps in {seconds:.1f} s ({remaining / seconds:.0f} steps/s), {s['episodes']} episodes, "
          f"maps seen [{maps}], {s['battles']} battles ({s['battles_won']} won), {s['badges']} badges, "
          f"{s['text_boxes']} text boxes, reward {s['reward']:.1f}; "
          f"{manifest['total_steps']} steps in {len(manifest['chunks'])} chunks in {args.out_dir}")


if __name__ == "__main__":
    cli(main)()
