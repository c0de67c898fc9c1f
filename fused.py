"""The project's hot CPU loops compiled (fused.cpp), built with the machine's C++ compiler on first use.

- `rollout`: `models.RSSM.greedy_rollout`, which calls it where `supported` says the model and tensors fit (CPU,
  float32, no gradients, a LayerNorm GRU with LayerNorm + SiLU MLPs: the default, pixels and tiny presets) and
  keeps its torch loop elsewhere (the faithful preset, CUDA, bfloat16).
- `cross_entropy`: the per-cell cross-entropy of a tiles model's training loss (`models.WorldModel.forward`), one
  pass per row for the loss and its gradient, on CPU float32 and bfloat16 logits; `F.cross_entropy` elsewhere.

The first use builds the extension (~22 s here, README; g++ and Python's headers, which torch's CPU build needs)
into torch's extension cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), one build per CPU kind (it is
compiled for the CPU it runs on). Where the build fails, one warning line and torch's own ops.
POKEDREAMER_FUSED=0 in the environment, or `with fused.off():`, keeps torch's ops (benchmark.py times the two in
turns).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("fused.cpp")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
_off = [False]  # `off()` sets it
# batch rows a thread rolls out on its own: at batch 1024, 256 and 512 alike, 128 ~3% slower (README, session 21)
TILE = 256
ONEDNN = True  # the prior's products of whole tiles through oneDNN, ~6% faster than False: ATen's / MKL's, as the GRU's


def enabled() -> bool:
    return not _off[0] and os.environ.get("POKEDREAMER_FUSED", "1") != "0"


@contextlib.contextmanager
def off():
    """Inside: greedy rollouts take the torch loop, the tile loss torch's cross-entropy."""
    before, _off[0] = _off[0], True
    try:
        yield
    finally:
        _off[0] = before


def _cpu_key() -> str:
    """8 hex digits naming this CPU's kind (its feature flags): a build made with -march=native elsewhere is not
    loaded here."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


@functools.cache
def build(flags: tuple):
    """The compiled extension (built on first call, then loaded from torch's cache), or None with one warning line
    where it cannot be built. Named by the CPU kind and the flags, so that each build keeps its own folder."""
    try:
        from torch.utils import cpp_extension

        key = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:6]
        name = f"pokedreamer_fused_{_cpu_key()}_{key}"
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
        lock = folder / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > 600:  # left by a build that was killed
            lock.unlink(missing_ok=True)
        if not any(folder.glob(f"{name}*.so")):
            print(f"building {SOURCE.name} for this CPU (once, ~20 s; into {folder}) ...", file=sys.stderr, flush=True)
        return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=list(flags),
                                  extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler or headers: the torch loop does the same, slower
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        why = next((line for line in lines if "error:" in line), lines[0])  # the compiler's own words
        warnings.warn(f"fused.cpp not built ({why[:200]}); imagination and the tile loss use torch's ops", stacklevel=2)
        return None


def _extension():
    return build(FLAGS)


def ready() -> bool:
    """Whether fused.cpp's kernels are used here: enabled, and built (now, if it was not yet: call it before a timed
    loop)."""
    return enabled() and _extension() is not None


def supported(rssm, h: torch.Tensor) -> bool:
    """Whether `rollout` can run this RSSM on h: float32 on the CPU (state and weights), no gradients, the layer
    kinds it knows."""
    cfg, weight = rssm.cfg, next(rssm.parameters())
    return (h.device.type == weight.device.type == "cpu" and h.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled() and cfg.gru == "layernorm" and cfg.mlp_norm == "layer"
            and cfg.mlp_act == "silu" and ready())


def _weights(rssm) -> tuple:
    """The RSSM's weights as fused.cpp reads them: contiguous float32, detached (the C++ loop's threads
    have grad mode on), each layer (in, out), the prior's outputs class-major, the prior's layers also in oneDNN's
    packed layout. Kept on the RSSM until a parameter changes (each in-place update bumps its version), so that a
    rollout does not remake them."""
    key = (TILE, ONEDNN, *((id(p), p._version) for p in rssm.parameters()))
    cached = getattr(rssm, "_fused_weights", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    cfg, cell, in_norm = rssm.cfg, rssm.cell, rssm.img_in[1]
    table, in_bias = rssm._input_table()  # (S C + A, X), (X)
    block_weight = cell.linear.weight.t().unsqueeze(0) if cell.blocks == 1 else cell.block_weight  # dense: 1 block
    layers = [m for m in rssm.prior_net if isinstance(m, torch.nn.Linear)]
    norms = [m for m in rssm.prior_net if isinstance(m, torch.nn.LayerNorm)]
    eps = {m.eps for m in (in_norm, cell.norm, *norms)}
    assert len(eps) == 1, "the fused loop takes one LayerNorm eps"
    weights, biases = [m.weight.t() for m in layers], [m.bias for m in layers]  # each (in, out)
    class_major = torch.arange(cfg.stoch * cfg.classes).view(cfg.stoch, cfg.classes).t().flatten()
    weights[-1], biases[-1] = weights[-1][:, class_major], biases[-1][class_major]  # outputs (C, S)
    plain = lambda t: t.detach().float().contiguous()  # noqa: E731
    with torch.no_grad():
        weights = [plain(w) for w in weights]
        try:  # oneDNN's layout of each prior layer for whole tiles: its products are faster than MKL's there
            reorder = torch.ops.mkldnn._reorder_linear_weight
            packed = [reorder(w.t().contiguous(), TILE) for w in weights] if ONEDNN else []
        except (AttributeError, RuntimeError, NotImplementedError):  # a torch without oneDNN: MKL's / ATen's alone
            packed = []
        prepared = (plain(table), plain(in_bias), plain(in_norm.weight), plain(in_norm.bias), plain(block_weight),
                    plain(cell.norm.weight), plain(cell.norm.bias), weights, [plain(b) for b in biases],
                    [plain(m.weight) for m in norms], [plain(m.bias) for m in norms], packed, cfg.stoch,
                    cfg.classes, eps.pop(), TILE)
    rssm._fused_weights = (key, prepared)
    return prepared


def rollout(rssm, h, z, actions) -> torch.Tensor:
    """`RSSM.greedy_rollout` (same arguments, same features to float tolerance) in fused.cpp's loop."""
    start = (t.detach().float().contiguous() for t in (h, z))
    return _extension().greedy_rollout(*start, actions.long().contiguous(), *_weights(rssm))


class _CrossEntropy(torch.autograd.Function):
    """fused.cpp's per-row cross-entropy: the forward keeps the gradient it made, the backward scales it in place."""

    @staticmethod
    def forward(ctx, logits, target):
        loss, ctx.grad = _extension().cross_entropy_forward(logits, target, logits.requires_grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("fused.cross_entropy's gradient was used already (no retain_graph here)")
        _extension().cross_entropy_backward(grad, upstream.float().contiguous())
        return grad, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(logits, target, reduction="none") of (N, V) logits and (N,) int64 targets, in float32 (as
    autocast computes it), by fused.cpp on CPU float32 / bfloat16 logits, by torch elsewhere."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) and ready():
        return _CrossEntropy.apply(logits.contiguous(), target.long().contiguous())
    return F.cross_entropy(logits, target, reduction="none")
