"""Run outputs written atomically (temp file + os.replace): JSON, bytes, arrays, the metrics log, figures, videos."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _replace_into(path: Path, write, suffix: str = "") -> None:
    """Call write(tmp_path) on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _replace_into(Path(path), write)


def write_bytes(path, data: bytes) -> None:
    _replace_into(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def copy_file(source, path) -> None:
    """Copy `source` to `path` so that `path` is either absent/old or the whole copy."""
    import shutil

    _replace_into(Path(path), lambda tmp: shutil.copyfile(source, tmp))


def write_arrays(path, **arrays) -> None:
    """Arrays -> a compressed .npz."""
    _replace_into(Path(path), lambda tmp: np.savez_compressed(tmp, **arrays))


def write_text(path, text: str) -> None:
    _replace_into(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_image(path, rgb: np.ndarray) -> None:
    """An (H, W, 3) uint8 RGB image -> PNG."""
    import cv2

    _replace_into(Path(path), lambda tmp: cv2.imwrite(tmp, np.ascontiguousarray(rgb[:, :, ::-1])))


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    _replace_into(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    plt.close(fig)


def write_video(frames, path, fps: float = 5.0) -> None:
    """frames: list of (H, W, 3) uint8 -> mp4 (libx264) or, for a .gif path, an animated GIF."""
    import imageio.v2 as imageio

    path = Path(path)
    frames = [np.ascontiguousarray(f) for f in frames]
    if path.suffix.lower() == ".gif":
        _replace_into(path, lambda tmp: imageio.mimsave(tmp, frames, duration=1000.0 / fps, loop=0))
        return
    # even sizes for yuv420p; macro_block_size=1 keeps our size (we pad ourselves)
    h, w = frames[0].shape[:2]
    frames = [np.pad(f, ((0, h % 2), (0, w % 2), (0, 0))) for f in frames]

    def write(tmp):
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1,
                                pixelformat="yuv420p", quality=8) as writer:
            for frame in frames:
                writer.append_data(frame)

    _replace_into(path, write)


class RunLog:
    """Log once: each record goes to stdout and metrics.jsonl; per-epoch records also to metrics.json
    (rewritten atomically) and to a loss-curve plot."""

    def __init__(self, out_dir, history: list | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.history = list(history or [])  # per-epoch records, carried over on --resume

    def record(self, metrics: dict, epoch_end: bool = True) -> None:
        line = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
        print(" ".join(f"{k}={v}" for k, v in line.items()), flush=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if epoch_end:
            self.history.append(line)
            write_json(self.out_dir / "metrics.json", self.history)

    def plot(self, groups: list, path_name: str = "loss_curves.png", title: str = "") -> None:
        """One panel per group of keys, e.g. [["loss/train", "loss/val"], ["eval/tile_error"]]."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = [g for g in groups if any(k in rec for k in g for rec in self.history)]
        if not groups:
            return
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False)
        for ax, group in zip(axes[0], groups):
            for key in group:
                points = [(rec["epoch"], rec[key]) for rec in self.history if key in rec]
                if points:
                    ax.plot(*zip(*points), marker="o", label=key)
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
        fig.suptitle(title)
        save_figure(fig, self.out_dir / path_name)


def panel(image: np.ndarray, title: str, scale: int = 1, header: int = 22, color=(255, 255, 255)) -> np.ndarray:
    """A video panel: `image` (H, W, 3) uint8 scaled up `scale` times (nearest neighbour, no
    sharpening or contrast change) under a black strip with `title`."""
    import cv2

    big = np.repeat(np.repeat(image, scale, 0), scale, 1)
    strip = np.zeros((header, big.shape[1], 3), np.uint8)
    cv2.putText(strip, title, (4, header - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.42, color, 1, cv2.LINE_AA)
    return np.concatenate([strip, big], 0)


def side_by_side(panels: list, gap: int = 4) -> np.ndarray:
    """Panels of possibly different heights next to each other on a grey background."""
    height = max(p.shape[0] for p in panels)
    parts = []
    for i, p in enumerate(panels):
        parts.append(np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=40))
        if i < len(panels) - 1:
            parts.append(np.full((height, gap, 3), 40, np.uint8))
    return np.concatenate(parts, 1)
