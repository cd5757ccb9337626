"""Per-sample L2 clipping: pure functions on tensors, no noise and no state.

A "sample" is one index of the leading (batch) dimension; its norm is taken over every
other dimension. For a list of maps (multi-scale feature gradients) the norm is the JOINT
norm over all maps of the same sample, so the whole per-sample contribution is bounded by C.

Norms are computed overflow-safely (scaled by the per-sample max |x|, in float64), so that
huge activations are clipped to norm C rather than overflowing to ``inf`` and being zeroed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import PrivacyError


def _check_batch(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor):
        raise PrivacyError(f"{what}: expected a tensor, got {type(x).__name__}")
    if x.ndim < 1:
        raise PrivacyError(f"{what}: expected a batch dimension, got a 0-d tensor")
    if not torch.is_floating_point(x):
        raise PrivacyError(f"{what}: expected a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise PrivacyError(f"{what}: input contains non-finite values; refusing to release it")


def _sq_norms(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample (scale, squared norm of x/scale), float64, so that ||x_b|| = scale * sqrt(sq)."""
    flat = x.reshape(x.shape[0], -1).to(torch.float64)  # (B, P)
    if flat.shape[1] == 0:
        zeros = torch.zeros(flat.shape[0], dtype=torch.float64, device=x.device)
        return zeros, zeros
    scale = flat.abs().amax(dim=1)  # (B,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, ((flat / safe[:, None]) ** 2).sum(dim=1)


def per_sample_norms(maps: Sequence[Tensor]) -> Tensor:
    """Joint per-sample L2 norm over all ``maps`` (each (B, ...)), as a float64 tensor (B,)."""
    if len(maps) == 0:
        raise PrivacyError("per-sample norm: no tensors given")
    batch = maps[0].shape[0] if maps[0].ndim else -1
    for i, m in enumerate(maps):
        _check_batch(m, f"map {i}")
        if m.shape[0] != batch:
            raise PrivacyError(f"map {i}: batch size {m.shape[0]} differs from map 0's {batch}")
    parts = [_sq_norms(m) for m in maps]
    # Rescale every map's squared norm to a common per-sample scale (the largest) before summing.
    top = torch.stack([s for s, _ in parts]).amax(dim=0)  # (B,)
    safe_top = torch.where(top > 0, top, torch.ones_like(top))
    total = sum(((s / safe_top) ** 2) * q for s, q in parts)
    return top * torch.sqrt(torch.as_tensor(total))


def clip_factors(norms: Tensor, clip_norm: float) -> Tensor:
    """min(1, C / ||x_b||) per sample (float64); 1 for zero-norm samples."""
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.clamp(clip_norm / safe, max=1.0)


def _scale(x: Tensor, factors: Tensor) -> Tensor:
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return (x.to(torch.float64) * factors.reshape(shape)).to(x.dtype)


def clip_per_sample(x: Tensor, clip_norm: float) -> Tensor:
    """Scale each sample x[b] so that its L2 norm (over all non-batch dims) is <= ``clip_norm``."""
    return clip_joint_per_sample([x], clip_norm)[0]


def clip_joint_per_sample(maps: Sequence[Tensor], clip_norm: float) -> list[Tensor]:
    """Scale sample b of every map by the same factor so the JOINT norm over all maps is <= C."""
    factors = clip_factors(per_sample_norms(maps), clip_norm)
    return [_scale(m, factors) for m in maps]
