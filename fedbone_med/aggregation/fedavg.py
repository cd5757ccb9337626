"""Weighted average of model state dicts (FedAvg), for site embeddings and the FedAvg baseline."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import AggregationError


def _normalised_weights(num_states: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / num_states] * num_states
    w = [float(x) for x in weights]
    if len(w) != num_states:
        raise AggregationError(f"got {len(w)} weights for {num_states} state dicts")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise AggregationError("state dict weights must be finite and non-negative")
    total = sum(w)
    if total <= 0:
        raise AggregationError("state dict weights are all zero; at least one must be positive")
    return [x / total for x in w]


def _check_same_layout(states: Sequence[Mapping[str, Tensor]]) -> None:
    """Raise naming the first key whose presence, type, shape or dtype differs from states[0]."""
    first = states[0]
    for s, state in enumerate(states):
        if not isinstance(state, Mapping):
            raise AggregationError(f"state dict {s} is a {type(state).__name__}, not a mapping")
        missing = [key for key in first if key not in state]
        extra = [key for key in state if key not in first]
        if missing or extra:
            key = (missing or extra)[0]
            where = "missing from" if missing else "unexpected in"
            raise AggregationError(f"key {key!r} is {where} state dict {s} (keys must match state dict 0 exactly)")
        for key, ref in first.items():
            t = state[key]
            if not isinstance(t, Tensor) or not isinstance(ref, Tensor):
                raise AggregationError(f"key {key!r}: state dict values must be tensors")
            if t.shape != ref.shape:
                raise AggregationError(
                    f"key {key!r}: shape {tuple(t.shape)} in state dict {s} != {tuple(ref.shape)} in state dict 0"
                )
            if t.dtype != ref.dtype:
                raise AggregationError(f"key {key!r}: dtype {t.dtype} in state dict {s} != {ref.dtype} in state dict 0")


def average_state_dicts(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """Weighted average sum_s w_s * states[s][key] for every floating-point tensor.

    ``weights`` (one per state, non-negative, normalised to sum to 1; uniform when None).
    Floating-point tensors are averaged in float64 and cast back to their dtype;
    other tensors (integer counters such as ``num_batches_tracked``, bools) are copied
    from ``states[0]``. Keys, shapes and dtypes must match exactly.
    """
    if len(states) == 0:
        raise AggregationError("no state dicts to average")
    _check_same_layout(states)
    w = _normalised_weights(len(states), weights)
    out: dict[str, Tensor] = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            out[key] = ref.detach().clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for w_s, state in zip(w, states, strict=True):
            acc += w_s * state[key].detach().to(device=ref.device, dtype=torch.float64)
        if not bool(torch.isfinite(acc).all()):
            bad = [s for s, state in enumerate(states) if not bool(torch.isfinite(state[key]).all())]
            if bad:
                raise AggregationError(f"key {key!r}: non-finite values in state dict(s) {bad}")
            raise AggregationError(f"key {key!r}: weighted average overflows float64")
        out[key] = acc.to(ref.dtype)
    return out
