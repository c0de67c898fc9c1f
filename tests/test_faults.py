"""Faults and bad input: SIGKILL at random points (collector and trainer) loses and duplicates nothing;
every bad input is exit code 2 with one line naming the problem; a non-finite loss stops training
cleanly; random bytes and mangled files make the loaders raise UserError and nothing else; a
collector worker's memory stays flat from chunk to chunk.
"""
import errno
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import checkpoint
from conftest import REPO, load_script
from dataset import CHUNK_FIELDS, PokemonDataset, chunk_name, list_chunks, write_npz
from env import _header_checksum, identify_rom
from errors import UserError, cli
from models import RSSMConfig, WorldModel

torch.set_num_threads(1)
TINY_TRAIN = ["--preset", "tiny", "--threads", "1", "--batch-size", "2", "--seq-len", "4", "--val-split", "0"]


# --- helpers ----------------------------------------------------------------------------------
def exit_2(capsys, name: str, *args) -> str:
    """Run scripts/<name>.py's main(args) as its __main__ would; assert exit code 2 with exactly one
    `error:` line and no traceback; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        cli(load_script(name).main)([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def patched_rom(rom: bytes, title: bytes = b"OTHERGAME") -> bytes:
    """The cartridge with another title and a correct header checksum: a valid ROM of an unknown game."""
    other = bytearray(rom)
    other[0x134:0x134 + len(title)] = title
    other[0x14D] = _header_checksum(other)
    return bytes(other)


def small_chunk(rows: int = 6, resolution=(8, 8)) -> dict:
    rng = np.random.default_rng(rows)
    arrays = {}
    for key, (dtype, shape) in CHUNK_FIELDS.items():
        shape = (*resolution, 3) if key == "obs" else shape
        arrays[key] = rng.integers(0, 2, (rows, *shape)).astype(dtype)
    return arrays


def chunk_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    write_npz(buffer, arrays)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data_dir(collected_data):
    return collected_data("144x160")


@pytest.fixture(scope="module")
def rssm_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset("tiny"))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    return checkpoint.save_checkpoint(path, kind="rssm", config=wm.cfg.to_dict(), model_state=wm.state_dict())


# --- SIGKILL at random points -------------------------------------------------------------------
def check_folder(out: Path) -> int:
    """Every chunk on disk is complete and loadable; the manifest lists only chunks on disk, with
    their row counts (a chunk renamed into place just before the kill may be missing from it: the
    next run recovers it). Returns the rows on disk."""
    chunks = list_chunks(out)
    if not chunks:
        return 0
    rows = PokemonDataset(out, seq_len=1).num_rows
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {c.name for c in chunks}
    listed = [c["file"] for c in manifest["chunks"]]
    assert set(listed) <= on_disk
    assert len(on_disk - set(listed)) <= 2, "more chunks unlisted than workers could have renamed at the kill"
    for entry in manifest["chunks"]:
        with np.load(out / entry["file"]) as npz:
            assert len(npz["actions"]) == entry["steps"]
    assert manifest["total_steps"] == sum(c["steps"] for c in manifest["chunks"])
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collector_killed_at_a_random_point_resumes_to_the_same_total(seed, tmp_path, cartridge_rom, start_state_file):
    rng = np.random.default_rng(seed)
    workers = 1 + seed % 2
    total = 240
    out = tmp_path / "data"
    args = ["--rom", cartridge_rom, "--out-dir", out, "--total-steps", total, "--save-interval", 40,
            "--episode-length", 30, "--resolution", "36x40", "--save-state", start_state_file, "--workers", workers,
            "--seed", seed, "--policy", "random"]
    command = [sys.executable, str(REPO / "scripts" / "collect_data.py"), *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill at a random moment of the run: before the first chunk, or between/within later ones
    deadline = time.time() + 60
    wanted = int(rng.integers(0, 4))  # chunks to wait for before the random extra delay
    while process.poll() is None and time.time() < deadline and len(list_chunks(out) if out.exists() else []) < wanted:
        time.sleep(0.02)
    time.sleep(float(rng.uniform(0, 0.5)))
    process.send_signal(signal.SIGKILL)
    process.wait()
    check_folder(out)
    for orphan in range(50):  # workers die with the main process (PR_SET_PDEATHSIG)
        if not any(p.name.startswith(".tmp_") for p in out.glob("*")) or orphan == 49:
            break
        time.sleep(0.02)

    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert check_folder(out) == total
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_steps"] == total
    chunks = list_chunks(out)
    assert [c.name for c in chunks] == [chunk_name(n) for n in range(1, len(chunks) + 1)]  # no gaps, no doubles
    assert not list(out.glob(".tmp_*"))
    frames = [np.load(c)["obs"] for c in chunks]
    digests = {f.tobytes() for f in frames}
    assert len(digests) == len(frames), "two chunks hold the same frames: the rerun replayed old data"


@pytest.mark.parametrize("seed", [0, 1])
def test_trainer_killed_at_a_random_point_resumes_to_the_same_step(seed, data_dir, tmp_path):
    out = tmp_path / "run"
    steps = 6
    args = [*TINY_TRAIN, "--data-dir", data_dir, "--max-files", 1, "--out-dir", out, "--epochs", 1,
            "--steps-per-epoch", steps, "--checkpoint-every", 1, "--seed", seed]
    command = [sys.executable, str(REPO / "scripts" / "train_rssm.py"), *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = np.random.default_rng(seed)
    latest, deadline = out / "checkpoint_latest.pt", time.time() + 120
    while process.poll() is None and not latest.exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(float(rng.uniform(0, 1.0)))  # somewhere in the run, perhaps mid-write of a checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait()
    if latest.exists():
        assert checkpoint.load_checkpoint(latest, kind="rssm")["step"] <= steps  # never half-written

    done = subprocess.run([*command, "--resume"] if latest.exists() else command, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = checkpoint.load_checkpoint(latest, kind="rssm")
    assert final["step"] == steps
    checkpoint.build_model(final)
    checkpoint.build_model(checkpoint.load_checkpoint(out / "best_world_model.pt", kind="rssm"))
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(logged) and logged[-1] == steps


# --- bad input: exit code 2, one line naming the problem ----------------------------------------
@pytest.mark.parametrize("case", ["missing", "unreadable", "truncated", "not_16k", "bad_checksum", "unknown_game"])
def test_bad_rom_exit_2(case, tmp_path, cartridge_rom, capsys):
    rom = cartridge_rom.read_bytes()
    path = tmp_path / f"{case}.gb"
    expected = {"missing": "does not exist", "unreadable": "cannot be read", "truncated": "not a multiple of 16 KiB",
                "not_16k": "not a multiple of 16 KiB", "bad_checksum": "bad header checksum",
                "unknown_game": "not a supported game"}[case]
    if case == "unreadable":
        path.mkdir()  # tests run as root: a directory is what cannot be read as a file
    elif case == "truncated":
        path.write_bytes(rom[: len(rom) // 2 + 100])
    elif case == "not_16k":
        path.write_bytes(rom + b"\0")
    elif case == "bad_checksum":
        path.write_bytes(rom[:0x14D] + bytes([rom[0x14D] ^ 0xFF]) + rom[0x14E:])
    elif case == "unknown_game":
        path.write_bytes(patched_rom(rom))
    line = exit_2(capsys, "collect_data", "--rom", path, "--out-dir", tmp_path / "out", "--total-steps", 5)
    assert str(path) in line and expected in line, line
    assert not (tmp_path / "out").exists()


def test_garbage_save_state_exit_2(tmp_path, cartridge_rom, capsys):
    state = tmp_path / "garbage.state"
    state.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    line = exit_2(capsys, "collect_data", "--rom", cartridge_rom, "--save-state", state, "--out-dir", tmp_path / "out",
                  "--total-steps", 5)
    assert "does not load" in line, line
    assert "garbage.state" in line, line


def test_save_state_of_another_pyboy_version_exit_2(tmp_path, cartridge_rom, start_state, capsys):
    state = tmp_path / "newer.state"
    state.write_bytes(bytes([start_state[0] + 1]) + start_state[1:])  # the first byte is PyBoy's state version
    line = exit_2(capsys, "collect_data", "--rom", cartridge_rom, "--save-state", state, "--out-dir", tmp_path / "out",
                  "--total-steps", 5)
    assert "version" in line, line
    assert "newer.state" in line, line


def test_save_state_of_another_game_exit_2(tmp_path, cartridge_rom, capsys):
    from pyboy import PyBoy

    other = tmp_path / "other.gb"
    other.write_bytes(patched_rom(cartridge_rom.read_bytes()))
    pyboy = PyBoy(str(other), window="null", sound_emulated=False)
    pyboy.tick(120, False)
    state = tmp_path / "other_game.state"
    with open(state, "wb") as f:
        pyboy.save_state(f)
    pyboy.stop(save=False)
    line = exit_2(capsys, "collect_data", "--rom", cartridge_rom, "--save-state", state, "--out-dir", tmp_path / "out",
                  "--total-steps", 5)
    assert "other_game.state" in line


def test_empty_data_folder_exit_2(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    line = exit_2(capsys, "train_rssm", *TINY_TRAIN, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "run")
    assert str(tmp_path / "data") in line and "no transitions" in line, line


@pytest.mark.parametrize("case", ["garbage", "truncated", "wrong_shape", "missing_key"])
def test_bad_chunk_exit_2_naming_it(case, data_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    first = list_chunks(data_dir)[0]
    shutil.copy(first, folder / chunk_name(1))
    bad = folder / chunk_name(2)
    good = first.read_bytes()
    if case == "garbage":
        bad.write_bytes(b"PK\x03\x04" + bytes(1000))
    elif case == "truncated":
        bad.write_bytes(good[: len(good) * 2 // 3])
    else:
        with np.load(first) as npz:
            arrays = {key: npz[key] for key in npz.files}
        if case == "wrong_shape":
            arrays["obs"] = arrays["obs"][:, ::2]  # (N, 72, 160, 3): not the folder's resolution
        else:
            del arrays["party_hps"]
        bad.write_bytes(chunk_bytes(arrays))
    line = exit_2(capsys, "train_rssm", *TINY_TRAIN, "--data-dir", folder, "--out-dir", tmp_path / "run")
    assert chunk_name(2) in line, line


def test_checkpoint_carrying_a_pickle_payload_is_refused(data_dir, tmp_path, capsys):
    path = tmp_path / "evil.pt"
    marker = tmp_path / "code_ran"
    torch.save({"format": checkpoint.FORMAT, "kind": "rssm", "payload": RunsCode(str(marker))}, path)
    line = exit_2(capsys, "evaluate_rssm", "--checkpoints", path, "--data-dir", data_dir, "--horizon", 3,
                  "--out-dir", tmp_path / "eval", "--threads", 1)
    assert "evil.pt" in line and "pickled" in line, line
    assert not marker.exists(), "loading the checkpoint ran its code"


class RunsCode:
    """Unpickling this creates a file: proof that a loader ran code from the checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_checkpoint_of_another_architecture_says_what_differs(rssm_checkpoint, data_dir, tmp_path, capsys):
    ckpt = checkpoint.load_checkpoint(rssm_checkpoint)
    other = tmp_path / "other.pt"
    checkpoint.save_checkpoint(other, kind="rssm", config=dict(ckpt["config"], deter=48),
                               model_state=ckpt["model_state"])
    line = exit_2(capsys, "evaluate_rssm", "--checkpoints", other, "--data-dir", data_dir, "--horizon", 3,
                  "--out-dir", tmp_path / "eval", "--threads", 1)
    assert "another architecture" in line and "different shapes" in line and "rssm.cell" in line, line


