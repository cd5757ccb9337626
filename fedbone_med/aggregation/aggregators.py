"""The registered aggregators: GPAggregation, PCGrad (alias ``projection``), mean and sum.

Each is a thin stateful wrapper around the pure functions of :mod:`.gpaggregation` and
:mod:`.projection`; the state (GPAggregation's previous aggregate, PCGrad's generator, the call
counter of ``every``) is what :meth:`state_dict` checkpoints. A call that raises changes no state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import AggregationError, CheckpointError, ConfigError
from .base import AggregationStats, Aggregator, check_every, check_reduction, register_aggregator
from .gpaggregation import check_temperature, gpaggregation_coefficients, site_name_order
from .gram import (
    build_stats,
    check_grads_shape,
    check_order,
    check_site_names,
    checked_gram,
    combine,
    reduction_weights,
)
from .projection import plain_with_gram, project_with_gram


def _check_state_keys(owner: str, state: Mapping[str, Any], expected: set[str]) -> None:
    if set(state) != expected:
        raise CheckpointError(f"{owner} aggregator state must have keys {sorted(expected)}, got {sorted(state)}")


class PCGradAggregator(Aggregator):
    """Conflicting-gradient projection (PCGrad) with a seeded random site order.

    Owns one ``torch.Generator`` seeded once; each projecting call draws a fresh permutation of
    the K sites with ``torch.randperm``. ``every = n`` projects on calls 0, n, 2n, ... (counted by
    ``rounds``, which checkpoints keep) and returns the plain reduction on the others, with that
    reduction's statistics (``method`` "mean" or "sum", no order); 1 projects on every call.
    """

    name = "pcgrad"

    def __init__(self, seed: int, reduction: str = "mean", every: int = 1) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{self.name} aggregator seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.reduction = check_reduction(reduction)
        self.every = check_every(self.name, every)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.rounds = 0

    @classmethod
    def from_config(cls, cfg: Any, *, seed: int, num_params: int) -> Aggregator:
        return cls(seed=seed, reduction=cfg.reduction, every=cfg.project_every)

    def __call__(
        self,
        grads: Tensor,
        site_names: Sequence[str] | None = None,
        *,
        weights: Sequence[float] | Tensor | None = None,
    ) -> tuple[Tensor, AggregationStats]:
        k = check_grads_shape(grads)
        names = check_site_names(site_names, k)
        r = reduction_weights(k, self.reduction, weights)
        saved = self.generator.get_state()
        project = self.rounds % self.every == 0
        try:
            order = check_order(torch.randperm(k, generator=self.generator), k) if project else []
            gram = checked_gram(grads, names)
            if project:
                out = project_with_gram(grads, gram, order, r, names, method=self.name)
            else:
                out = plain_with_gram(grads, gram, self.reduction, r, names)
        except BaseException:
            self.generator.set_state(saved)  # a failed call does not consume a permutation
            raise
        self.rounds += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """Seed, reduction, calls done and the generator state as a uint8 tensor."""
        return {
            "seed": self.seed,
            "reduction": self.reduction,
            "rounds": self.rounds,
            "generator_state": self.generator.get_state().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the permutation sequence saved by :meth:`state_dict` (also a ``projection`` checkpoint's)."""
        _check_state_keys(self.name, state, {"seed", "reduction", "rounds", "generator_state"})
        gen_state = state["generator_state"]
        if not isinstance(gen_state, Tensor) or gen_state.dtype != torch.uint8 or gen_state.dim() != 1:
            raise CheckpointError(f"{self.name} aggregator generator_state must be a 1-D uint8 tensor")
        if state["reduction"] != self.reduction:
            raise CheckpointError(
                f"checkpoint used reduction {state['reduction']!r} but this aggregator uses {self.reduction!r}"
            )
        try:
            self.generator.set_state(gen_state.detach().cpu().clone())
        except RuntimeError as exc:
            raise CheckpointError(f"{self.name} aggregator generator_state is not a valid CPU state: {exc}") from exc
        self.seed = int(state["seed"])
        self.rounds = int(state["rounds"])


class ProjectionAggregator(PCGradAggregator):
    """``projection``: the older name of :class:`PCGradAggregator` (same behaviour, state and checkpoints;
    its statistics say ``projection``), kept so existing configurations and checkpoints work."""

    name = "projection"


