"""NPZ chunks on disk <-> sequences in memory.

A chunk `transitions_NNNN.npz` holds one row per env step, captured BEFORE the action:
the frame, the RAM fields of that moment, the action taken, the reward it earned and
whether the game ended after it. A row with `episode_starts` begins a sequence; so does
every file's first row. PokemonDataset holds all frames once, as uint8, in one array,
and cuts windows of `seq_len` rows that never cross a sequence start.

torch is imported only where tensors are made, so the collector, which only writes
chunks, starts in a second instead of four.
"""
import hashlib
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from errors import UserError

# key -> (dtype, shape of one row); obs rows are (H, W, 3) at the collection resolution.
CHUNK_FIELDS = {
    "obs": (np.uint8, None),
    "actions": (np.uint8, ()),
    "rewards": (np.float32, ()),
    "terminals": (np.bool_, ()),       # the game ended after this action (blackout), not a time limit
    "episode_starts": (np.bool_, ()),
    "map_ids": (np.uint8, ()),
    "xs": (np.uint8, ()),
    "ys": (np.uint8, ()),
    "facings": (np.uint8, ()),
    "in_battles": (np.bool_, ()),
    "dialog_opens": (np.bool_, ()),
    "badges": (np.uint8, ()),
    "party_hps": (np.int16, (6,)),
    "party_max_hps": (np.int16, (6,)),
}
CHUNK_GLOB = "transitions_*.npz"
COMPRESS_LEVEL = 3    # zlib level of the chunks (see write_npz)
READ_BLOCK = 1 << 20  # frames are streamed into place 1 MiB at a time: no second copy
# what reading a damaged chunk raises (zipfile: NotImplementedError for a header claiming a version or method it
# does not know, as one flipped bit can make it)
UNREADABLE = (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError)


def chunk_name(number: int) -> str:
    return f"transitions_{number:04d}.npz"


def chunk_number(path) -> int | None:
    """transitions_0012.npz -> 12; None for names that are not chunks."""
    stem = Path(path).name
    if not (stem.startswith("transitions_") and stem.endswith(".npz")):
        return None
    digits = stem[len("transitions_"):-len(".npz")]
    return int(digits) if digits.isdigit() else None


def list_chunks(data_dir) -> list:
    """The chunk files of `data_dir`, in numeric order."""
    paths = [p for p in Path(data_dir).glob(CHUNK_GLOB) if chunk_number(p) is not None]
    return sorted(paths, key=chunk_number)


class ChunkBuffer:
    """One chunk's rows in preallocated arrays: memory is fixed at `capacity` rows."""

    def __init__(self, capacity: int, resolution: tuple):
        self.capacity = capacity
        self.arrays = {}
        for key, (dtype, row_shape) in CHUNK_FIELDS.items():
            shape = (*resolution, 3) if key == "obs" else row_shape
            self.arrays[key] = np.zeros((capacity, *shape), dtype)
        self.size = 0

    def full(self) -> bool:
        return self.size == self.capacity

    def append(self, obs, state, action: int, reward: float, terminal: bool, episode_start: bool) -> None:
        """Add one step: `obs` and `state` (a GameState) from before `action`."""
        row, a = self.size, self.arrays
        a["obs"][row] = obs
        a["actions"][row] = action
        a["rewards"][row] = reward
        a["terminals"][row] = terminal
        a["episode_starts"][row] = episode_start or row == 0
        a["map_ids"][row] = state.map_id
        a["xs"][row] = state.x
        a["ys"][row] = state.y
        a["facings"][row] = state.facing
        a["in_battles"][row] = state.in_battle
        a["dialog_opens"][row] = state.dialog_open
        a["badges"][row] = state.badges
        a["party_hps"][row] = np.minimum(state.party_hps, 32767)
        a["party_max_hps"][row] = np.minimum(state.party_max_hps, 32767)
        self.size += 1

    def save(self, path) -> None:
        """Write the rows so far to `path` (compressed NPZ, flushed to disk) and empty the buffer.
        Callers write to a temporary name and rename, so a reader never sees half a file."""
        with open(path, "wb") as f:
            write_npz(f, {key: array[: self.size] for key, array in self.arrays.items()})
            f.flush()
            os.fsync(f.fileno())
        self.size = 0


