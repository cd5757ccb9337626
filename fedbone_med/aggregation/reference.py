"""Slow references for the aggregators: the test oracles, not for production.

Literal per-pair loops on flattened copies of the gradients, written to be obviously correct
rather than fast. ``projection.project_conflicting`` and ``gpaggregation.gpaggregate`` must
agree with them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _flat(grads: Tensor | Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [g.detach().reshape(-1).to(dtype).clone() for g in grads]


def _reduce(vectors: list[Tensor], reduction: str, weights: Sequence[float] | None) -> Tensor:
    if weights is None:
        weights = [1.0] * len(vectors)
    if reduction == "mean":
        total = sum(float(w) for w in weights)
        weights = [float(w) / total for w in weights]
    elif reduction != "sum":
        raise ValueError(f"unknown reduction {reduction!r}")
    combined = torch.zeros_like(vectors[0])
    for w, v in zip(weights, vectors, strict=True):
        combined += float(w) * v
    return combined


def project_conflicting_reference(
    grads: Tensor | Sequence[Tensor],
    order: Sequence[int],
    reduction: str = "mean",
    weights: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """PCGrad on K gradients (any shapes, flattened) in ``dtype``; returns the reduced (P,) vector.

    For each site i: g_i' = g_i; for j in ``order`` (j != i, ||g_j||^2 != 0): if
    g_i' . g_j < 0 then g_i' -= (g_i' . g_j / ||g_j||^2) g_j, with g_j the ORIGINAL
    gradient. Then "mean" = sum_i r_i g_i' with r = 1/K (or weights / sum(weights)),
    "sum" = sum_i r_i g_i' with r = 1 (or weights).
    """
    flat = _flat(grads, dtype)
    order = [int(j) for j in order]
    projected = []
    for i in range(len(flat)):
        g_i = flat[i].clone()
        for j in order:
            if j == i:
                continue
            g_j = flat[j]
            norm_sq = torch.dot(g_j, g_j)
            if norm_sq == 0:
                continue
            dot = torch.dot(g_i, g_j)
            if dot < 0:
                g_i -= (dot / norm_sq) * g_j
        projected.append(g_i)
    return _reduce(projected, reduction, weights)


def gpaggregation_reference(
    grads: Tensor | Sequence[Tensor],
    previous: Tensor | None,
    order: Sequence[int],
    temperature: float | None = None,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The FedBone paper's Algorithm 2 (GPAggregation), transcribed step by step in ``dtype``.

    1. a_k = softmax over k of (g_k . g' / d), d = ``temperature`` (default P); a_k = 1/K when
       ``previous`` (g') is None. g_k <- a_k g_k.
    2. For each k in ``order``: p_k = g_k; for every other i in ``order``: if p_k . g_i < 0 then
       p_k <- p_k - (p_k . g_i / |g_i|^2) g_i (g_i scaled, not projected; skipped if |g_i| = 0).
    3. (1/K) sum_k p_k (or the weighted mean with ``weights``).
    """
    flat = _flat(grads, dtype)
    num_sites, num_params = len(flat), flat[0].numel()
    order = [int(j) for j in order]
    if previous is None:
        attention = [1.0 / num_sites] * num_sites
    else:
        g_prev = previous.detach().reshape(-1).to(dtype)
        d = float(num_params) if temperature is None else float(temperature)
        logits = [float(torch.dot(g, g_prev)) / d for g in flat]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        attention = [e / sum(exps) for e in exps]
    scaled = [a * g for a, g in zip(attention, flat, strict=True)]

    projected: dict[int, Tensor] = {}
    for k in order:
        p_k = scaled[k].clone()
        for i in order:
            if i == k:
                continue
            g_i = scaled[i]
            norm_sq = torch.dot(g_i, g_i)
            if norm_sq == 0:
                continue
            dot = torch.dot(p_k, g_i)
            if dot < 0:
                p_k = p_k - (dot / norm_sq) * g_i
        projected[k] = p_k
    return _reduce([projected[k] for k in range(num_sites)], "mean", weights)
