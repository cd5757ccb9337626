"""Conflicting-gradient projection (PCGrad, Yu et al. 2020) as used by FedBone's aggregation.

For a permutation ``order`` of the K sites and each site i::

    g_i' = g_i
    for j in order, j != i, ||g_j||^2 > 0:
        if g_i' . g_j < 0:  g_i' -= (g_i' . g_j / ||g_j||^2) g_j     # against the ORIGINAL g_j
    combined = sum_i r_i g_i'            # r_i = 1/K ("mean") or 1 ("sum"), or normalised weights

Every g_i' is a linear combination of the original gradients, g_i' = sum_k C[i, k] g_k, so
the whole procedure runs on the K x K Gram matrix G = grads @ grads.T (float64) and the
coefficients C; the P-dimensional data is touched twice: once for G, once for the final
combination ``w @ grads`` with w = r @ C.

The Gram matrix has one definition, :func:`gram_entries`: a fixed element-wise recipe in
float64 (exact products, a fixed summation tree), so every entry is a function of its two rows
alone -- bit-identical whatever the arrival order of the slots, the thread count, or whether the
compiled kernel of :mod:`.native` or the PyTorch path computed it.
:class:`~.base.ProjectionAggregator` builds it incrementally as site slots arrive;
:func:`project_conflicting` builds it in one pass (:func:`incremental_gram`), so both give the
same bits for the same order. :func:`gram_matrix` (one float64 GEMM per column block, whose
rounding depends on the BLAS kernel) only serves the plain aggregators' statistics where the
compiled kernel is unavailable.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import AggregationError
from . import native as _native
from .base import REDUCTIONS, AggregationStats

# Columns per Gram chunk are chosen so one float64 chunk of K rows is about this size.
GRAM_CHUNK_BYTES = 4 << 20
# Lanes of the order-independent Gram (:func:`gram_entries`): a power of two, fixed, so an
# entry's summation order depends only on the number of columns P. 256 float64 accumulators per
# row fit in registers/L1 in the compiled kernel; the PyTorch path stays fast by running every
# column block at once (GRAM_BLOCK_CHUNKS sequential steps, not P / 256).
GRAM_LANES = 256
# Chunks of GRAM_LANES columns per column block: blocks are summed independently, then pairwise.
GRAM_BLOCK_CHUNKS = 64
# Columns per block of the final combination (one axpy per site per block).
COMBINE_COLUMNS = 1 << 22
# Dtypes whose products are exact in float64 (at most 24 significand bits each).
_EXACT_PRODUCT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _site_label(k: int, site_names: tuple[str, ...] | None) -> str:
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


def gram_matrix(grads: Tensor, chunk_bytes: int = GRAM_CHUNK_BYTES) -> Tensor:
    """G = grads @ grads.T (K, K) in float64, symmetrised.

    float64 input is one GEMM; other dtypes are cast to float64 in column chunks of about
    ``chunk_bytes`` so the extra memory stays bounded, accumulating in float64.
    """
    k, p = grads.shape
    g = grads.detach()
    if g.dtype == torch.float64:
        gram = g @ g.T  # (K, K)
    else:
        cols = max(1, chunk_bytes // (8 * k))
        gram = torch.zeros(k, k, dtype=torch.float64, device=g.device)
        for start in range(0, p, cols):
            chunk = g[:, start : start + cols].to(torch.float64)  # (K, cols)
            gram.addmm_(chunk, chunk.T)
    return ((gram + gram.T) * 0.5).cpu()


def _checked_gram(grads: Tensor, site_names: tuple[str, ...] | None, *, exact: bool) -> Tensor:
    """Gram matrix of ``grads``; raises naming every site whose gradient is not finite.

    ``exact``: always the order-independent Gram of :func:`incremental_gram` (the projection's
    result then has the bits of :class:`~.base.ProjectionAggregator`'s). Otherwise (statistics
    only) that Gram where the compiled kernel makes it the fast one, else :func:`gram_matrix`.
    """
    if exact or _native.supports(grads.detach()):
        gram = incremental_gram(grads)
    else:
        gram = gram_matrix(grads)
    return check_gram_finite(grads, gram, site_names)


def check_gram_finite(grads: Tensor, gram: Tensor, site_names: Sequence[str] | None) -> Tensor:
    """Return ``gram`` if finite; otherwise raise naming every site whose gradient is not finite."""
    if bool(torch.isfinite(gram).all()):
        return gram
    names = None if site_names is None else tuple(site_names)
    # Failure path only: a non-finite entry anywhere in a row makes its diagonal non-finite.
    bad = [k for k in range(grads.shape[0]) if not bool(torch.isfinite(grads[k]).all())]
    if bad:
        labels = ", ".join(_site_label(k, names) for k in bad)
        raise AggregationError(
            f"non-finite backbone gradient (NaN or Inf) from {labels}; drop or re-run those sites' "
            "contributions for this round (check their learning rate and loss scaling)"
        )
    huge = [k for k in range(grads.shape[0]) if not bool(torch.isfinite(gram[k, k]))]
    labels = ", ".join(_site_label(k, names) for k in huge)
    raise AggregationError(f"backbone gradient norm overflows float64 for {labels}")


def gram_lanes(num_params: int) -> int:
    """Lane count of :func:`gram_entries` for P columns: min(GRAM_LANES, next power of two >= P)."""
    lanes = 1
    while lanes < num_params and lanes < GRAM_LANES:
        lanes *= 2
    return lanes


def gram_layout(num_params: int) -> tuple[int, int, int]:
    """(lanes L, chunks per block C, number of column blocks) of :func:`gram_entries` for P columns."""
    lanes = gram_lanes(num_params)
    chunks = max(1, int(GRAM_BLOCK_CHUNKS))
    width = lanes * chunks
    return lanes, chunks, -(-num_params // width)


def gram_workspace_numel(rows: int, num_params: int) -> int:
    """Elements of the product buffer :func:`gram_entries` needs for ``rows`` float64 rows."""
    lanes, _, blocks = gram_layout(num_params)
    return rows * blocks * lanes


def _pairwise_halving(acc: Tensor, width: int) -> None:
    """acc[..., 0] = the sum of acc[..., :width] (width a power of two) by fixed pairwise halving."""
    while width > 1:
        half = width // 2
        acc[..., :half].add_(acc[..., half:width])
        width = half


def gram_entries(grads: Tensor, lo: int, hi: int, row: int, workspace: Tensor | None = None, *,
                 native: bool = True) -> Tensor:
    """Gram entries G[i, row] for i in lo..hi-1 (float64, shape (hi - lo,)).

    Each entry is a fixed function of rows i and ``row`` alone, whatever other rows are in the
    call, which of the two is ``row``, where they sit, or how many threads run. With (L, C, B) =
    :func:`gram_layout` (P), the columns form B blocks of C * L (the last may be short); in block
    b, lane l accumulates in float64, from 0.0, the products x_i[t] * x_row[t] for
    t = b*C*L + l, b*C*L + l + L, ... (inside the block, in increasing t); the L lanes of a block
    are summed by pairwise halving, then the B block sums, padded with zeros to a power of two,
    by pairwise halving. Every step is an element-wise IEEE operation with one rounding: for
    float32 (also float16, bfloat16) inputs the float64 products are exact, so a fused
    multiply-add rounds the same; float64 inputs are multiplied, then added, as two operations.
    The PyTorch path runs every block at once (C steps over (n, B, L) slices). ``workspace``:
    optional product buffer for float64 inputs (same dtype and device, at least
    :func:`gram_workspace_numel` (hi - lo, P) elements), reused across calls.

    float32 rows on CPU go through the compiled kernel of :mod:`.native` when it is available
    (one read of the rows, 256 accumulators per row in registers and L1; the same bits, see
    there); ``native=False`` forces the PyTorch path.
    """
    if not (0 <= lo < hi <= grads.shape[0] and 0 <= row < grads.shape[0]):
        raise AggregationError(f"Gram entry rows {lo}..{hi - 1} or row {row} out of range for {grads.shape[0]} rows")
    g = grads.detach()
    n, p = hi - lo, g.shape[1]
    lanes, chunks, blocks = gram_layout(p)
    if native and _native.supports(g):
        return _native.gram_entries_f32(g, lo, hi, row, lanes, chunks)
    acc = torch.zeros(n, blocks, lanes, dtype=torch.float64, device=g.device)  # (n, B, L)
    rows, vec = g[lo:hi], g[row]
    width = lanes * chunks
    full = p // width  # blocks of C whole chunks; a short last block is done chunk by chunk below
    exact = g.dtype in _EXACT_PRODUCT_DTYPES
    buf: Tensor | None = None
    if not exact:
        need = n * blocks * lanes
        if workspace is None or workspace.numel() < need or workspace.dtype != g.dtype or workspace.device != g.device:
            workspace = torch.empty(need, dtype=g.dtype, device=g.device)
        buf = workspace[:need].view(n, blocks, lanes)

    def accumulate(a: Tensor, x: Tensor, v: Tensor, b: Tensor | None) -> None:
        if b is None:  # acc is float64: the operands are widened (exactly) and the products are exact
            a.addcmul_(x, v)
        else:
            torch.mul(x, v, out=b)
            a.add_(b)

    if full:
        xb = rows[:, : full * width].reshape(n, full, chunks, lanes)  # a view: rows are contiguous
        vb = vec[: full * width].view(full, chunks, lanes)
        for c in range(chunks):
            accumulate(acc[:, :full], xb[:, :, c], vb[:, c], None if buf is None else buf[:, :full])
    for start in range(full * width, p, lanes):  # the short last block
        w = min(lanes, p - start)
        accumulate(acc[:, full, :w], rows[:, start : start + w], vec[start : start + w],
                   None if buf is None else buf[:, full, :w])
    _pairwise_halving(acc, lanes)  # lanes of each block
    span = 1
    while span < blocks:
        span *= 2
    sums = torch.zeros(n, span, dtype=torch.float64, device=g.device)  # (n, B padded to 2^k)
    sums[:, :blocks] = acc[:, :, 0]
    _pairwise_halving(sums, span)  # then the blocks
    return sums[:, 0].cpu()


def incremental_gram(
    grads: Tensor,
    gram: Tensor | None = None,
    prepared: Sequence[bool] | None = None,
    workspace: Tensor | None = None,
) -> Tensor:
    """Complete the order-independent Gram matrix (K, K) float64 of ``grads`` (in place of ``gram``).

    ``gram``/``prepared`` hold entries already computed by :func:`gram_entries` between rows
    flagged in ``prepared``; the missing rows are added in index order. Without them this
    computes the whole matrix. The result is bit-identical however the entries were split.
    """
    k = grads.shape[0]
    if gram is None or prepared is None:
        if _native.supports(grads.detach()):  # one pass over the rows for every entry, the same bits
            lanes, chunks, _ = gram_layout(grads.shape[1])
            return _native.gram_all_f32(grads, lanes, chunks)
        gram = torch.zeros(k, k, dtype=torch.float64)
        prepared = [False] * k
    done = [bool(x) for x in prepared]
    for row in range(k):
        if not done[row]:
            add_gram_row(grads, gram, done, row, workspace)
    return gram


def _row_runs(rows: list[int], max_gap: int = 2) -> list[tuple[int, int]]:
    """Sorted ``rows`` as [lo, hi) runs; runs closer than ``max_gap`` rows are merged."""
    runs: list[tuple[int, int]] = []
    for i in rows:
        if runs and i - runs[-1][1] <= max_gap:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def add_gram_row(grads: Tensor, gram: Tensor, done: list[bool], row: int, workspace: Tensor | None = None) -> None:
    """Fill G[row, i] = G[i, row] for ``row`` and every i with done[i]; then set done[row].

    ``gram``: a CPU float64 (K, K) tensor, written in place (through a NumPy view: the K x K
    bookkeeping is on the latency path after the last slot arrives).
    """
    done[row] = False
    rows = sorted([i for i, ok in enumerate(done) if ok] + [row])
    table = gram.numpy()
    for lo, hi in _row_runs(rows):  # entries do not depend on how the rows are grouped
        dots = gram_entries(grads, lo, hi, row, workspace).numpy()  # (hi - lo,)
        idx = np.array([i for i in rows if lo <= i < hi], dtype=np.int64)
        vals = dots[idx - lo]
        table[idx, row] = vals
        table[row, idx] = vals
    done[row] = True


def _projection_coefficients(gram: Tensor, order: list[int]) -> tuple[Tensor, int]:
    """Coefficients C (K, K) float64 with g_i' = sum_k C[i, k] g_k, and the number of projections.

    Each row C[i] evolves independently over ``order``, so the loop runs over j for all
    rows i at once: d_i = g_i' . g_j = C[i] @ G[:, j]; where d_i < 0 (i != j),
    C[i, j] -= d_i / G[j, j]. In NumPy: K steps on K x K arrays, where PyTorch's per-call
    overhead would dominate (this runs after the last slot arrives).
    """
    g = gram.detach().cpu().numpy()
    k = g.shape[0]
    coeffs = np.eye(k, dtype=np.float64)  # (K, K)
    diag = np.diagonal(g).tolist()
    applied = 0
    for j in order:
        if diag[j] == 0.0:  # all-zero gradient: nothing to project against
            continue
        d = coeffs @ g[:, j]  # (K,)
        d[j] = 0.0  # a site is never projected against itself
        conflict = d < 0
        n = int(conflict.sum())
        if n:
            coeffs[conflict, j] -= d[conflict] / diag[j]
            applied += n
    return torch.from_numpy(coeffs), applied


def project_from_gram(
    gram: Tensor,
    order: Sequence[int] | Tensor,
    reduction: str = "mean",
    weights: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Final per-site coefficient vector w (K,) float64 from a Gram matrix (K, K) alone.

    The aggregated gradient is ``w @ grads``.
    """
    if not isinstance(gram, Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise AggregationError("Gram matrix must be a non-empty square (K, K) tensor")
    gram = gram.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(gram).all()):
        raise AggregationError("Gram matrix has non-finite entries")
    k = gram.shape[0]
    r = reduction_weights(k, reduction, weights)
    coeffs, _ = _projection_coefficients(gram, check_order(order, k))
    return r @ coeffs


