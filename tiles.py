"""Exact 8x8-tile tokens for Game Boy frames: the codebook a "tiles" world model predicts over.

The Game Boy draws every frame from 8x8 tiles in at most 4 shades, so a 144x160 frame is an 18x20
grid of tiles and the open cartridge shows few distinct ones (1,556 in make demo's 18,000 training
frames; the 512 most common cover 99.93% of tile positions). `TileCodebook` holds the palette and the most common
tiles of a dataset as buffers (saved in the world model's checkpoint); `tokenize` maps frames to tile
ids exactly (a tile missing from the codebook gets the one with the fewest differing pixels) and
`render` maps ids back to frames.

    book = TileCodebook(vocab=1024, image_size=(144, 160))
    book.fit(uint8_frames)                  # (N, H, W, 3) numpy, e.g. a dataset's "obs"
    ids = book.tokenize(frames)             # (N, 3, H, W) float in [0, 1] -> (N, 18, 20) long
    frames = book.render(ids)               # -> (N, 3, H, W) float
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dataset import frames_to_float

TILE = 8
SHADES = 4  # colours in a Game Boy (DMG) frame
_PIXELS = TILE * TILE
_KEY_SPLIT = (31, 62)  # a tile's 64 shade digits as three base-4 numbers below 2**62: exact int64 keys


def _keys(shades):
    """(M, 64) shade ids (numpy or torch integers) -> (M, 3) exact int64 keys."""
    lib = torch if isinstance(shades, torch.Tensor) else np
    parts = (shades[:, :_KEY_SPLIT[0]], shades[:, _KEY_SPLIT[0]:_KEY_SPLIT[1]], shades[:, _KEY_SPLIT[1]:])
    out = []
    for part in parts:
        width = part.shape[1]
        if lib is torch:
            weights = 4 ** torch.arange(width, dtype=torch.int64, device=part.device)
            out.append((part.long() * weights).sum(1))
        else:
            weights = 4 ** np.arange(width, dtype=np.int64)
            out.append((part.astype(np.int64) * weights).sum(1))
    return lib.stack(out, 1)


def _colour_keys(frames: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """uint8 frames (N, H, W, 3), or their `rows`, -> (n, H, W) uint32 colour keys R | G << 8 | B << 16: each
    pixel's 3 bytes read as one little-endian 4-byte word (the next pixel's first byte masked off), one pass."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"tile tokens read uint8 frames (N, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    count = len(frames) if rows is None else len(rows)
    buffer = np.empty(count * int(np.prod(frames.shape[1:])) + 1, np.uint8)  # a spare byte for the last word
    pixels = buffer[:-1].reshape(count, *frames.shape[1:])
    if rows is None:
        pixels[...] = frames
    else:
        for index, row in enumerate(rows):  # a frame at a time: faster than np.take here
            pixels[index] = frames[row]
    words = np.ndarray(pixels.shape[:-1], "<u4", buffer, strides=pixels.strides[:-1])
    return words & np.uint32(0xFFFFFF)


def _colours(keys: np.ndarray) -> np.ndarray:
    """Colour keys (`_colour_keys`) (n,) -> (n, 3) uint8 RGB."""
    return np.stack([keys & 255, (keys >> 8) & 255, keys >> 16], 1).astype(np.uint8)


def _patches(shades, grid: tuple[int, int]):
    """(N, H, W) shade ids -> (N * gh * gw, 64), row-major over the tile grid."""
    gh, gw = grid
    n = shades.shape[0]
    x = shades.reshape(n, gh, TILE, gw, TILE)
    x = x.permute(0, 1, 3, 2, 4) if isinstance(x, torch.Tensor) else x.transpose(0, 1, 3, 2, 4)
    return x.reshape(n * gh * gw, _PIXELS)


def _distinct(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, 64) shade ids -> the row of one example of each distinct tile (sorted by the tiles' packed bits) and each
    row's index into those: the 64 2-bit shades packed into two uint64 words, sorted as pairs."""
    quads = patches.reshape(len(patches), _PIXELS // 4, 4)
    packed = quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)  # (M, 16) bytes
    words = np.ascontiguousarray(packed).view(np.uint64)  # (M, 2)
    order = np.lexsort((words[:, 1], words[:, 0]))
    ranked = words[order]
    new = np.ones(len(ranked), bool)
    new[1:] = (ranked[1:] != ranked[:-1]).any(1)
    inverse = np.empty(len(ranked), np.int64)
    inverse[order] = np.cumsum(new) - 1
    return order[new], inverse


class TileCodebook(nn.Module):
    """Palette (4 colours) and up to `vocab` 8x8 tiles, as buffers: tile ids <-> frames."""

    def __init__(self, vocab: int, image_size: tuple[int, int]):
        super().__init__()
        height, width = image_size
        if height % TILE or width % TILE:
            raise ValueError(f"tile tokens need frames whose sides are multiples of {TILE}, got {height}x{width}")
        self.vocab = vocab
        self.grid = (height // TILE, width // TILE)
        self.register_buffer("palette", torch.zeros(SHADES, 3))  # RGB in [0, 1], darkest first
        self.register_buffer("tiles", torch.zeros(vocab, _PIXELS, dtype=torch.uint8))  # shade ids
        self.register_buffer("size", torch.zeros((), dtype=torch.int64))  # how many entries are filled
        self._lookup = None  # search tables (see `_table`), rebuilt after fit / load_state_dict
        self._shade_table = None  # colour key -> shade id (see `_colour_shades`), likewise

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._lookup = self._shade_table = None

    @property
    def fitted(self) -> bool:
        return int(self.size) > 0

    def fit(self, frames: np.ndarray, rows: np.ndarray | None = None, batch: int = 256) -> dict:
        """Fill the codebook from uint8 frames (N, H, W, 3), or only their `rows` (read `batch` at a time,
        never copied whole): the palette from their colours, the `vocab` most frequent tiles (ties in key order).
        Returns {"distinct": tiles seen, "kept": entries filled, "covered": fraction of tile positions kept}."""
        frames = np.asarray(frames)
        rows = np.arange(len(frames)) if rows is None else np.asarray(rows)

        def keys():  # (n, H, W) colour keys of `batch` rows at a time
            return (_colour_keys(frames, rows[start:start + batch]) for start in range(0, len(rows), batch))

        if frames.ndim != 4 or frames.shape[1:] != (self.grid[0] * TILE, self.grid[1] * TILE, 3):
            raise ValueError(f"fit needs (N, {self.grid[0] * TILE}, {self.grid[1] * TILE}, 3) frames, "
                             f"got {frames.shape}")
        seen = np.zeros(2 ** 24, bool)
        for part in keys():
            seen[part] = True
        flat = np.flatnonzero(seen)
        if len(flat) > SHADES:
            raise ValueError(f"the frames hold {len(flat)} colours; tile tokens need a Game Boy (DMG) palette of at "
                             f"most {SHADES}: use a pixel preset")
        colours = _colours(flat)
        colours = colours[np.argsort(colours.sum(1), kind="stable")]
        if len(np.unique(colours.sum(1))) < len(colours):
            raise ValueError(f"two of the frames' colours have the same R + G + B ({colours.tolist()}); tile tokens "
                             f"tell shades apart by it: use a pixel preset")
        palette = np.zeros((SHADES, 3), np.float32)
        palette[:len(colours)] = colours / 255.0
        palette[len(colours):] = palette[len(colours) - 1]
        with torch.no_grad():
            self.palette.copy_(torch.from_numpy(palette))
        self._lookup = self._shade_table = None
        counts: dict[tuple, int] = {}  # tile key -> positions
        examples: dict[tuple, np.ndarray] = {}
        for part in keys():  # shades as `tokenize` reads them: each colour's palette entry (the sums differ)
            patches = _patches(self._colour_shades(part), self.grid)
            first, inverse = _distinct(patches)
            tiles, seen_here = patches[first], np.bincount(inverse, minlength=len(first))
            for key, tile, n in zip(map(tuple, _keys(tiles).tolist()), tiles, seen_here.tolist()):
                counts[key] = counts.get(key, 0) + n
                examples.setdefault(key, tile)
        ranked = sorted(counts, key=lambda key: (-counts[key], key))[:self.vocab]  # ties: in key order
        with torch.no_grad():
            self.tiles.zero_()
            self.tiles[:len(ranked)] = torch.from_numpy(np.stack([examples[k] for k in ranked]).astype(np.uint8))
            self.size.fill_(len(ranked))
        self._lookup = None
        total = sum(counts.values())
        return {"distinct": len(counts), "covered": sum(counts[k] for k in ranked) / total, "kept": len(ranked)}

    def _table(self) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Exact lookup tables: for each of the 3 key parts its sorted distinct values in the codebook, and the
        codebook's combined ranks (sorted) with the tile id of each."""
        if self._lookup is None or self._lookup[0][0].device != self.tiles.device:
            keys = _keys(self.tiles[:int(self.size)])  # (size, 3)
            parts = [torch.unique(keys[:, j]) for j in range(3)]  # sorted
            combined = self._combine([torch.searchsorted(parts[j], keys[:, j].contiguous()) for j in range(3)])
            order = torch.argsort(combined)
            self._lookup = (parts, combined[order], order)
        return self._lookup

    def _combine(self, ranks: list[torch.Tensor]) -> torch.Tensor:
        base = self.vocab + 1
        return (ranks[0] * base + ranks[1]) * base + ranks[2]

    def shades(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float frames in [0, 1] -> (N, H, W) shade ids (nearest palette colour)."""
        # the palette is sorted by R + G + B, all sums distinct (`fit` checks): the nearest sum picks the shade
        sums = self.palette.sum(1)
        return torch.bucketize(frames.sum(1), (sums[1:] + sums[:-1]) / 2).to(torch.uint8)  # (N, H, W)

    @torch.no_grad()
    def tokenize(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float frames in [0, 1] -> (N, gh, gw) long tile ids."""
        return self._ids(_patches(self.shades(frames), self.grid)).view(frames.shape[0], *self.grid)

    def _ids(self, patches: torch.Tensor) -> torch.Tensor:
        """(M, 64) shade ids -> (M,) long tile ids: exact where the tile is in the codebook, else the entry with
        the fewest differing pixels."""
        if not self.fitted:
            raise RuntimeError("this world model's tile codebook is empty: fit it on data first (train_rssm.py does)")
        keys = _keys(patches)  # (M, 3)
        parts, combined, order = self._table()
        found = torch.ones(len(keys), dtype=torch.bool, device=keys.device)
        ranks = []
        for j in range(3):  # a key part absent from the codebook's values means the tile is absent too
            rank = torch.searchsorted(parts[j], keys[:, j].contiguous()).clamp(max=len(parts[j]) - 1)
            found &= parts[j][rank] == keys[:, j]
            ranks.append(rank)
        want = self._combine(ranks)
        slot = torch.searchsorted(combined, want).clamp(max=len(combined) - 1)
        found &= combined[slot] == want
        ids = order[slot]
        missing = torch.nonzero(~found).flatten()
        if len(missing):  # tiles outside the codebook: the entry with the fewest differing pixels
            book = self.tiles[:int(self.size)]
            for start in range(0, len(missing), 256):
                rows = missing[start:start + 256]
                differ = (patches[rows].unsqueeze(1) != book.unsqueeze(0)).sum(-1)  # (m, size)
                ids[rows] = differ.argmin(1)
        return ids

    def _colour_shades(self, keys: np.ndarray) -> np.ndarray:
        """Colour keys (`_colour_keys`) -> shade ids, each colour's as `shades` gives it on the float frame
        (`dataset.frames_to_float`): a table over all colours, filled the first time a colour is met."""
        if self._shade_table is None:
            self._shade_table = np.full(2 ** 24, SHADES, np.uint8)  # SHADES: not looked up yet
        shades = self._shade_table[keys]
        unknown = shades == SHADES
        if unknown.any():
            met = np.zeros(2 ** 24, bool)
            met[keys[unknown]] = True
            new = np.flatnonzero(met)
            floats = frames_to_float(_colours(new).reshape(len(new), 1, 1, 3), self.palette.device)  # (n, 3, 1, 1)
            self._shade_table[new] = self.shades(floats).flatten().cpu().numpy()
            shades = self._shade_table[keys]
        return shades

    @torch.no_grad()
    def tokenize_uint8(self, frames: np.ndarray, batch: int = 256) -> torch.Tensor:
        """Tile ids of uint8 frames (N, H, W, 3) (e.g. a dataset's "obs"), `batch` frames at a time -> (N, gh, gw)
        int16 on the CPU: the ids `tokenize` gives the same frames as floats (`dataset.frames_to_float`), each
        distinct tile of a batch looked up once."""
        if self.vocab > 2 ** 15:
            raise ValueError(f"a codebook of {self.vocab} tiles does not fit int16 ids")
        frames = np.asarray(frames)
        out = torch.empty(len(frames), *self.grid, dtype=torch.int16)
        for start in range(0, len(frames), batch):
            part = frames[start:start + batch]
            patches = _patches(self._colour_shades(_colour_keys(part)), self.grid)
            first, inverse = _distinct(patches)
            ids = self._ids(torch.from_numpy(patches[first]).to(self.tiles.device)).cpu()
            out[start:start + len(part)] = ids[torch.from_numpy(inverse)].view(len(part), *self.grid).to(torch.int16)
        return out

    def render_mean(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, gh, gw, V) logits over the codebook -> (N, 3, H, W) float frames: each cell the
        probability-weighted mean of the tiles (the frame with the least expected squared error; exactly a
        tile where the model is sure)."""
        n = logits.shape[0]
        gh, gw = self.grid
        size = int(self.size)
        probs = logits[..., :size].softmax(-1)  # (N, gh, gw, size)
        images = self.palette[self.tiles[:size].long()].view(size, _PIXELS * 3)  # (size, 64 * 3)
        cells = (probs @ images).view(n, gh, gw, TILE, TILE, 3)
        return cells.permute(0, 5, 1, 3, 2, 4).reshape(n, 3, gh * TILE, gw * TILE)

    def render(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, gh, gw) tile ids -> (N, 3, H, W) float frames."""
        n = ids.shape[0]
        gh, gw = self.grid
        shades = self.tiles[ids.clamp(0, self.vocab - 1)].long()  # (N, gh, gw, 64)
        shades = shades.view(n, gh, gw, TILE, TILE).permute(0, 1, 3, 2, 4).reshape(n, gh * TILE, gw * TILE)
        return self.palette[shades].permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
