"""Aggregator interface, per-round statistics and the aggregator registry.

An aggregator turns the K site gradients of one round, stacked as a (K, P) tensor,
into one backbone gradient (P,) plus an :class:`AggregationStats` record for the
audit log. The statistics hold only norms, cosines, counts and coefficients, never
gradient values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, RegistryError

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class AggregationStats:
    """What one aggregation round did, computed from the Gram matrix of the site gradients.

    ``conflicting_pairs``, ``min_cosine`` and ``mean_cosine`` describe the ORIGINAL
    gradients over unordered pairs i < j (a pair involving an all-zero gradient has
    cosine 0.0; both cosines are ``None`` when K = 1). ``coefficients`` is the final
    weight vector w: the returned gradient is exactly ``sum_k w[k] * grads[k]``.
    """

    method: str
    num_sites: int
    conflicting_pairs: int
    min_cosine: float | None
    mean_cosine: float | None
    site_norms: tuple[float, ...]
    projection_order: tuple[int, ...] | None
    projections_applied: int
    coefficients: tuple[float, ...]
    site_names: tuple[str, ...] | None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable copy (tuples become lists, floats stay floats)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


class Aggregator(ABC):
    """Combines K site gradients (K, P) into one gradient (P,)."""

    name: ClassVar[str]

    @abstractmethod
    def __call__(
        self,
        grads: Tensor,
        site_names: Sequence[str] | None = None,
        *,
        weights: Sequence[float] | Tensor | None = None,
    ) -> tuple[Tensor, AggregationStats]:
        """Aggregate ``grads`` (K, P); ``weights`` are optional non-negative per-site weights."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint with the server (tensors, ints and strings only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise CheckpointError(
                f"aggregator {self.name!r} is stateless but the checkpoint holds keys {sorted(state)}"
            )


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"aggregation reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    return reduction


class ProjectionAggregator(Aggregator):
    """Conflicting-gradient projection (FedBone / PCGrad) with a seeded site order.

    Owns one ``torch.Generator`` seeded once; each call draws a fresh permutation of
    the K sites with ``torch.randperm``. A call that raises does not consume a draw.
    """

    name = "projection"

    def __init__(self, seed: int, reduction: str = "mean") -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"projection aggregator seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.reduction = _check_reduction(reduction)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.rounds = 0

    def __call__(
        self,
        grads: Tensor,
        site_names: Sequence[str] | None = None,
        *,
        weights: Sequence[float] | Tensor | None = None,
    ) -> tuple[Tensor, AggregationStats]:
        # Imported here: projection.py imports this module for AggregationStats.
        from .projection import check_grads_shape, project_conflicting

        num_sites = check_grads_shape(grads)
        saved = self.generator.get_state()
        try:
            order = torch.randperm(num_sites, generator=self.generator)
            out = project_conflicting(
                grads, order=order, reduction=self.reduction, weights=weights, site_names=site_names
            )
        except BaseException:
            self.generator.set_state(saved)
            raise
        self.rounds += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """Seed, reduction, rounds done and the generator state as a uint8 tensor."""
        return {
            "seed": self.seed,
            "reduction": self.reduction,
            "rounds": self.rounds,
            "generator_state": self.generator.get_state().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the permutation sequence saved by :meth:`state_dict`."""
        expected = {"seed", "reduction", "rounds", "generator_state"}
        if set(state) != expected:
            raise CheckpointError(
                f"projection aggregator state must have keys {sorted(expected)}, got {sorted(state)}"
            )
        gen_state = state["generator_state"]
        if not isinstance(gen_state, Tensor) or gen_state.dtype != torch.uint8 or gen_state.dim() != 1:
            raise CheckpointError("projection aggregator generator_state must be a 1-D uint8 tensor")
        if state["reduction"] != self.reduction:
            raise CheckpointError(
                f"checkpoint used reduction {state['reduction']!r} but this aggregator uses {self.reduction!r}"
            )
        try:
            self.generator.set_state(gen_state.detach().cpu().clone())
        except RuntimeError as exc:
            raise CheckpointError(f"projection aggregator generator_state is not a valid CPU state: {exc}") from exc
        self.seed = int(state["seed"])
        self.rounds = int(state["rounds"])


class _PlainAggregator(Aggregator):
    """Plain (optionally weighted) reduction of the site gradients; no projection."""

    def __call__(
        self,
        grads: Tensor,
        site_names: Sequence[str] | None = None,
        *,
        weights: Sequence[float] | Tensor | None = None,
    ) -> tuple[Tensor, AggregationStats]:
        from . import projection

        reduce = projection.mean_aggregate if self.name == "mean" else projection.sum_aggregate
        return reduce(grads, weights=weights, site_names=site_names)


class MeanAggregator(_PlainAggregator):
    """Plain (optionally weighted) mean of the site gradients."""

    name = "mean"


class SumAggregator(_PlainAggregator):
    """Plain (optionally weighted) sum of the site gradients."""

    name = "sum"


_REGISTRY: dict[str, Callable[..., Aggregator]] = {}


def register_aggregator(name: str, factory: Callable[..., Aggregator]) -> Callable[..., Aggregator]:
    """Register ``factory`` (a class or callable returning an Aggregator) under ``name``."""
    if not isinstance(name, str) or not name:
        raise RegistryError("aggregator name must be a non-empty string")
    if name in _REGISTRY:
        raise RegistryError(f"aggregator {name!r} is already registered; choose another name")
    _REGISTRY[name] = factory
    return factory


def available_aggregators() -> list[str]:
    """Registered aggregator names, sorted."""
    return sorted(_REGISTRY)


def get_aggregator(name: str, **kwargs: Any) -> Aggregator:
    """Build the aggregator registered as ``name`` with ``kwargs`` (e.g. ``seed=`` for projection)."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise RegistryError(f"unknown aggregator {name!r}; known aggregators: {', '.join(available_aggregators())}")
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid arguments for aggregator {name!r}: {exc}") from exc


register_aggregator(ProjectionAggregator.name, ProjectionAggregator)
register_aggregator(MeanAggregator.name, MeanAggregator)
register_aggregator(SumAggregator.name, SumAggregator)