def _gram_stats(gram: Tensor) -> tuple[int, float | None, float | None, tuple[float, ...]]:
    """(conflicting_pairs, min_cosine, mean_cosine, site_norms) over unordered pairs i < j."""
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


def _combine(grads: Tensor, w: Tensor, *, native: bool = True) -> Tensor:
    """w @ grads (P,) in grads' dtype, computed in that dtype.

    Column blocks, last first (the Gram pass just read the last columns, so some are still
    cached); per block one scaled copy and K - 1 in-place axpys, each parallel over columns.
    float32 rows on CPU go through :mod:`.native`'s kernel when it is available (the same
    scaled copy and fused axpys per element, in cache-sized tiles: one read of the rows).
    """
    g = grads.detach()
    k, p = g.shape
    coeffs = w.to(dtype=g.dtype).tolist()  # the weights rounded to grads' dtype, as Python floats
    if native and _native.supports(g):
        return _native.combine_f32(g, coeffs)
    out = torch.empty(p, dtype=g.dtype, device=g.device)
    starts = list(range(0, p, COMBINE_COLUMNS))
    for start in reversed(starts):
        end = min(p, start + COMBINE_COLUMNS)
        o = out[start:end]
        torch.mul(g[0, start:end], coeffs[0], out=o)
        for j in range(1, k):
            o.add_(g[j, start:end], alpha=coeffs[j])
    return out