def test_checkpoint_of_another_kind_exit_2(rssm_checkpoint, data_dir, tmp_path, capsys):
    ckpt = checkpoint.load_checkpoint(rssm_checkpoint)
    other = tmp_path / "vae.pt"
    checkpoint.save_checkpoint(other, kind="vae", config={}, model_state=ckpt["model_state"])
    line = exit_2(capsys, "evaluate_rssm", "--checkpoints", other, "--data-dir", data_dir, "--horizon", 3,
                  "--out-dir", tmp_path / "eval", "--threads", 1)
    assert "'vae' checkpoint" in line and "'rssm'" in line, line


@pytest.mark.parametrize("name, args, expected", [
    ("collect_data", ["--total-steps", "-5"], "--total-steps -5 must be at least 1"),
    ("collect_data", ["--workers", "0"], "--workers 0 must be at least 1"),
    ("collect_data", ["--episode-length", "0"], "--episode-length 0 must be at least 1"),
    ("train_rssm", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("train_rssm", ["--seq-len", "500"], "seq_len 500 is longer than every episode"),
    ("train_rssm", ["--val-split", "1.5"], "--val-split"),
])
def test_flag_out_of_range_exit_2(name, args, expected, data_dir, tmp_path, capsys):
    common = (["--out-dir", tmp_path / "out"] if name == "collect_data"
              else [*TINY_TRAIN, "--data-dir", data_dir, "--out-dir", tmp_path / "out"])
    line = exit_2(capsys, name, *common, *args)
    assert expected in line, line


@pytest.mark.parametrize("name", [
    "collect_data",
    "train_rssm"])
def test_output_folder_that_cannot_be_written_exit_2(name, data_dir, cartridge_rom, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file where a folder should be")
    out = blocker / "run"
    if name == "collect_data":
        args = ["--rom", cartridge_rom, "--out-dir", out, "--total-steps", 5]
    else:
        args = [*TINY_TRAIN, "--data-dir", data_dir, "--out-dir", out, "--epochs", 1, "--steps-per-epoch", 1]
    line = exit_2(capsys, name, *args)
    assert str(out) in line, line


# --- non-finite losses ----------------------------------------------------------------------------
def test_training_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    line = exit_2(capsys, "train_rssm", *TINY_TRAIN, "--data-dir", data_dir, "--out-dir", out, "--epochs", 1,
                  "--steps-per-epoch", 30, "--checkpoint-every", 1, "--lr", "1e30")
    assert "non-finite loss at step" in line and "checkpoint_latest.pt" in line, line
    bad_step = int(line.split("non-finite loss at step ")[1].split()[0])
    assert any(f"{name}=" in line for name in ("recon", "kl_dyn", "reward", "cont", "total")), line
    latest = checkpoint.load_checkpoint(out / "checkpoint_latest.pt", kind="rssm")
    assert latest["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in latest["model_state"].values() if v.is_floating_point())
    checkpoint.build_model(latest)


def test_a_chunk_with_an_inf_reward_is_refused_or_stops_training(data_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    with np.load(list_chunks(data_dir)[0]) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["rewards"][:] = np.inf
    (folder / chunk_name(1)).write_bytes(chunk_bytes(arrays))
    line = exit_2(capsys, "train_rssm", *TINY_TRAIN, "--data-dir", folder, "--out-dir", tmp_path / "run",
                  "--epochs", 1, "--steps-per-epoch", 3)
    assert chunk_name(1) in line or "non-finite loss" in line, line


# --- random bytes and mangled files: UserError, never another exception ---------------------------
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
GOOD_CHUNK = chunk_bytes(small_chunk())


def mangle(data: bytes, draw) -> bytes:
    """Flip, cut or splice bytes of `data` as `draw` (hypothesis data) decides."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "splice", "zero"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if how == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            data = data[:at]
        elif how == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif data:
            data[at:at + 16] = bytes(len(data[at:at + 16]))
    return bytes(data)


def loads_or_user_error(load) -> None:
    try:
        load()
    except UserError:
        pass


@FUZZ
@given(data=st.data())
def test_dataset_fuzz_only_user_errors(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_data")
    raw = data.draw(st.one_of(st.binary(max_size=2000), st.just(None)))
    (folder / chunk_name(1)).write_bytes(GOOD_CHUNK if raw is not None else mangle(GOOD_CHUNK, data.draw))
    if raw is not None:
        (folder / chunk_name(2)).write_bytes(raw)
    loads_or_user_error(lambda: PokemonDataset(folder, seq_len=2))


def test_a_chunk_claiming_a_zip_version_zipfile_lacks_is_a_user_error(tmp_path):
    """The fuzz test's find (session 21): one flipped bit in a member's "version needed to extract" (here 10.9)
    makes zipfile raise NotImplementedError; the loader says which chunk is corrupt instead."""
    raw = bytearray(GOOD_CHUNK)
    entry = raw.rfind(b"PK\x01\x02")  # the last central-directory entry
    raw[entry + 6] = 109  # its version needed to extract
    (tmp_path / chunk_name(1)).write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"chunk .*{chunk_name(1)}.*zip file version 10.9"):
        PokemonDataset(tmp_path, seq_len=2)


@pytest.fixture(scope="module")
def checkpoint_bytes(rssm_checkpoint) -> bytes:
    return rssm_checkpoint.read_bytes()


@FUZZ
@given(data=st.data())
@example(data=None)
def test_checkpoint_fuzz_only_user_errors(data, checkpoint_bytes, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_ckpt") / "model.pt"
    if data is None:  # the empty file
        raw = b""
    else:
        raw = data.draw(st.one_of(st.binary(max_size=2000), st.just(None)))
        raw = raw if raw is not None else mangle(checkpoint_bytes, data.draw)
    path.write_bytes(raw)
    loads_or_user_error(lambda: checkpoint.build_model(checkpoint.load_checkpoint(path, kind="rssm")))


@FUZZ
@given(data=st.data())
def test_identify_rom_fuzz_only_user_errors(data, cartridge_rom, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_rom") / "rom.gb"
    choice = data.draw(st.sampled_from(["random", "random_16k", "mangled"]))
    if choice == "random":
        raw = data.draw(st.binary(max_size=3000))
    elif choice == "random_16k":
        raw = data.draw(st.binary(min_size=64, max_size=64)) * (0x4000 // 64)
    else:
        raw = mangle(cartridge_rom.read_bytes(), data.draw)
    path.write_bytes(raw)
    loads_or_user_error(lambda: identify_rom(path))


# --- memory stays flat --------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def worker_pids(pid: int) -> list:
    """The collector's worker processes, or the collector itself when it runs one worker in-process."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children or [pid]


def rss_per_chunk(command: list, out: Path, timeout: float = 600) -> list:
    """Run `command` (a collect_data.py command line writing into `out`); every time a new chunk
    appears, record {worker pid: RSS in MiB}. Returns the list of records, one per chunk."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records, seen, deadline = [], 0, time.time() + timeout
    try:
        while process.poll() is None and time.time() < deadline:
            count = len(list_chunks(out)) if out.exists() else 0
            if count > seen:
                seen = count
                try:
                    records.append({p: rss_kib(p) / 1024 for p in worker_pids(process.pid)})
                except OSError as err:
                    if err.errno != errno.ENOENT:
                        raise
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == 0
    return records


def test_worker_memory_is_flat_from_chunk_to_chunk(tmp_path, cartridge_rom, start_state_file):
    """4 chunks of 150 native steps, one worker: RSS after chunk 3 within 5% of after chunk 2 (a leak grows with
    every chunk), and neither more than 25% over chunk 1's (the second chunk may make one-time buffers: ~10 MiB
    of ~97 were seen in session 21, 10.0% over chunk 1's, on the commit before and after that session's change).
    (The 20,000-step measurement in the report uses the same function; see tests/test_faults.py.)"""
    out = tmp_path / "data"
    command = [sys.executable, str(REPO / "scripts" / "collect_data.py"), "--rom", str(cartridge_rom),
               "--out-dir", str(out), "--total-steps", "600", "--save-interval", "150", "--episode-length", "100",
               "--save-state", str(start_state_file), "--policy", "random"]
    records = rss_per_chunk(command, out)
    assert len(records) >= 3, records
    first, second, third = records[:3]  # the last chunk may be seen after the worker began to exit
    for pid in first:
        assert max(second[pid], third[pid]) <= 1.25 * first[pid], (records, "RSS grew by 25% after the first chunk")
        assert third[pid] <= 1.05 * second[pid], (records, "RSS grew from the second chunk to the third")


if __name__ == "__main__":  # the long memory measurement: python tests/test_faults.py STEPS WORKERS OUT_DIR
    steps, workers, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    command = [sys.executable, str(REPO / "scripts" / "collect_data.py"), "--out-dir", str(out), "--total-steps",
               str(steps), "--save-interval", "2000", "--workers", str(workers), "--policy", "random"]
    began = time.time()
    records = rss_per_chunk(command, out, timeout=24 * 3600)
    print(json.dumps({"command": " ".join(command[1:]), "seconds": time.time() - began,
                      "rss_mib_per_chunk": [{str(k): round(v, 1) for k, v in r.items()} for r in records]}))