def write_npz(file, arrays: dict, level: int = COMPRESS_LEVEL) -> None:
    """np.savez_compressed's format (np.load reads it) at a chosen zlib level: level 3 writes
    native frames 3x faster than savez_compressed's level 6, for 1.3x the bytes (measured)."""
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for key, array in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def _member_header(npz, key: str, path):
    """(shape, dtype) of `key` in an open NpzFile, read from the .npy header only."""
    with npz.zip.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    if fortran:
        raise UserError(f"chunk {path}: array '{key}' is in Fortran order; recollect it with scripts/collect_data.py")
    return shape, dtype


def _read_member_into(npz, key: str, out: np.ndarray, path) -> None:
    """Stream the array `key` straight into the preallocated, contiguous `out` (no copy)."""
    with npz.zip.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        reader(member)
        view = memoryview(out.reshape(-1)).cast("B")
        filled = 0
        while filled < len(view):
            got = member.readinto(view[filled: filled + READ_BLOCK])
            if not got:
                raise UserError(f"chunk {path}: array '{key}' is truncated; delete the file or recollect")
            filled += got


def frames_to_float(obs_uint8, device):
    """uint8 (..., H, W, 3) frames -> float32 (..., 3, H, W) in [0, 1], converted on `device`."""
    import torch

    obs = torch.as_tensor(obs_uint8).to(device, non_blocking=True)
    dims = obs.dim()
    obs = obs.permute(*range(dims - 3), dims - 1, dims - 3, dims - 2)  # (..., 3, H, W)
    return obs.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def world_model_inputs(ds: "PokemonDataset", starts, device, tile_ids=None, with_frames: bool = True,
                       place_keys: tuple = ()) -> dict:
    """WorldModel keyword inputs for the windows at `starts`: actions, rewards, continues (B, T); with `tile_ids`
    (a tiles model's ids of every frame of `ds`, `TileCodebook.tokenize_uint8`) their (B, T, H/8, W/8) slice; and
    the float frames (B, T, 3, H, W), None when tile ids stand in for them and `with_frames` is False; with
    `place_keys` (a model with place heads: `WorldModel.place_keys`) "places", the RAM bytes they learn, (B, T) each."""
    import torch

    keys = ["actions", "rewards", "continues", *place_keys] + (["obs"] if with_frames or tile_ids is None else [])
    batch = ds.get_batch(starts, keys=keys)
    inputs = {"frames": frames_to_float(batch["obs"], device) if "obs" in batch else None,
              "actions": batch["actions"].to(device), "rewards": batch["rewards"].to(device),
              "continues": batch["continues"].to(device)}
    if place_keys:
        inputs["places"] = {k: batch[k].to(device) for k in place_keys}
    if tile_ids is not None:
        rows = torch.from_numpy(np.asarray(starts, dtype=np.int64)[:, None] + np.arange(ds.seq_len))
        inputs["tile_ids"] = tile_ids[rows].to(device)
    return inputs


def window_events(batch: dict) -> dict:
    """(B,) bool each of a get_batch dict: the windows with a "battle", an open "text box", a "map change" in any
    frame (the events a prior following its most likely latents cannot foresee)."""
    maps = batch["map_ids"]
    return {"battle": batch["in_battles"].bool().any(1), "text box": batch["dialog_opens"].bool().any(1),
            "map change": (maps != maps[:, :1]).any(1)}


def quiet_windows(batch: dict):
    """(B,) bool of a get_batch dict: the windows with none of `window_events`."""
    events = window_events(batch)
    return ~(events["battle"] | events["text box"] | events["map change"])


