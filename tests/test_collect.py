"""scripts/collect_data.py end to end: ROM refusals (exit 2), two workers, the data's RAM fields
against its frames, a SIGKILL mid-chunk and the rerun that continues, and the explorer."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import REPO, run_script

from dataset import PokemonDataset, list_chunks


def load_rows(folder):
    """All chunks of `folder` concatenated: dict of arrays, plus the file index of every row."""
    rows, files = {}, []
    for number, path in enumerate(list_chunks(folder)):
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                rows.setdefault(key, []).append(npz[key])
            files.append(np.full(len(npz["actions"]), number))
    return {key: np.concatenate(parts) for key, parts in rows.items()}, np.concatenate(files)


def test_rom_refusals_exit_2(tmp_path, cartridge_rom):
    text = tmp_path / "notes.txt"
    text.write_text("not a game boy rom\n")
    truncated = tmp_path / "truncated.gb"
    truncated.write_bytes(cartridge_rom.read_bytes()[:20000])
    unknown = tmp_path / "unknown.gb"
    rom = bytearray(cartridge_rom.read_bytes())
    rom[-1] ^= 0xFF  # outside the header: the checksum still holds, the SHA-1 does not
    unknown.write_bytes(rom)
    cases = [(text, "not a multiple of 16 KiB"), (truncated, "20000 bytes, not a multiple of 16 KiB"),
             (unknown, "not a supported game")]
    for path, message in cases:
        done = run_script("collect_data.py", "--rom", path, "--out-dir", tmp_path / "out", "--total-steps", 10)
        assert done.returncode == 2, done.stderr
        assert f"error: ROM {path}" in done.stderr and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_two_workers_write_consistent_chunks(tmp_path, cartridge_rom):
    out = tmp_path / "data"
    done = run_script("collect_data.py", "--rom", cartridge_rom, "--out-dir", out, "--workers", 2,
                      "--total-steps", 400, "--save-interval", 100, "--episode-length", 120, "--seed", 1,
                      "--resolution", "72x80", "--start-states", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 400 steps" in done.stdout and "steps/s" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["file"] for c in manifest["chunks"]] == [f"transitions_{n:04d}.npz" for n in range(1, 5)]
    assert {c["worker"] for c in manifest["chunks"]} == {0, 1}
    assert manifest["total_steps"] == 400 and manifest["resolution"] == [72, 80]
    assert manifest["ticks_per_action"] == 24 and len(manifest["rom_sha1"]) == 40

    rows, files = load_rows(out)
    assert rows["obs"].shape == (400, 72, 80, 3) and rows["obs"].dtype == np.uint8
    assert rows["episode_starts"][np.r_[0, np.flatnonzero(np.diff(files)) + 1]].all()
    # consecutive rows of one episode: at most one tile per step unless the map changed
    same = ~rows["episode_starts"][1:]
    same_map = same & (rows["map_ids"][1:] == rows["map_ids"][:-1])
    dist = np.abs(np.diff(rows["xs"].astype(int))) + np.abs(np.diff(rows["ys"].astype(int)))
    assert (dist[same_map] <= 1).all()
    # and the frames agree: a step that moved the player changed the picture
    moved = same_map & (dist == 1)
    assert moved.sum() > 20
    changed = np.abs(np.diff(rows["obs"].astype(np.int16), axis=0)).reshape(399, -1).max(axis=1) > 0
    assert changed[moved].all()
    assert rows["rewards"].sum() > 0  # real rewards, not the original's zeros
    assert (rows["actions"] < 8).all()


def test_sigkill_leaves_complete_chunks_and_rerun_continues(tmp_path, cartridge_rom, start_state_file):
    out = tmp_path / "data"
    command = [sys.executable, str(REPO / "scripts" / "collect_data.py"), "--rom", str(cartridge_rom),
               "--out-dir", str(out), "--total-steps", "100000", "--save-interval", "60", "--resolution", "36x40",
               "--save-state", str(start_state_file), "--episode-length", "50"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list_chunks(out) if out.exists() else []) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)  # into the next chunk
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    chunks = list_chunks(out)
    assert len(chunks) >= 2
    have = PokemonDataset(out, seq_len=5).num_rows  # every chunk on disk is complete and loadable
    (out / ".tmp_stray_w0_0.npz").write_bytes(b"half a file")
    before = len(chunks)

    done = run_script("collect_data.py", "--rom", cartridge_rom, "--out-dir", out, "--total-steps", have + 30,
                      "--save-interval", 60, "--resolution", "36x40", "--save-state", start_state_file,
                      "--episode-length", 50)
    assert done.returncode == 0, done.stderr[-3000:]
    chunks = list_chunks(out)
    assert [c.name for c in chunks] == [f"transitions_{n:04d}.npz" for n in range(1, before + 2)]
    assert not list(out.glob(".tmp*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_steps"] == have + 30 == PokemonDataset(out, seq_len=5).num_rows

    again = run_script("collect_data.py", "--rom", cartridge_rom, "--out-dir", out, "--total-steps", 10,
                       "--resolution", "72x80")
    assert again.returncode == 2 and "resolution" in again.stderr and "use another --out-dir" in again.stderr


def test_fixture_data_explores(collected_data):
    """The explorer's 600 fixture steps leave the start map, meet text and earn rewards."""
    rows, _ = load_rows(collected_data("36x40"))
    assert len(set(rows["map_ids"].tolist())) >= 2
    assert rows["dialog_opens"].any()
    assert rows["rewards"].sum() > 0
    assert len(set(zip(rows["map_ids"].tolist(), rows["xs"].tolist(), rows["ys"].tolist()))) > 100


def test_explorer_reaches_the_maps_battles_and_text(cartridge_rom):
    """A small version of the 20,000-step coverage figure: 3,000 steps, episodes of 1,000."""
    from env import PokemonEnv
    from explorer import ExplorePolicy

    env = PokemonEnv(rom=cartridge_rom, resolution="36x40", episode_length=1000, start_state_count=4)
    policy = ExplorePolicy(np.random.default_rng(0))
    maps, battles, text_boxes, done = set(), 0, 0, True
    try:
        for _ in range(3000):
            if done:
                obs, info = env.reset(seed=len(maps))
                policy.start_episode("stochastic")
            before = info["state"]
            obs, _, terminated, truncated, info = env.step(policy.act(obs, before))
            after, done = info["state"], terminated or truncated
            maps.add(after.map_id)
            battles += after.in_battle and not before.in_battle
            text_boxes += after.dialog_open and not before.dialog_open
    finally:
        env.close()
    assert {0x00, 0x01, 0x02, 0x03} <= maps
    assert battles >= 1 and text_boxes >= 10
