"""The Gram matrix of the site gradients, the input checks, the statistics and the final combination.

Every aggregator here is a function of the Gram matrix G of [g_1 .. g_K] (and, for
GPAggregation, of the previous aggregate g' as row K + 1): the (K+1) x (K+1) matrix comes from
ONE blocked GEMM over the P columns (:func:`gram_matrix`), the K x K coefficient algebra runs in
NumPy on it, and the P-dimensional data is touched a second time only by the combination
``w @ grads`` (:func:`combine`, one GEMV).

Precision: each column block is upcast to float64 and multiplied in float64 (``addmm_``), so an
entry is accurate to float64 rounding of its exact value for float32 slots. The summation order
inside a block is the BLAS kernel's, which depends on the thread count: results are reproducible
bit for bit on one machine with the same number of threads, not across thread counts.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import AggregationError
from .base import REDUCTIONS, AggregationStats

# Bytes of one float64 column block of the (K+1)-row Gram operand on CPU: it fits in a core's L2,
# so the upcast copy is still cached when the GEMM reads it (measured: 1 MiB is the fastest of
# 256 KiB .. 4 MiB on this project's 2-core machine). On an accelerator, launches cost more than
# cache misses: large blocks.
GRAM_BLOCK_BYTES_CPU = 1 << 20
GRAM_BLOCK_BYTES_DEVICE = 256 << 20


def check_grads_shape(grads: Tensor) -> int:
    """Check ``grads`` is a 2-D floating-point (K, P) tensor with K >= 1; return K."""
    if not isinstance(grads, Tensor):
        raise AggregationError(f"site gradients must be a torch.Tensor, got {type(grads).__name__}")
    if grads.dim() != 2:
        raise AggregationError(
            f"site gradients must be a 2-D (num_sites, num_params) tensor, got {grads.dim()} dimensions"
        )
    if not grads.is_floating_point():
        raise AggregationError(f"site gradients must be floating point, got dtype {grads.dtype}")
    if grads.shape[0] == 0:
        raise AggregationError("no site gradients to aggregate (num_sites == 0)")
    return int(grads.shape[0])


def site_label(k: int, site_names: Sequence[str] | None) -> str:
    return f"site {site_names[k]!r}" if site_names is not None else f"site index {k}"


def check_site_names(site_names: Sequence[str] | None, num_sites: int) -> tuple[str, ...] | None:
    if site_names is None:
        return None
    names = tuple(str(n) for n in site_names)
    if len(names) != num_sites:
        raise AggregationError(f"got {len(names)} site names for {num_sites} site gradients")
    return names


def reduction_weights(
    num_sites: int, reduction: str = "mean", weights: Sequence[float] | Tensor | None = None
) -> Tensor:
    """Per-site reduction weights r (K,) float64: 1/K or 1, or ``weights`` (normalised for "mean")."""
    if reduction not in REDUCTIONS:
        raise AggregationError(f"unknown reduction {reduction!r}; expected one of {list(REDUCTIONS)}")
    if weights is None:
        r = torch.ones(num_sites, dtype=torch.float64)
    else:
        r = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1).clone()
        if r.numel() != num_sites:
            raise AggregationError(f"got {r.numel()} site weights for {num_sites} site gradients")
        if not bool(torch.isfinite(r).all()):
            raise AggregationError("site weights must be finite")
        if bool((r < 0).any()):
            raise AggregationError("site weights must be non-negative")
        if not bool((r > 0).any()):
            raise AggregationError("site weights are all zero; at least one site must have positive weight")
    return r / r.sum() if reduction == "mean" else r


def check_order(order: Sequence[int] | Tensor, num_sites: int) -> list[int]:
    """Return ``order`` as a list of ints after checking it is a permutation of range(K)."""
    if isinstance(order, Tensor):
        if order.dim() != 1 or order.is_floating_point() or order.dtype == torch.bool:
            raise AggregationError("projection order must be a 1-D integer tensor or a sequence of ints")
        items = [int(x) for x in order.tolist()]
    else:
        try:
            items = [operator.index(x) for x in order]
        except TypeError as exc:
            raise AggregationError("projection order must be a sequence of ints") from exc
    if sorted(items) != list(range(num_sites)):
        raise AggregationError(f"projection order must be a permutation of range({num_sites})")
    return items


def gram_matrix(grads: Tensor, extra: Tensor | None = None, block_bytes: int | None = None) -> Tensor:
    """G = M @ M.T (float64, on CPU) for M = ``grads`` (K, P), with ``extra`` (P,) as row K if given.

    One blocked GEMM: the columns go in blocks of about ``block_bytes`` of float64 (default
    :data:`GRAM_BLOCK_BYTES_CPU`, or :data:`GRAM_BLOCK_BYTES_DEVICE` off the CPU); each block is
    copied (upcast) into one reused float64 buffer of K (+1) rows and ``G += B @ B.T`` accumulates
    in float64. Memory beyond the inputs: one block. The result is symmetrised exactly.
    """
    g = grads.detach()
    k, p = g.shape
    rows = k + (extra is not None)
    if extra is not None:
        extra = extra.detach().reshape(-1)
        if extra.numel() != p:
            raise AggregationError(f"previous aggregate has {extra.numel()} entries, the gradients {p}")
        extra = extra.to(g.device)
    if block_bytes is None:
        block_bytes = GRAM_BLOCK_BYTES_CPU if g.device.type == "cpu" else GRAM_BLOCK_BYTES_DEVICE
    cols = max(1, min(p, block_bytes // (8 * rows)))
    gram = torch.zeros(rows, rows, dtype=torch.float64, device=g.device)
    if g.dtype == torch.float64 and extra is None:  # no upcast needed: the GEMM reads strided slices
        for start in range(0, p, cols):
            block = g[:, start : start + cols]  # (K, cols)
            gram.addmm_(block, block.T)
    else:
        buf = torch.empty(rows, cols, dtype=torch.float64, device=g.device)
        for start in range(0, p, cols):
            end = min(p, start + cols)
            block = buf[:, : end - start]  # (rows, cols)
            block[:k].copy_(g[:, start:end])
            if extra is not None:
                block[k].copy_(extra[start:end])
            gram.addmm_(block, block.T)
    gram = gram.cpu()
    return (gram + gram.T) * 0.5


def check_gram_finite(grads: Tensor, gram: Tensor, site_names: Sequence[str] | None) -> Tensor:
    """Return ``gram`` if finite; otherwise raise naming every site whose gradient is not finite."""
    if bool(torch.isfinite(gram).all()):
        return gram
    names = None if site_names is None else tuple(site_names)
    # Failure path only: a non-finite entry anywhere in a row makes its diagonal non-finite.
    bad = [k for k in range(grads.shape[0]) if not bool(torch.isfinite(grads[k]).all())]
    if bad:
        labels = ", ".join(site_label(k, names) for k in bad)
        raise AggregationError(
            f"non-finite backbone gradient (NaN or Inf) from {labels}; drop or re-run those sites' "
            "contributions for this round (check their learning rate and loss scaling)"
        )
    huge = [k for k in range(grads.shape[0]) if not bool(torch.isfinite(gram[k, k]))]
    if not huge:  # only the previous aggregate's row (GPAggregation) can be left
        raise AggregationError("the previous aggregate is not finite or its norm overflows float64")
    labels = ", ".join(site_label(k, names) for k in huge)
    raise AggregationError(f"backbone gradient norm overflows float64 for {labels}")


def checked_gram(grads: Tensor, names: Sequence[str] | None, extra: Tensor | None = None) -> Tensor:
    """:func:`gram_matrix` of ``grads`` (and ``extra``), checked finite (raises naming bad sites)."""
    return check_gram_finite(grads, gram_matrix(grads, extra), names)


def gram_stats(gram: Tensor) -> tuple[int, float | None, float | None, tuple[float, ...]]:
    """(conflicting_pairs, min_cosine, mean_cosine, site_norms) over unordered pairs i < j of a K x K Gram."""
    g = gram.detach().cpu().numpy()
    k = g.shape[0]
    norms = np.sqrt(np.clip(np.diagonal(g), 0.0, None))  # (K,)
    iu, ju = np.triu_indices(k, 1)
    dots = g[iu, ju]  # (K(K-1)/2,)
    denom = norms[iu] * norms[ju]
    safe = denom > 0
    cos = np.where(safe, dots / np.where(safe, denom, 1.0), 0.0)
    cos = np.clip(cos, -1.0, 1.0)
    conflicting = int((dots < 0).sum())
    if dots.size == 0:
        return conflicting, None, None, tuple(norms.tolist())
    return conflicting, float(cos.min()), float(cos.mean()), tuple(norms.tolist())


def norm_ratio_to_mean(gram: Tensor, w: Tensor) -> float | None:
    """||w @ grads|| / ||mean of grads||, from the K x K Gram alone; None when the mean is zero."""
    g = gram.detach().cpu().numpy()
    wv = w.detach().cpu().numpy().astype(np.float64)
    m = np.full(g.shape[0], 1.0 / g.shape[0])
    mean_sq = float(m @ g @ m)
    if not mean_sq > 0.0:
        return None
    return math.sqrt(max(float(wv @ g @ wv), 0.0) / mean_sq)


def combine(grads: Tensor, w: Tensor) -> Tensor:
    """``w @ grads`` (P,) in grads' dtype and device: one GEMV, the second and last pass over the rows.

    ``w`` (K,) float64 is rounded to grads' dtype first. Raises if the result is not finite (weights
    far above 1 on gradients near the dtype's limit), so a caller never keeps such an aggregate.
    """
    g = grads.detach()
    out = w.to(device=g.device, dtype=g.dtype) @ g  # (P,)
    if not bool(torch.isfinite(out).all()):
        raise AggregationError(f"the aggregate overflows {g.dtype} (coefficients {w.tolist()})")
    return out


def build_stats(
    method: str,
    gram: Tensor,
    w: Tensor,
    names: tuple[str, ...] | None,
    *,
    order: Sequence[int] | None = None,
    applied: int = 0,
    attention: Tensor | None = None,
) -> AggregationStats:
    """The audit statistics of one aggregation from the K x K Gram of the ORIGINAL gradients and the
    final weights ``w`` (K,) (the result is ``w @ grads``)."""
    pairs, min_cos, mean_cos, norms = gram_stats(gram)
    return AggregationStats(
        method=method,
        num_sites=gram.shape[0],
        conflicting_pairs=pairs,
        min_cosine=min_cos,
        mean_cosine=mean_cos,
        site_norms=norms,
        projection_order=None if order is None else tuple(int(i) for i in order),
        projections_applied=applied,
        coefficients=tuple(w.tolist()),
        site_names=names,
        attention_weights=None if attention is None else tuple(attention.tolist()),
        norm_ratio_to_mean=norm_ratio_to_mean(gram, w),
    )
