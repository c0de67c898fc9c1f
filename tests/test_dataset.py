"""dataset.py: the sequence sampler's properties, the episode split, validation of bad chunks,
and loading real collected data."""
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataset import CHUNK_FIELDS, ChunkBuffer, PokemonDataset, chunk_name, evenly, frames_to_float
from errors import UserError
from game_state import GameState

RES = (4, 5)


def fake_state(row: int) -> GameState:
    """A GameState that carries the global row id (in party_hps[0]) so windows can be checked."""
    return GameState(map_id=row % 7, map_name="", x=row % 250, y=(row // 250) % 250, facing=0, battle_kind=0,
                     dialog_open=False, badges=0, party_count=1, party_hps=(row, 0, 0, 0, 0, 0),
                     party_max_hps=(30, 0, 0, 0, 0, 0), party_levels=(5, 0, 0, 0, 0, 0), enemy_hp=0)


def write_chunks(folder, files, first_row: int = 0, resolution=RES):
    """files: list of lists of episode lengths (one list per file); returns the row count. Rows carry their
    number from first_row on (fake_state)."""
    row = first_row
    for number, episodes in enumerate(files, start=1):
        buffer = ChunkBuffer(sum(episodes), resolution)
        for length in episodes:
            for t in range(length):
                obs = np.full((*resolution, 3), row % 256, np.uint8)
                buffer.append(obs, fake_state(row), action=row % 8, reward=0.5, terminal=t == length - 1,
                              episode_start=t == 0)
                row += 1
        buffer.save(folder / chunk_name(number))
    return row - first_row


layouts = st.lists(st.lists(st.integers(1, 12), min_size=1, max_size=4), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=layouts, seq_len=st.integers(1, 8))
def test_windows_are_contiguous_and_never_cross_an_episode_start(tmp_path_factory, files, seq_len):
    folder = tmp_path_factory.mktemp("layout")
    write_chunks(folder, files)
    lengths = [n for episodes in files for n in episodes]
    expected = []  # every valid start, computed the slow way
    offset = 0
    for n in lengths:
        expected += [offset + i for i in range(n - seq_len + 1)]
        offset += n
    if not expected:
        with pytest.raises(UserError, match="longer than every episode"):
            PokemonDataset(folder, seq_len=seq_len)
        return
    ds = PokemonDataset(folder, seq_len=seq_len)
    assert ds.window_starts.tolist() == expected
    batch = ds.get_batch(ds.window_starts)
    rows = batch["party_hps"][:, :, 0].long()  # (B, T) global row ids
    assert torch.equal(rows, rows[:, :1] + torch.arange(seq_len))
    assert not batch["episode_starts"][:, 1:].any()
    assert batch["episode_starts"][:, 0].sum() <= len(batch["episode_starts"])


def test_split_is_by_episode_deterministic_and_disjoint(tmp_path):
    write_chunks(tmp_path, [[20, 15, 30], [25, 10], [40, 12, 18]])
    ds = PokemonDataset(tmp_path, seq_len=5)
    train, val = ds.split(val_split=0.25, seed=3)
    assert len(train) + len(val) == len(ds) and len(val) > 0
    train_episodes = set(ds.segment_ids[train].tolist())
    val_episodes = set(ds.segment_ids[val].tolist())
    assert not train_episodes & val_episodes
    train_rows = set((train[:, None] + np.arange(5)).ravel().tolist())
    val_rows = set((val[:, None] + np.arange(5)).ravel().tolist())
    assert not train_rows & val_rows  # no frame is in both
    again = ds.split(val_split=0.25, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(ds.split(val_split=0.25, seed=4)[1], val) or len(train_episodes | val_episodes) < 3


def test_split_holds_out_the_same_episodes_whatever_the_file_order(tmp_path):
    """collect_data.py numbers chunks in the order its workers finish them: the same chunks in another
    file order must hold out the same episodes (by content: party_hps[0] is each row's first write order)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    write_chunks(tmp_path / "a", [[20, 15, 30], [25, 10], [40, 12, 18]])
    for number, source in enumerate((3, 1, 2), start=1):  # the same files renumbered
        (tmp_path / "b" / chunk_name(number)).write_bytes((tmp_path / "a" / chunk_name(source)).read_bytes())
    held_out = []
    for folder in ("a", "b"):
        ds = PokemonDataset(tmp_path / folder, seq_len=5)
        val = ds.split(val_split=0.25, seed=3)[1]
        rows = ds.get_batch(val)["party_hps"][:, 0, 0]  # each held-out window's first row, as written
        held_out.append(sorted(rows.tolist()))
    assert held_out[0] == held_out[1] and held_out[0]


def test_extra_folders_only_train_and_keep_the_held_out_episodes(tmp_path):
    """train_rssm.py --extra-data-dir: more chunks after data_dir's, every window of them a training one; the
    held-out windows are data_dir's, the same as without the extra folders."""
    for name in ("main", "more", "other"):
        (tmp_path / name).mkdir()
    write_chunks(tmp_path / "main", [[20, 15, 30], [25, 10], [40, 12, 18]])
    write_chunks(tmp_path / "more", [[30, 22], [16]], first_row=1000)
    write_chunks(tmp_path / "other", [[14]], first_row=2000)
    alone = PokemonDataset(tmp_path / "main", seq_len=5)
    both = PokemonDataset(tmp_path / "main", seq_len=5, extra_dirs=[tmp_path / "more", tmp_path / "other"])
    assert both.main_rows == alone.num_rows == 170 and both.num_rows == 170 + 68 + 14
    train, val = both.split(val_split=0.25, seed=3)
    alone_train, alone_val = alone.split(val_split=0.25, seed=3)
    assert np.array_equal(val, alone_val) and len(val) > 0
    extra = train[train >= both.main_rows]
    assert np.array_equal(train[train < both.main_rows], alone_train)
    assert np.array_equal(extra, both.window_starts[both.window_starts >= both.main_rows])
    assert len(extra) == (30 - 4) + (22 - 4) + (16 - 4) + (14 - 4)
    first_rows = both.get_batch(extra)["party_hps"][:, 0, 0]  # each window's first row, as written
    assert first_rows.min() >= 1000 and (first_rows >= 2000).sum() == 10
    with pytest.raises(UserError, match="nowhere does not exist"):
        PokemonDataset(tmp_path / "main", extra_dirs=[tmp_path / "nowhere"])
    (tmp_path / "small").mkdir()
    write_chunks(tmp_path / "small", [[6]], resolution=(3, 5))
    with pytest.raises(UserError, match="small.*obs.*one collection"):
        PokemonDataset(tmp_path / "main", extra_dirs=[tmp_path / "small"])


def test_evenly_spreads_windows_over_every_episode(tmp_path):
    """Validation (train_rssm.py) and evaluation (evaluate_rssm.py) score windows from all held-out episodes,
    not the first few of an array ordered by episode."""
    write_chunks(tmp_path, [[20, 15, 30], [25, 10], [40, 12, 18]])
    ds = PokemonDataset(tmp_path, seq_len=5)
    starts = ds.window_starts
    picked = evenly(starts, 8)
    assert len(picked) == 8 and picked[0] == starts[0] and picked[-1] == starts[-1]
    assert np.all(np.diff(picked) > 0) and np.isin(picked, starts).all()
    assert set(ds.segment_ids[picked].tolist()) == set(ds.segment_ids[starts].tolist())  # all 8 episodes
    assert np.array_equal(evenly(starts, len(starts) + 5), starts)


def test_get_batch_values_and_frames_to_float(tmp_path):
    write_chunks(tmp_path, [[10, 6]])
    ds = PokemonDataset(tmp_path, seq_len=4)
    item = ds[0]
    assert item["obs"].shape == (4, *RES, 3) and item["obs"].dtype == torch.uint8
    assert item["actions"].tolist() == [0, 1, 2, 3]
    batch = ds.get_batch([6])  # rows 6..9: the first episode's end
    assert batch["continues"].tolist() == [[1.0, 1.0, 1.0, 0.0]]
    assert batch["party_hps"].shape == (1, 4, 6) and batch["party_hps"].dtype == torch.float32
    floats = frames_to_float(batch["obs"], "cpu")
    assert floats.shape == (1, 4, 3, *RES) and floats.dtype == torch.float32 and floats.is_contiguous()
    assert torch.allclose(floats[0, 1], torch.full((3, *RES), 7 / 255))
    # only the fields asked for, equal to the full batch's
    some = ds.get_batch([6], keys=("actions", "continues", "xs"))
    assert set(some) == {"actions", "continues", "xs"}
    assert all(torch.equal(some[k], batch[k]) for k in some)
    with pytest.raises(KeyError, match="frames"):
        ds.get_batch([6], keys=("frames",))


def test_bad_folders_and_chunks_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        PokemonDataset(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no transitions"):
        PokemonDataset(tmp_path)
    write_chunks(tmp_path, [[10]])
    good = (tmp_path / chunk_name(1)).read_bytes()

    (tmp_path / chunk_name(1)).write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(UserError, match="transitions_0001.npz"):
        PokemonDataset(tmp_path, seq_len=2)

    (tmp_path / chunk_name(1)).write_bytes(b"not a zip file at all")
    with pytest.raises(UserError, match="transitions_0001.npz"):
        PokemonDataset(tmp_path, seq_len=2)

    arrays = {key: np.zeros((10, *((*RES, 3) if key == "obs" else shape)), dtype)
              for key, (dtype, shape) in CHUNK_FIELDS.items()}
    np.savez(tmp_path / chunk_name(1), **{k: v for k, v in arrays.items() if k != "xs"})
    with pytest.raises(UserError, match=r"transitions_0001.npz lacks .*xs"):
        PokemonDataset(tmp_path, seq_len=2)

    np.savez(tmp_path / chunk_name(1), **{**arrays, "party_hps": np.zeros((10, 5), np.int16)})
    with pytest.raises(UserError, match="transitions_0001.npz: 'party_hps'"):
        PokemonDataset(tmp_path, seq_len=2)

    np.savez(tmp_path / chunk_name(1), **{**arrays, "xs": np.zeros(10, np.float64)})
    with pytest.raises(UserError, match="transitions_0001.npz: 'xs'"):
        PokemonDataset(tmp_path, seq_len=2)

    np.savez(tmp_path / chunk_name(1), **arrays)
    with pytest.raises(UserError, match="seq_len 11 is longer"):
        PokemonDataset(tmp_path, seq_len=11)
    assert len(PokemonDataset(tmp_path, seq_len=10)) == 1


def test_one_episode_cannot_be_split(tmp_path):
    write_chunks(tmp_path, [[10]])
    with pytest.raises(UserError, match="one episode"):
        PokemonDataset(tmp_path, seq_len=3).split(0.1)


def test_real_collected_data_loads(collected_data):
    folder = collected_data("36x40")
    ds = PokemonDataset(folder, seq_len=15)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert ds.num_rows == manifest["total_steps"] == 600
    assert ds.resolution == (36, 40)
    train, val = ds.split(0.34, seed=0)
    assert len(train) and len(val)
    batch = ds.get_batch(train[:8])
    assert batch["obs"].shape == (8, 15, 36, 40, 3)
    assert (batch["actions"] < 8).all()
    with zipfile.ZipFile(folder / "transitions_0001.npz") as z:  # compressed, as promised
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in z.infolist())


MEASURE_RAM = """
import sys
import numpy as np, torch
from dataset import PokemonDataset
def status(field):  # bytes
    line = next(l for l in open('/proc/self/status') if l.startswith(field + ':'))
    return int(line.split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current size
before = status('VmRSS')
ds = PokemonDataset(sys.argv[1], seq_len=15)
print(ds.obs.nbytes, status('VmRSS') - before, status('VmHWM') - before)
"""


def test_frames_held_once(collected_data):
    """Resident memory of a loaded dataset (and its peak while loading) stays near the raw frames."""
    folder = collected_data("144x160")
    done = subprocess.run([sys.executable, "-c", MEASURE_RAM, str(folder)], capture_output=True, text=True,
                          cwd=str(folder.parent), timeout=120,
                          env={"PYTHONPATH": str(__import__("conftest").REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    raw, resident, peak = map(int, done.stdout.split())
    assert raw == 600 * 144 * 160 * 3
    assert resident <= 1.1 * raw, (resident / raw)
    assert peak <= 1.1 * raw, (peak / raw)
