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


def _patches(shades, grid: tuple[int, int]):
    """(N, H, W) shade ids -> (N * gh * gw, 64), row-major over the tile grid."""
    gh, gw = grid
    n = shades.shape[0]
    x = shades.reshape(n, gh, TILE, gw, TILE)
    x = x.permute(0, 1, 3, 2, 4) if isinstance(x, torch.Tensor) else x.transpose(0, 1, 3, 2, 4)
    return x.reshape(n * gh * gw, _PIXELS)


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

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._lookup = None

    @property
    def fitted(self) -> bool:
        return int(self.size) > 0

    def fit(self, frames: np.ndarray, rows: np.ndarray | None = None, batch: int = 2048) -> dict:
        """Fill the codebook from uint8 frames (N, H, W, 3), or only their `rows` (read `batch` at a time,
        never copied whole): the palette from their colours, the tiles by frequency.
        Returns {"distinct": tiles seen, "kept": entries filled, "covered": fraction of tile positions kept}."""
        frames = np.asarray(frames)
        rows = np.arange(len(frames)) if rows is None else np.asarray(rows)

        def parts():
            return (frames[rows[start:start + batch]] for start in range(0, len(rows), batch))

        if frames.ndim != 4 or frames.shape[1:3] != (self.grid[0] * TILE, self.grid[1] * TILE):
            raise ValueError(f"fit needs (N, {self.grid[0] * TILE}, {self.grid[1] * TILE}, 3) frames, "
                             f"got {frames.shape}")

        def rgb24(part):  # (n, H, W, 3) uint8 -> (n, H, W) one int per colour
            part = part.astype(np.int32)
            return (part[..., 0] << 16) | (part[..., 1] << 8) | part[..., 2]

        seen = np.zeros(256 ** 3, bool)
        for part in parts():
            seen[rgb24(part).ravel()] = True
        flat = np.flatnonzero(seen)
        if len(flat) > SHADES:
            raise ValueError(f"the frames hold {len(flat)} colours; tile tokens need a Game Boy (DMG) palette of at "
                             f"most {SHADES}: use a pixel preset")
        colours = np.stack([flat >> 16, (flat >> 8) & 255, flat & 255], 1)
        order = np.argsort(colours.sum(1), kind="stable")
        colours, flat = colours[order], flat[order]
        if len(np.unique(colours.sum(1))) < len(colours):
            raise ValueError(f"two of the frames' colours have the same R + G + B ({colours.tolist()}); tile tokens "
                             f"tell shades apart by it: use a pixel preset")
        palette = np.zeros((SHADES, 3), np.float32)
        palette[:len(colours)] = colours / 255.0
        palette[len(colours):] = palette[len(colours) - 1]
        counts: dict[tuple, int] = {}
        examples: dict[tuple, np.ndarray] = {}
        code = np.zeros(256 ** 3, np.uint8)  # colour -> shade id
        code[flat] = np.arange(len(flat), dtype=np.uint8)
        for part in parts():
            shades = code[rgb24(part)]
            patches = _patches(shades, self.grid)
            keys, first, count = np.unique(_keys(patches), axis=0, return_index=True, return_counts=True)
            for key, index, n in zip(map(tuple, keys.tolist()), first, count):
                counts[key] = counts.get(key, 0) + int(n)
                if key not in examples:
                    examples[key] = patches[index]
        ranked = sorted(counts, key=counts.get, reverse=True)[:self.vocab]
        with torch.no_grad():
            self.palette.copy_(torch.from_numpy(palette))
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
        if not self.fitted:
            raise RuntimeError("this world model's tile codebook is empty: fit it on data first (train_rssm.py does)")
        n = frames.shape[0]
        patches = _patches(self.shades(frames), self.grid)  # (M, 64)
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
        return ids.view(n, *self.grid)

    def tokenize_uint8(self, frames: np.ndarray, batch: int = 1024) -> torch.Tensor:
        """Tile ids of uint8 frames (N, H, W, 3) (e.g. a dataset's "obs"), `batch` frames at a time -> (N, gh, gw)
        int16 on the CPU: the ids `tokenize` gives the same frames as floats (`dataset.frames_to_float`)."""
        if self.vocab > 2 ** 15:
            raise ValueError(f"a codebook of {self.vocab} tiles does not fit int16 ids")
        out = torch.empty(len(frames), *self.grid, dtype=torch.int16)
        for start in range(0, len(frames), batch):
            chunk = np.ascontiguousarray(frames[start:start + batch])
            out[start:start + batch] = self.tokenize(frames_to_float(chunk, self.palette.device)).cpu()
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
