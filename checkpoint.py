"""One checkpoint format for every model: save atomically, load weights-only, rebuild the model (on the device asked for).

A checkpoint is a dict of plain data (tensors, numbers, strings, lists, dicts):
    format            "pokedreamer-checkpoint-1"
    kind              "rssm" | "vae" | "dynamics" | "probe" | "policy" | ...
    config            the model config as a dict (e.g. RSSMConfig.to_dict()): enough to rebuild the model
    model_state       state_dict of the model
    optimizer_state   state_dict of the optimizer, or None
    step              training step (int)
    extra             anything else plain: run config, RNG states, data position, metrics, ...
It is loaded with `torch.load(weights_only=True)`, so a file holding pickled Python objects is refused.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from errors import UserError

FORMAT = "pokedreamer-checkpoint-1"

# kind -> function(config dict) -> nn.Module. Other modules add theirs with `register_builder`.
_BUILDERS: dict[str, Callable[[dict], torch.nn.Module]] = {}


def register_builder(kind: str, builder: Callable[[dict], torch.nn.Module]) -> None:
    """Teach `build_model` how to rebuild checkpoints of `kind` from their config dict."""
    _BUILDERS[kind] = builder


def _build_rssm(config: dict) -> torch.nn.Module:
    import models

    return models.WorldModel(models.RSSMConfig.from_dict(config))


def _build_from_models(model_name: str, config_name: str) -> Callable[[dict], torch.nn.Module]:
    def build(config: dict) -> torch.nn.Module:
        import models

        return getattr(models, model_name)(getattr(models, config_name)(**config))

    return build


register_builder("rssm", _build_rssm)
register_builder("vae", _build_from_models("VAE", "VAEConfig"))
register_builder("dynamics", _build_from_models("LatentDynamics", "DynamicsConfig"))
register_builder("probe", _build_from_models("RamProbe", "ProbeConfig"))
register_builder("rssm_probe", _build_from_models("StateProbe", "StateProbeConfig"))


def _build_policy(config: dict) -> torch.nn.Module:
    import agent  # imported on use, like models above; agent.py defines the "policy" kind (PolicyAgent)

    return agent.build_policy(config)


register_builder("policy", _build_policy)


def save_checkpoint(path, *, kind: str, config: dict, model_state: dict, optimizer_state: dict | None = None,
                    step: int = 0, extra: dict | None = None) -> Path:
    """Write a checkpoint atomically (temp file in the same folder, fsync, os.replace). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "kind": kind, "config": dict(config), "model_state": model_state,
        "optimizer_state": optimizer_state, "step": int(step), "extra": extra or {},
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path, kind: str | None = None, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` (weights only). UserError if missing, corrupt,
    holding pickled objects, not our format, or of another kind than `kind`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt file written by a train_* script")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Weights only" in str(err) or "Unsupported global" in str(err):
            raise UserError(f"refusing to load {path}: it holds pickled Python objects, not only weights "
                            f"({_first_line(err)}); use a checkpoint written by this project") from err
        raise UserError(f"checkpoint {path} is corrupt or truncated ({_first_line(err)}); "
                        f"retrain or use another file") from err
    except Exception as err:  # torch raises many types for damaged files (RuntimeError, EOFError, KeyError, ...)
        raise UserError(f"checkpoint {path} is corrupt or truncated ({_first_line(err)}); "
                        f"retrain or use another file") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a PokéDreamer checkpoint (no format {FORMAT!r}); "
                        f"use a file written by this project's train_* scripts")
    wanted = {"kind": str, "config": dict, "model_state": dict, "step": int, "extra": dict}
    damaged = [key for key, kind_ in wanted.items() if not isinstance(ckpt.get(key), kind_)]
    if damaged or not all(isinstance(v, torch.Tensor) for v in ckpt["model_state"].values()):
        raise UserError(f"checkpoint {path} is damaged (bad or missing {', '.join(damaged) or 'model_state'}); "
                        f"retrain or use another file")
    if kind is not None and ckpt["kind"] != kind:
        raise UserError(f"{path} is a {ckpt['kind']!r} checkpoint, but a {kind!r} checkpoint is needed here")
    return ckpt


def build_model(ckpt: dict, *, load_state: bool = True, device="cpu") -> torch.nn.Module:
    """Rebuild the model a checkpoint describes (from its config) and load its weights; eval mode.
    UserError if the config is invalid for this code or the weights do not fit the architecture."""
    kind = ckpt["kind"]
    if kind not in _BUILDERS:
        raise UserError(f"no model builder for checkpoint kind {kind!r}; known kinds: {', '.join(sorted(_BUILDERS))}")
    try:
        model = _BUILDERS[kind](ckpt["config"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise UserError(f"the {kind!r} checkpoint's config does not fit this code: {_first_line(err)}") from err
    if load_state:
        check_state_matches(model, ckpt["model_state"], what=f"the {kind!r} checkpoint")
        model.load_state_dict(ckpt["model_state"])
    return model.to(device).eval()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:160] if text else type(err).__name__)


def check_state_matches(model: torch.nn.Module, state: dict, what: str = "the checkpoint") -> None:
    """UserError naming the first differing parameters if `state` does not fit `model` exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"different shapes {len(shapes)} (e.g. {'; '.join(shapes[:3])}; checkpoint vs model)")
        raise UserError(f"{what} holds weights of another architecture: {', '.join(parts)}")


def rng_state() -> dict:
    """The torch, NumPy and Python RNG states as plain data (safe for weights-only loading)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keep_freed_memory() -> bool:
    """On glibc (Linux): serve every allocation from the heap and keep freed memory for reuse instead of
    handing it back to the OS (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 1 GiB). A training step frees
    and re-allocates the same large activations every step; by default glibc maps each block over
    32 MB afresh (mmap) and unmaps it when freed, so every step page-faults it in and zeroes it again
    (faithful at 8x15: ~1.7 million minor page faults per step, ~0.19 million with this once the heap has
    grown; benchmark.py's minor_page_faults_per_step). Numerics are untouched; the cost is memory: the
    heap keeps its peak and some fragmentation (faithful at 8x15: 4.6-4.8 GB peak RSS instead of 3.4-3.5). Call it at process start, before
    large tensors exist. Returns whether it applied (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or "libc.so" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def train_precision(setting: str, device) -> str:
    """`RSSMConfig.train_precision` as it runs on `device`: "auto" is "bfloat16" where the device multiplies
    bfloat16 matrices natively (a CUDA GPU that supports it; an x86 CPU with AVX-512 BF16 or AMX, as Linux's
    /proc/cpuinfo lists them), else "float32" (elsewhere bfloat16 is emulated, slower than float32)."""
    if setting != "auto":
        return setting
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return "bfloat16" if device.type == "cpu" and flags & {"avx512_bf16", "amx_bf16"} else "float32"


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; UserError for an unavailable CUDA device."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available here; use --device cpu")
    return name
