"""How predictable is the logged future at all? The floor of evaluate_rssm.py's drift, measured in the emulator.

    python scripts/predictability.py --save-state outputs/demo/start.state --data-dir outputs/demo/data

The open cartridge is deterministic but for its random numbers (wild battles, NPC walks, damage), drawn
from one xorshift state in RAM (`wRandom`). For the same held-out windows evaluate_rssm.py scores (same
split, seed, --context, --horizon, --max-sequences), each episode is replayed from the start state with its
logged actions; the replay must reproduce the logged places, else one error line (the data came from another
ROM or start state, or an episode was cut across chunks: collect with --save-interval a multiple of
--episode-length, as make demo does). At each window's last context frame the random state is redrawn
--draws times and the window's logged actions are played on from there. Per step k = 1..K: the Manhattan
tile error of one such future against the logged one, and of the per-coordinate median of the draws (the
best single guess a model that knows everything but the random state could make, estimated), on all windows
and on the quiet ones (`dataset.quiet_windows`, as evaluate_rssm.py); and the no-move baseline. A world
model's imagined tile error cannot go below this floor except by chance. Writes results.json and results.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

import artifacts
import env as environment
from dataset import PokemonDataset, evenly, quiet_windows
from errors import UserError, cli
from game_state import read_state
from save_states import load_state_bytes, save_state_bytes

RANDOM_STATE = 0xD900  # the cartridge's wRandom, 16-bit little-endian (cartridge/main.c)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rom", type=Path, default=environment.DEFAULT_ROM, help="the ROM the data was collected on")
    p.add_argument("--save-state", type=Path, required=True, help="the start state the data was collected from")
    p.add_argument("--data-dir", default="data", help="folder of transitions_NNNN.npz chunks")
    p.add_argument("--val-split", type=float, default=0.1, help="fraction of episodes held out (as in training)")
    p.add_argument("--seed", type=int, default=0, help="seed of the episode split (as evaluate_rssm.py) and the draws")
    p.add_argument("--episodes", choices=("val", "train"), default="val", help="score held-out or training windows")
    p.add_argument("--horizon", type=int, default=50, help="K: steps after the last context frame")
    p.add_argument("--context", type=int, default=1, help="frames before the redraw (as evaluate_rssm.py)")
    p.add_argument("--max-sequences", type=int, default=256, help="windows to replay (as evaluate_rssm.py)")
    p.add_argument("--draws", type=int, default=8, help="random states drawn per window")
    p.add_argument("--ticks-per-action", type=int, default=24, help="frames per action (as collect_data.py)")
    p.add_argument("--out-dir", default="outputs/predictability", help="where results.json / .md go")
    args = p.parse_args(argv)
    if args.horizon < 1 or args.context < 1 or args.draws < 1 or args.max_sequences < 1:
        raise UserError("--horizon, --context, --draws and --max-sequences must be at least 1")
    return args


def place(state) -> tuple[int, int, int]:
    return state.map_id, state.x, state.y


def replay(env, ds: PokemonDataset, windows: np.ndarray, context: int, horizon: int, draws: int,
           rng: np.random.Generator) -> np.ndarray:
    """(W, draws, horizon, 3) (map, x, y) after each of the logged actions from each window's frame
    context - 1 on, the random state redrawn there."""
    a, seg = ds.arrays, ds.segment_ids
    out = np.zeros((len(windows), draws, horizon, 3), np.int64)
    episode = first = row = None
    for wi in tqdm(np.argsort(windows, kind="stable"), desc="replaying", unit="window"):
        start = int(windows[wi]) + context - 1  # the last context frame
        if seg[start] != episode:  # another episode: from the start state
            episode = seg[start]
            first = row = int(np.searchsorted(seg, episode))
            env.reset(options={"state_index": 0})
        while True:
            logged = (int(a["map_ids"][row]), int(a["xs"][row]), int(a["ys"][row]))
            if place(env.state) != logged:
                raise UserError(f"replaying episode {episode} with its logged actions leaves the logged path at its "
                                f"step {row - first} ({place(env.state)} against {logged}): collect the data from "
                                "this --save-state and --rom, one start state, --save-interval a multiple of "
                                "--episode-length (an episode cut across chunks cannot be replayed from its start)")
            if row == start:
                break
            env.step(int(a["actions"][row]))
            row += 1
        saved = save_state_bytes(env.pyboy)
        for d in range(draws):
            load_state_bytes(env.pyboy, saved)
            value = int(rng.integers(1, 1 << 16))  # xorshift's state must not be 0
            env.pyboy.memory[RANDOM_STATE], env.pyboy.memory[RANDOM_STATE + 1] = value & 0xFF, value >> 8
            for k in range(horizon):
                environment.step_emulator(env.pyboy, int(a["actions"][start + k]), env.ticks_per_action)
                out[wi, d, k] = place(read_state(env.pyboy, env.rom.game))
        load_state_bytes(env.pyboy, saved)
    return out


def floor_errors(futures: np.ndarray, logged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """futures (W, draws, K, 3), logged (W, K, 3) (map, x, y) -> Manhattan tile errors (W, K) of one drawn
    future (mean over draws) and of the rounded per-coordinate median of the draws (as evaluate_rssm.py,
    x and y are compared whatever the map)."""
    drawn = np.abs(futures[..., 1:] - logged[:, None, :, 1:]).sum(-1).mean(1)
    median = np.round(np.median(futures[..., 1:], axis=1))
    return drawn, np.abs(median - logged[..., 1:]).sum(-1)


@cli
def main(argv=None):
    args = parse_args(argv)
    info = environment.identify_rom(args.rom)
    if info.game != "cartridge":
        raise UserError(f"{args.rom} is Pokémon {info.game.title()}: this measurement knows the open cartridge's "
                        "random state only; use the cartridge's data (make demo)")
    C, K = args.context, args.horizon
    ds = PokemonDataset(args.data_dir, seq_len=C + K)
    train_starts, val_starts = ds.split(args.val_split, seed=args.seed)
    starts = val_starts if args.episodes == "val" else train_starts
    if len(starts) == 0:
        raise UserError(f"{args.data_dir}: no {args.episodes} windows of {C + K} steps; lower --horizon")
    windows = evenly(starts, args.max_sequences)
    env = environment.PokemonEnv(args.rom, save_states=[args.save_state], episode_length=10 ** 9,
                                 ticks_per_action=args.ticks_per_action)
    try:
        futures = replay(env, ds, windows, C, K, args.draws, np.random.default_rng(args.seed))
    finally:
        env.close()
    batch = ds.get_batch(windows, keys=("map_ids", "xs", "ys", "in_battles", "dialog_opens"))  # (W, C + K)
    places = np.stack([batch[key].numpy() for key in ("map_ids", "xs", "ys")], -1)  # (W, C + K, 3)
    logged = places[:, C:]  # the scored frames C .. C + K - 1
    drawn, median = floor_errors(futures, logged)
    stay = np.abs(logged[..., 1:] - places[:, C - 1:C, 1:]).sum(-1)  # the no-move baseline
    quiet = quiet_windows(batch).numpy()
    steps = [{"k": k + 1, "drawn": float(drawn[:, k].mean()), "median": float(median[:, k].mean()),
              "stay": float(stay[:, k].mean()),
              "quiet_drawn": float(drawn[quiet, k].mean()) if quiet.any() else None,
              "quiet_median": float(median[quiet, k].mean()) if quiet.any() else None} for k in range(K)]
    out = Path(args.out_dir)
    artifacts.write_json(out / "results.json", {"data_dir": str(args.data_dir), "episodes": args.episodes,
                                                "context": C, "horizon": K, "draws": args.draws,
                                                "windows": len(windows), "quiet_windows": int(quiet.sum()),
                                                "steps": steps})
    lines = [f"# The game's own unpredictability on {len(windows)} {args.episodes} windows ({int(quiet.sum())} quiet), "
             f"{args.draws} random states each", "",
             "| k | one drawn future | median of the draws | quiet: drawn | quiet: median | no-move |",
             "|---|---|---|---|---|---|"]
    for s in steps:
        q = [f"{s[key]:.2f}" if s[key] is not None else "-" for key in ("quiet_drawn", "quiet_median")]
        lines.append(f"| {s['k']} | {s['drawn']:.2f} | {s['median']:.2f} | {q[0]} | {q[1]} | {s['stay']:.2f} |")
    artifacts.write_text(out / "results.md", "\n".join(lines) + "\n")
    for k in sorted({min(29, K), K}):
        s = steps[k - 1]
        print(f"step {k}: one drawn future {s['drawn']:.2f} tiles off the logged one, the draws' median {s['median']:.2f}"
              f" (no-move {s['stay']:.2f})", flush=True)
    print(f"wrote {out / 'results.md'}, results.json", flush=True)


if __name__ == "__main__":
    main()
