"""v1 data plumbing shared by the v1 scripts: one episode split for every stage, frames and VAE
latents of dataset rows, and loading the v1 networks from their checkpoints.

Every v1 stage (VAE, probe, dynamics, drift evaluation) holds out the same episodes: the split is
made once, by episode, on the dynamics' sequence windows (`dataset.split`), and a row belongs to
train or validation through the windows that cover it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from checkpoint import build_model, load_checkpoint
from dataset import PokemonDataset, frames_to_float
from errors import UserError


@dataclass
class V1Data:
    seqs: PokemonDataset  # the dynamics' T-step windows; its arrays hold every row once
    seq_len: int
    train_starts: np.ndarray  # window starts (global row indices) of training episodes
    val_starts: np.ndarray
    train_rows: np.ndarray  # sorted global rows covered by training windows
    val_rows: np.ndarray

    def frames(self, rows: np.ndarray, device: str) -> torch.Tensor:
        """Frames of global rows -> (N, 3, H, W) float in [0, 1]."""
        return frames_to_float(self.seqs.obs[np.asarray(rows)], device)

    def row_batch(self, rows: np.ndarray) -> dict:
        """The per-step RAM fields of global rows as tensors, each (N, ...)."""
        keys = ("map_ids", "xs", "ys", "in_battles", "dialog_opens", "party_hps", "party_max_hps")
        return {k: torch.from_numpy(self.seqs.arrays[k][np.asarray(rows)]) for k in keys}


def covered_rows(starts: np.ndarray, seq_len: int) -> np.ndarray:
    return np.unique((np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len)).ravel())


def load_v1_data(data_dir, seq_len: int = 30, val_split: float = 0.1, seed: int = 0, max_files=None) -> V1Data:
    """Load the chunks as T-step windows and split them by episode, once for every v1 stage."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len} must be at least 2")
    if not 0.0 < val_split < 1.0:
        raise UserError(f"--val-split {val_split} must be between 0 and 1 (exclusive)")
    seqs = PokemonDataset(data_dir, seq_len=seq_len, max_files=max_files)
    train_starts, val_starts = seqs.split(val_split=val_split, seed=seed)
    if len(train_starts) == 0 or len(val_starts) == 0:
        raise UserError(f"{data_dir}: the episode split with --val-split {val_split} left "
                        f"{len(train_starts)} training and {len(val_starts)} validation windows; "
                        "collect more episodes or change --val-split")
    return V1Data(seqs, seq_len, np.asarray(train_starts), np.asarray(val_starts),
                  covered_rows(train_starts, seq_len), covered_rows(val_starts, seq_len))


@torch.no_grad()
def encode_rows(vae, obs: np.ndarray, rows: np.ndarray, device: str, batch_size: int = 512) -> torch.Tensor:
    """VAE latent means of the frames obs[rows] (obs: a dataset's uint8 (N, H, W, 3) frames) -> (len(rows), D) on `device`."""
    vae.eval()
    rows = np.asarray(rows)
    chunks = [vae.encode(frames_to_float(obs[rows[i:i + batch_size]], device))[0] for i in range(0, len(rows), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, vae.config.latent_dim, device=device)


class LatentTable:
    """Latents of every covered row, looked up by global row index."""

    def __init__(self, vae, data: V1Data, device: str, rows: np.ndarray | None = None):
        rows = np.union1d(data.train_rows, data.val_rows) if rows is None else np.asarray(rows)
        self.index = np.full(int(rows.max()) + 1, -1, dtype=np.int64)
        self.index[rows] = np.arange(len(rows))
        self.latents = encode_rows(vae, data.seqs.obs, rows, device)  # (R, D)

    def windows(self, starts: np.ndarray, seq_len: int) -> torch.Tensor:
        """Latents of T-step windows -> (B, T, D)."""
        rows = np.asarray(starts)[:, None] + np.arange(seq_len)  # (B, T)
        return self.latents[torch.from_numpy(self.index[rows]).to(self.latents.device)]

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        return self.latents[torch.from_numpy(self.index[np.asarray(rows)]).to(self.latents.device)]


class LatentMemory:
    """The latents of real frames (duplicates dropped): `snap` replaces imagined latents by their
    nearest (L2) real one, so an open-loop rollout is always some frame the game really showed.

    Used as `LatentDynamics.rollout(..., project=memory.snap)`: an imagined latent that is off by less
    than half the gap to its neighbours is corrected at every step instead of compounding. It can
    only imagine screens that are in the memory (build it from training frames only when evaluating).
    """

    def __init__(self, latents: torch.Tensor):
        if latents.ndim != 2 or len(latents) == 0:
            raise UserError("the latent memory is empty: it needs the latents of at least one real frame")
        self.latents = torch.unique(latents, dim=0)  # (N, D)
        self.sq_norms = (self.latents ** 2).sum(1)  # (N,)

    @classmethod
    def of_data_dir(cls, vae, data_dir, device: str) -> "LatentMemory":
        """The latents of every frame collected in `data_dir` (chunks at the VAE's resolution)."""
        seqs = PokemonDataset(data_dir, seq_len=1)
        if tuple(seqs.obs.shape[1:3]) != (vae.config.height, vae.config.width):
            raise UserError(f"{data_dir} holds {seqs.obs.shape[1]}x{seqs.obs.shape[2]} frames, the VAE reads "
                            f"{vae.config.height}x{vae.config.width}; pass data collected at the VAE's --resolution")
        memory = cls(encode_rows(vae, seqs.obs, np.arange(seqs.num_rows), device))
        print(f"latent memory: {len(memory):,} distinct latents of {seqs.num_rows:,} frames in {data_dir}")
        return memory

    def __len__(self) -> int:
        return len(self.latents)

    @torch.no_grad()
    def snap(self, z: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """(B, D) -> (B, D): each row's nearest latent in memory."""
        out = []
        for part in z.split(chunk):
            dist = self.sq_norms[None] - 2 * part @ self.latents.T  # (b, N): |m|^2 - 2 z.m, |z|^2 dropped
            out.append(self.latents[dist.argmin(1)])
        return torch.cat(out) if out else z


def load_network(path, kind: str, device: str):
    """A v1 network ("vae", "dynamics" or "probe") rebuilt from its checkpoint, in eval mode."""
    return build_model(load_checkpoint(path, kind=kind)).to(device).eval()


def resume_training(path, kind: str, config, model, optimizer) -> tuple[int, float, list]:
    """Continue a v1 run from its checkpoint: load weights and optimizer into `model` / `optimizer`
    (the stored config must equal `config`) and return (start epoch, best validation loss, history).
    Without `path`, a fresh start: (0, inf, [])."""
    if not path:
        return 0, float("inf"), []
    ckpt = load_checkpoint(path, kind=kind)
    if type(config)(**ckpt["config"]) != config:
        raise UserError(f"--resume {path} was trained with {ckpt['config']}, not {asdict(config)}; "
                        "use the same data and flags")
    model.load_state_dict(ckpt["model_state"])
    if ckpt.get("optimizer_state"):
        optimizer.load_state_dict(ckpt["optimizer_state"])
    return ckpt["step"], ckpt["extra"]["best_val"], ckpt["extra"]["history"]