def project_conflicting(
    grads: Tensor,
    *,
    generator: torch.Generator | None = None,
    order: Sequence[int] | Tensor | None = None,
    reduction: str = "mean",
    weights: Sequence[float] | Tensor | None = None,
    site_names: Sequence[str] | None = None,
) -> tuple[Tensor, AggregationStats]:
    """Project conflicting site gradients and reduce them: (combined (P,), stats).

    ``grads`` is (K, P). The site order is ``order`` if given, otherwise
    ``torch.randperm(K, generator=generator)`` (the global generator when None).
    """
    k = check_grads_shape(grads)
    names = check_site_names(site_names, k)
    r = reduction_weights(k, reduction, weights)
    if order is not None and generator is not None:
        raise AggregationError("pass either a projection order or a generator, not both")
    perm = check_order(order if order is not None else torch.randperm(k, generator=generator), k)
    gram = _checked_gram(grads, names, exact=True)
    return project_with_gram(grads, gram, perm, r, names)


def project_with_gram(
    grads: Tensor,
    gram: Tensor,
    perm: list[int],
    r: Tensor,
    names: tuple[str, ...] | None,
) -> tuple[Tensor, AggregationStats]:
    """The projection given a checked finite Gram matrix of ``grads``, an order and weights r."""
    k = grads.shape[0]
    coeffs, applied = _projection_coefficients(gram, perm)
    w = r @ coeffs  # (K,)
    pairs, min_cos, mean_cos, norms = _gram_stats(gram)
    stats = AggregationStats(
        method="projection",
        num_sites=k,
        conflicting_pairs=pairs,
        min_cosine=min_cos,
        mean_cosine=mean_cos,
        site_norms=norms,
        projection_order=tuple(perm),
        projections_applied=applied,
        coefficients=tuple(w.tolist()),
        site_names=names,
    )
    return _combine(grads, w), stats