class GPAggregator(Aggregator):
    """GPAggregation (the paper's Algorithm 2; see :mod:`.gpaggregation`) with the previous aggregate as state.

    ``previous``: the last result as a float32 (P,) tensor on the gradients' device, or None before
    the first call (equal weights 1/K then). ``temperature``: d, default ``num_params`` (P of the
    first call when that is None too). ``num_params``: when given, every call and checkpoint must
    have that many parameters. ``every = n``: Algorithm 2 on calls 0, n, 2n, ... and the plain mean
    on the others (statistics ``method`` "mean"); every call's result becomes g'.
    """

    name = "gpaggregation"

    def __init__(self, num_params: int | None = None, temperature: float | None = None, every: int = 1) -> None:
        if num_params is not None and (isinstance(num_params, bool) or not isinstance(num_params, int)
                                       or num_params < 1):
            raise ConfigError(f"{self.name} aggregator: num_params must be an int >= 1, got {num_params!r}")
        if temperature is not None:
            try:
                temperature = check_temperature(temperature)
            except (AggregationError, TypeError, ValueError) as exc:
                raise ConfigError(f"{self.name} aggregator: {exc}") from exc
        self.num_params = num_params
        self.temperature = temperature
        self.every = check_every(self.name, every)
        self.previous: Tensor | None = None
        self.rounds = 0

    @classmethod
    def from_config(cls, cfg: Any, *, seed: int, num_params: int) -> Aggregator:
        if cfg.reduction != "mean":
            raise ConfigError("gpaggregation takes the mean of the projected gradients (Algorithm 2, step 3); "
                              f"reduction = {cfg.reduction!r} applies to pcgrad only")
        return cls(num_params=num_params, temperature=cfg.attention_temperature, every=cfg.project_every)

    def __call__(
        self,
        grads: Tensor,
        site_names: Sequence[str] | None = None,
        *,
        weights: Sequence[float] | Tensor | None = None,
    ) -> tuple[Tensor, AggregationStats]:
        k = check_grads_shape(grads)
        p = int(grads.shape[1])
        if self.num_params is not None and p != self.num_params:
            raise AggregationError(f"{self.name}: got gradients of {p} parameters, the backbone has {self.num_params}")
        names = check_site_names(site_names, k)
        previous = self.previous
        if previous is not None and previous.device != grads.device:
            previous = previous.to(grads.device)
        if self.rounds % self.every == 0:
            order = site_name_order(names, k)
            gram = checked_gram(grads, names, previous)  # (K[+1], K[+1])
            d = self.temperature if self.temperature is not None else float(self.num_params or p)
            w, a, applied = gpaggregation_coefficients(gram, k, order, d, weights)
            stats = build_stats(self.name, gram[:k, :k], w, names, order=order, applied=applied, attention=a)
            out = combine(grads, w)
        else:
            out, stats = plain_with_gram(grads, checked_gram(grads, names), "mean",
                                         reduction_weights(k, "mean", weights), names)
        self.previous = out.detach().to(torch.float32).clone()
        self.rounds += 1
        return out, stats

    def state_dict(self) -> dict[str, Any]:
        """The previous aggregate (float32 (P,) on CPU; empty before the first call) and calls done."""
        prev = torch.empty(0, dtype=torch.float32) if self.previous is None else self.previous.detach().cpu().clone()
        return {"previous": prev, "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore g' and the call counter saved by :meth:`state_dict`."""
        _check_state_keys(self.name, state, {"previous", "rounds"})
        prev, rounds = state["previous"], state["rounds"]
        if not isinstance(prev, Tensor) or prev.dim() != 1 or prev.dtype != torch.float32:
            raise CheckpointError(f"{self.name} aggregator previous must be a 1-D float32 tensor")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise CheckpointError(f"{self.name} aggregator rounds must be an int >= 0, got {rounds!r}")
        if prev.numel() == 0:
            if rounds:
                raise CheckpointError(f"{self.name} aggregator: {rounds} calls done but no previous aggregate")
            self.previous = None
        else:
            if self.num_params is not None and prev.numel() != self.num_params:
                raise CheckpointError(f"{self.name} aggregator: the checkpoint's previous aggregate has "
                                      f"{prev.numel()} entries, the backbone {self.num_params} parameters")
            if not bool(torch.isfinite(prev).all()):
                raise CheckpointError(f"{self.name} aggregator: the checkpoint's previous aggregate is not finite")
            self.previous = prev.detach().clone()
        self.rounds = rounds


class _PlainAggregator(Aggregator):
    """Plain (optionally weighted) reduction of the site gradients; no projection. The Gram matrix
    gives the statistics."""

    def __call__(
        self,
        grads: Tensor,
        site_names: Sequence[str] | None = None,
        *,
        weights: Sequence[float] | Tensor | None = None,
    ) -> tuple[Tensor, AggregationStats]:
        k = check_grads_shape(grads)
        names = check_site_names(site_names, k)
        r = reduction_weights(k, self.name, weights)
        return plain_with_gram(grads, checked_gram(grads, names), self.name, r, names)


class MeanAggregator(_PlainAggregator):
    """Plain (optionally weighted) mean of the site gradients."""

    name = "mean"


class SumAggregator(_PlainAggregator):
    """Plain (optionally weighted) sum of the site gradients."""

    name = "sum"


for _cls in (GPAggregator, PCGradAggregator, ProjectionAggregator, MeanAggregator, SumAggregator):
    register_aggregator(_cls.name, _cls)