def evenly(starts: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` windows spread over the whole array (deterministic): every episode of a split, not the
    first few, when the array is ordered by episode."""
    if len(starts) <= count:
        return starts
    return starts[np.linspace(0, len(starts) - 1, count).round().astype(np.int64)]


class PokemonDataset:
    """All chunks of `data_dir` in memory; windows of `seq_len` consecutive rows.

    window_starts: int64 global row indices of the valid windows (never crossing an episode
    start or a file boundary). get_batch(starts) -> dict of (B, T, ...) tensors.
    `extra_dirs`: more folders whose chunks come after data_dir's and only ever train (split() holds out
    data_dir's episodes alone, the same ones as without them); main_rows is where they begin.
    """

    def __init__(self, data_dir, seq_len: int = 15, max_files=None, extra_dirs=()):
        self.data_dir = Path(data_dir)
        self.seq_len = int(seq_len)
        if self.seq_len < 1:
            raise UserError(f"seq_len {seq_len} must be at least 1")
        self.files = self._chunks(self.data_dir, max_files)
        main_files = len(self.files)
        for extra in extra_dirs:
            self.files += self._chunks(Path(extra))
        self.resolution = None  # (H, W), from the first chunk; every other chunk must match
        rows = [self._check_file(path) for path in self.files]
        self.file_rows = np.array(rows, dtype=np.int64)
        self.file_offsets = np.concatenate([[0], np.cumsum(self.file_rows)])
        self.main_rows = int(self.file_offsets[main_files])
        self.arrays = {}
        for key, (dtype, row_shape) in CHUNK_FIELDS.items():
            shape = (*self.resolution, 3) if key == "obs" else row_shape
            self.arrays[key] = np.empty((int(self.file_offsets[-1]), *shape), dtype)
        for index, path in enumerate(self.files):
            self._load_file(index, path)
        self.obs = self.arrays["obs"]
        starts = self.arrays["episode_starts"]
        starts[self.file_offsets[:-1]] = True  # a file's first row always starts a sequence
        self.segment_ids = np.cumsum(starts) - 1  # sequence id of every row
        self.window_starts = self._windows()

    # --- loading ----------------------------------------------------------------------
    @staticmethod
    def _chunks(folder: Path, max_files=None) -> list:
        """`folder`'s chunks (its first max_files), or a UserError where there are none."""
        if not folder.is_dir():
            raise UserError(f"data folder {folder} does not exist; collect data with scripts/collect_data.py")
        files = list_chunks(folder)[:max_files]
        if not files:
            raise UserError(f"data folder {folder} has no transitions_NNNN.npz chunks; "
                            "collect data with scripts/collect_data.py")
        return files

    def _open(self, path):
        try:
            return np.load(path, allow_pickle=False)
        except UNREADABLE as err:
            raise UserError(f"chunk {path} is not a readable NPZ file ({err}); delete it or recollect") from None

    def _check_file(self, path) -> int:
        """Validate keys, dtypes and shapes from the headers; returns the row count."""
        try:
            with self._open(path) as npz:
                missing = sorted(set(CHUNK_FIELDS) - set(npz.files))
                if missing:
                    raise UserError(f"chunk {path} lacks the arrays {missing}; recollect it with scripts/collect_data.py")
                rows = None
                for key, (dtype, row_shape) in CHUNK_FIELDS.items():
                    shape, stored = _member_header(npz, key, path)
                    if key == "obs":
                        if len(shape) != 4 or shape[3] != 3:
                            raise UserError(f"chunk {path}: obs has shape {shape}, expected (N, H, W, 3)")
                        if self.resolution is None:
                            self.resolution = tuple(shape[1:3])
                        row_shape = (*self.resolution, 3)
                    if stored != np.dtype(dtype) or tuple(shape[1:]) != tuple(row_shape):
                        raise UserError(f"chunk {path}: '{key}' is {stored} {shape}, expected {np.dtype(dtype)} "
                                        f"(N, {', '.join(map(str, row_shape))}); are all chunks from one collection?")
                    if rows is None:
                        rows = shape[0]
                    elif shape[0] != rows:
                        raise UserError(f"chunk {path}: '{key}' has {shape[0]} rows, 'obs' has {rows}")
        except (*UNREADABLE, KeyError) as err:
            raise UserError(f"chunk {path} is corrupt ({err}); delete it or recollect") from None
        if rows == 0:
            raise UserError(f"chunk {path} has no rows; delete it")
        return rows

    def _load_file(self, index: int, path) -> None:
        begin, end = self.file_offsets[index], self.file_offsets[index + 1]
        try:
            with self._open(path) as npz:
                _read_member_into(npz, "obs", self.arrays["obs"][begin:end], path)
                for key in CHUNK_FIELDS:
                    if key != "obs":
                        self.arrays[key][begin:end] = npz[key]
        except UNREADABLE as err:
            raise UserError(f"chunk {path} is corrupt ({err}); delete it or recollect") from None

    def _windows(self) -> np.ndarray:
        count = len(self.segment_ids) - self.seq_len + 1
        if count > 0:
            same = self.segment_ids[self.seq_len - 1:] == self.segment_ids[:count]
            starts = np.flatnonzero(same).astype(np.int64)
        else:
            starts = np.zeros(0, np.int64)
        if len(starts) == 0:
            longest = int(np.bincount(self.segment_ids).max())
            raise UserError(f"seq_len {self.seq_len} is longer than every episode in {self.data_dir} "
                            f"(the longest has {longest} steps); use a shorter --seq-len or longer episodes")
        return starts

    # --- sampling ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.window_starts)

    @property
    def num_rows(self) -> int:
        return int(self.file_offsets[-1])

    def split(self, val_split: float = 0.1, seed: int = 0):
        """(train_starts, val_starts): whole episodes go to one side, drawn with `seed` from the episodes
        ordered by their content (`episode_key`), not by file order: collect_data.py numbers chunks in the
        order its workers finish them, so the same data can come in another file order on another day.
        Only data_dir's episodes are drawn from; those of extra_dirs all train."""
        episodes = np.unique(self.segment_ids[self.window_starts[self.window_starts < self.main_rows]])
        if val_split <= 0:
            return self.window_starts.copy(), np.zeros(0, np.int64)
        if len(episodes) < 2:
            raise UserError(f"{self.data_dir} holds one episode only; a train/validation split by episode "
                            "needs at least two (collect more, or use --val-split 0)")
        episodes = episodes[np.argsort([self.episode_key(e) for e in episodes], kind="stable")]
        rng = np.random.default_rng(seed)
        n_val = min(len(episodes) - 1, max(1, int(round(val_split * len(episodes)))))
        val_episodes = rng.permutation(episodes)[:n_val]
        is_val = np.isin(self.segment_ids[self.window_starts], val_episodes)
        return self.window_starts[~is_val], self.window_starts[is_val]

    def episode_key(self, segment: int) -> str:
        """A digest of sequence `segment`'s actions, rewards, places and HP (not its frames, for speed): the same
        for the same rows wherever their chunk sits in the folder."""
        first, end = np.searchsorted(self.segment_ids, [segment, segment + 1])
        digest = hashlib.blake2b(digest_size=16)
        for key in ("actions", "rewards", "map_ids", "xs", "ys", "facings", "party_hps"):
            digest.update(np.ascontiguousarray(self.arrays[key][first:end]).tobytes())
        return digest.hexdigest()

    def get_batch(self, starts, keys=None) -> dict:
        """Windows beginning at the global rows `starts` (taken from window_starts or split())
        -> dict of (B, T, ...) tensors; only `keys` of them if given (leave out "obs" and no frame is copied)."""
        import torch

        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        index = starts[:, None] + np.arange(self.seq_len)  # (B, T)
        a = self.arrays

        def take(key, dtype=None):
            values = a[key][index]
            return torch.from_numpy(values if dtype is None else values.astype(dtype))

        def continues():
            return torch.from_numpy(1.0 - a["terminals"][index].astype(np.float32))

        fields = {  # key -> dtype of its tensor (None: as stored)
            "obs": None,  # (B, T, H, W, 3) uint8
            "actions": np.int64, "rewards": None, "continues": None, "episode_starts": None,
            "map_ids": np.int64, "xs": np.int64, "ys": np.int64, "facings": np.int64,
            "in_battles": None, "dialog_opens": None, "badges": np.int64,
            "party_hps": np.float32, "party_max_hps": np.float32,  # (B, T, 6)
        }
        unknown = set(keys or ()) - fields.keys()
        if unknown:
            raise KeyError(f"get_batch: no field {sorted(unknown)}; the fields are {sorted(fields)}")
        return {key: continues() if key == "continues" else take(key, fields[key]) for key in (keys or fields)}

    def __getitem__(self, i) -> dict:
        batch = self.get_batch([self.window_starts[i]])
        return {key: value[0] for key, value in batch.items()}
