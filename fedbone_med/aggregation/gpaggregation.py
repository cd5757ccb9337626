"""GPAggregation, the FedBone paper's Algorithm 2, from the Gram matrix of [g_1 .. g_K, g'].

Given the K site gradients g_k and the previous aggregate g' (none at the first aggregation)::

    a_k = softmax_k(g_k . g' / d)          # 1/K each when there is no g' yet
    h_k = a_k g_k
    for k (fixed order): p_k = h_k
        for i != k (fixed order): if p_k . h_i < 0:  p_k -= (p_k . h_i / |h_i|^2) h_i
    result = (1/K) sum_k p_k               # the next call's g'

The paper says "use equal weights" when g' is undefined. We read it as a_k = 1/K: the value the
softmax itself takes when every logit is equal, and what it is close to with d = P (the logits
g_k . g' / P are tiny), so the first aggregation is on the same scale as the later ones (about
1/K of a plain mean) instead of K times larger.

The projection is PCGrad's coefficient loop (:func:`~.projection.projection_coefficients`) on
the Gram matrix G of the g_k, in the fixed order, started at C = diag(a): p_k = sum_j C[k, j] g_j
(for a_i > 0, testing and projecting against h_i = a_i g_i is testing and projecting against
g_i, so tiny attention weights cannot underflow a_i^2 G[i, i] to zero), and
result = sum_j w_j g_j with w = r @ C, r = 1/K (or normalised site weights). The fixed order is
the site names' sorted order (the coordinator's row order), or the row order without names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
from .projection import check_gram, projection_coefficients


def site_name_order(names: Sequence[str] | None, num_sites: int) -> list[int]:
    """Row indices in sorted site-name order (row order without names): GPAggregation's fixed order."""
    if names is None:
        return list(range(num_sites))
    return sorted(range(num_sites), key=lambda i: names[i])


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise AggregationError(f"attention temperature must be a finite number > 0, got {temperature!r}")
    return t


def attention_weights(gram: Tensor, num_sites: int, temperature: float | None) -> Tensor:
    """a (K,) float64: softmax of G[k, K] / d over the K sites if ``gram`` has the previous
    aggregate's row K (a (K+1, K+1) Gram), else 1/K each (``temperature`` is then unused)."""
    if gram.shape[0] == num_sites:
        return torch.full((num_sites,), 1.0 / num_sites, dtype=torch.float64)
    if temperature is None:
        raise AggregationError("attention needs a temperature d (the config's attention_temperature or P)")
    logits = gram[:num_sites, num_sites] / check_temperature(temperature)  # (K,)
    if not bool(torch.isfinite(logits).all()):
        raise AggregationError(f"attention logits g_k . g' / d overflow with d = {temperature}; raise the temperature")
    return torch.softmax(logits, dim=0)


def gpaggregation_coefficients(
    gram: Tensor,
    num_sites: int,
    order: Sequence[int],
    temperature: float | None,
    weights: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, Tensor, int]:
    """(w (K,), a (K,), projections applied) from the Gram matrix of [g_1 .. g_K] or [g_1 .. g_K, g'].

    The aggregate is ``w @ grads``; ``a`` are the attention weights.
    """
    gram = check_gram(gram)
    k = num_sites
    if gram.shape[0] not in (k, k + 1):
        raise AggregationError(f"GPAggregation needs a {k} x {k} or {k + 1} x {k + 1} Gram matrix")
    a = attention_weights(gram, k, temperature)  # (K,)
    coeffs, applied = projection_coefficients(gram[:k, :k], check_order(order, k), scale=a)  # p_k = C[k] @ g
    w = reduction_weights(k, "mean", weights) @ coeffs
    return w, a, applied


def gpaggregate(
    grads: Tensor,
    previous: Tensor | None = None,
    *,
    temperature: float | None = None,
    order: Sequence[int] | Tensor | None = None,
    weights: Sequence[float] | Tensor | None = None,
    site_names: Sequence[str] | None = None,
) -> tuple[Tensor, AggregationStats]:
    """Algorithm 2 on ``grads`` (K, P) with previous aggregate ``previous`` (P,) or None: (result (P,), stats).

    ``temperature``: d (default P). ``order``: the fixed order (default: sorted site names, else
    row order). ``weights``: optional site weights replacing step 3's 1/K (normalised).
    """
    k = check_grads_shape(grads)
    names = check_site_names(site_names, k)
    fixed = check_order(order, k) if order is not None else site_name_order(names, k)
    d = float(grads.shape[1]) if temperature is None else check_temperature(temperature)
    if previous is not None and (not isinstance(previous, Tensor) or previous.numel() != grads.shape[1]):
        raise AggregationError(f"previous aggregate must be a tensor of {grads.shape[1]} entries")
    gram = checked_gram(grads, names, previous)  # (K[+1], K[+1])
    w, a, applied = gpaggregation_coefficients(gram, k, fixed, d, weights)
    stats = build_stats("gpaggregation", gram[:k, :k], w, names, order=fixed, applied=applied, attention=a)
    return combine(grads, w), stats
