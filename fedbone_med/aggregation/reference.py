"""Slow reference for conflicting-gradient projection: the test oracle, not for production.

A literal per-pair loop on flattened copies of the gradients, written to be obviously
correct rather than fast. ``projection.project_conflicting`` must agree with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
    flat = [g.detach().reshape(-1).to(dtype).clone() for g in grads]
    order = [int(j) for j in order]
    num_sites = len(flat)

    projected = []
    for i in range(num_sites):
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

    if weights is None:
        weights = [1.0] * num_sites
    if reduction == "mean":
        total = sum(float(w) for w in weights)
        weights = [float(w) / total for w in weights]
    elif reduction != "sum":
        raise ValueError(f"unknown reduction {reduction!r}")

    combined = torch.zeros_like(flat[0])
    for w, g in zip(weights, projected, strict=True):
        combined += float(w) * g
    return combined
