"""Conflicting-gradient projection (PCGrad, Yu et al. 2020) and the plain mean and sum, from the Gram matrix.

For an order of the K sites and each site i::

    g_i' = g_i
    for j in order, j != i, ||g_j||^2 > 0:
        if g_i' . g_j < 0:  g_i' -= (g_i' . g_j / ||g_j||^2) g_j     # against the ORIGINAL g_j
    combined = sum_i r_i g_i'            # r_i = 1/K ("mean") or 1 ("sum"), or normalised weights

Every g_i' is a linear combination of the original gradients, g_i' = sum_k C[i, k] g_k, so the
procedure runs on the K x K Gram matrix G (:func:`~.gram.gram_matrix`) and the coefficients C
(:func:`projection_coefficients`); the (K, P) data is read twice: once for G, once for the
combination ``w @ grads`` with w = r @ C. GPAggregation (:mod:`.gpaggregation`) reuses the same
coefficient loop on the Gram matrix of its attention-scaled gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import AggregationError
from .base import AggregationStats
from .gram import (
    build_stats,
    check_grads_shape,
    check_order,
    check_site_names,
    checked_gram,
    combine,
    reduction_weights,
)


def projection_coefficients(
    gram: Tensor, order: Sequence[int], scale: Tensor | None = None
) -> tuple[Tensor, int]:
    """Coefficients C (K, K) float64 with g_i' = sum_k C[i, k] g_k, and the number of projections.

    Each row C[i] evolves independently over ``order``, so the loop runs over j for all rows i
    at once: d_i = g_i' . g_j = C[i] @ G[:, j]; where d_i < 0 (i != j), C[i, j] -= d_i / G[j, j].
    K steps on K x K NumPy arrays (PyTorch's per-call overhead would dominate at this size).

    ``scale`` (K,) non-negative: project the scaled gradients h_k = scale_k g_k instead (C starts
    at diag(scale); C still multiplies the unscaled g_k). For scale_j > 0 the test h_i' . h_j < 0
    and the projection onto h_j's normal plane are those of g_j (the projection does not depend
    on h_j's length), so G's unscaled entries are used and no scale_j^2 G[j, j] can underflow; a
    site with scale_j = 0 has h_j = 0: nothing to project against.
    """
    g = gram.detach().cpu().numpy()
    k = g.shape[0]
    start = np.ones(k) if scale is None else scale.detach().cpu().numpy().astype(np.float64)
    coeffs = np.diag(start)  # (K, K)
    diag = np.diagonal(g).tolist()
    applied = 0
    for j in order:
        if diag[j] == 0.0 or start[j] == 0.0:  # an all-zero (scaled) gradient: nothing to project against
            continue
        d = coeffs @ g[:, j]  # (K,)
        d[j] = 0.0  # a site is never projected against itself
        conflict = d < 0
        n = int(conflict.sum())
        if n:
            coeffs[conflict, j] -= d[conflict] / diag[j]
            applied += n
    return torch.from_numpy(coeffs), applied


def check_gram(gram: Tensor) -> Tensor:
    """``gram`` as a finite square (K, K) float64 CPU tensor."""
    if not isinstance(gram, Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise AggregationError("Gram matrix must be a non-empty square (K, K) tensor")
    gram = gram.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(gram).all()):
        raise AggregationError("Gram matrix has non-finite entries")
    return gram


def project_from_gram(
    gram: Tensor,
    order: Sequence[int] | Tensor,
    reduction: str = "mean",
    weights: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Final per-site coefficient vector w (K,) float64 of PCGrad from a Gram matrix (K, K) alone.

    The aggregated gradient is ``w @ grads``.
    """
    gram = check_gram(gram)
    k = gram.shape[0]
    r = reduction_weights(k, reduction, weights)
    coeffs, _ = projection_coefficients(gram, check_order(order, k))
    return r @ coeffs


def project_with_gram(
    grads: Tensor,
    gram: Tensor,
    order: list[int],
    r: Tensor,
    names: tuple[str, ...] | None,
    method: str = "pcgrad",
) -> tuple[Tensor, AggregationStats]:
    """PCGrad given a checked finite Gram matrix of ``grads``, an order and reduction weights r."""
    coeffs, applied = projection_coefficients(gram, order)
    w = r @ coeffs  # (K,)
    stats = build_stats(method, gram, w, names, order=order, applied=applied)
    return combine(grads, w), stats


def plain_with_gram(
    grads: Tensor,
    gram: Tensor,
    reduction: str,
    r: Tensor,
    names: tuple[str, ...] | None,
) -> tuple[Tensor, AggregationStats]:
    """The plain (weighted) reduction ``r @ grads`` with statistics from a checked Gram matrix."""
    return combine(grads, r), build_stats(reduction, gram, r, names)


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
    return project_with_gram(grads, checked_gram(grads, names), perm, r, names)


def _plain_aggregate(
    grads: Tensor,
    reduction: str,
    weights: Sequence[float] | Tensor | None,
    site_names: Sequence[str] | None,
) -> tuple[Tensor, AggregationStats]:
    k = check_grads_shape(grads)
    names = check_site_names(site_names, k)
    r = reduction_weights(k, reduction, weights)
    return plain_with_gram(grads, checked_gram(grads, names), reduction, r, names)


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