def plain_with_gram(
    grads: Tensor,
    gram: Tensor,
    reduction: str,
    r: Tensor,
    names: tuple[str, ...] | None,
) -> tuple[Tensor, AggregationStats]:
    """The plain (weighted) reduction ``r @ grads`` with statistics from a checked Gram matrix."""
    pairs, min_cos, mean_cos, norms = _gram_stats(gram)
    stats = AggregationStats(
        method=reduction,
        num_sites=grads.shape[0],
        conflicting_pairs=pairs,
        min_cosine=min_cos,
        mean_cosine=mean_cos,
        site_norms=norms,
        projection_order=None,
        projections_applied=0,
        coefficients=tuple(r.tolist()),
        site_names=names,
    )
    return _combine(grads, r), stats


def _plain_aggregate(
    grads: Tensor,
    reduction: str,
    weights: Sequence[float] | Tensor | None,
    site_names: Sequence[str] | None,
) -> tuple[Tensor, AggregationStats]:
    k = check_grads_shape(grads)
    names = check_site_names(site_names, k)
    r = reduction_weights(k, reduction, weights)
    return plain_with_gram(grads, _checked_gram(grads, names, exact=False), reduction, r, names)


def mean_aggregate(
    grads: Tensor,
    *,
    weights: Sequence[float] | Tensor | None = None,
    site_names: Sequence[str] | None = None,
) -> tuple[Tensor, AggregationStats]:
    """(Weighted) mean of the K site gradients (K, P) -> (P,), with Gram statistics."""
    return _plain_aggregate(grads, "mean", weights, site_names)


def sum_aggregate(
    grads: Tensor,
    *,
    weights: Sequence[float] | Tensor | None = None,
    site_names: Sequence[str] | None = None,
) -> tuple[Tensor, AggregationStats]:
    """(Weighted) sum of the K site gradients (K, P) -> (P,), with Gram statistics."""
    return _plain_aggregate(grads, "sum", weights, site_names)
