"""Aggregator interface, per-aggregation statistics and the aggregator registry.

An aggregator turns the K site gradients (or replica updates) of one step or round, stacked as
a (K, P) tensor, into one backbone gradient (P,) plus an :class:`AggregationStats` record for
the audit log. The statistics hold only norms, cosines, counts and coefficients, never
gradient values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..errors import CheckpointError, ConfigError, RegistryError

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class AggregationStats:
    """What one aggregation did, computed from the Gram matrix of the site gradients.

    ``conflicting_pairs``, ``min_cosine`` and ``mean_cosine`` describe the ORIGINAL
    gradients over unordered pairs i < j (a pair involving an all-zero gradient has
    cosine 0.0; both cosines are ``None`` when K = 1). ``coefficients`` is the final
    weight vector w: the returned gradient is exactly ``sum_k w[k] * grads[k]``.
    ``attention_weights``: GPAggregation's a_k per site (``None`` for other methods).
    ``norm_ratio_to_mean``: ||result|| / ||plain mean of the gradients|| (``None`` when that
    mean is zero); about 1/K for GPAggregation with the default temperature.
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
    attention_weights: tuple[float, ...] | None = None
    norm_ratio_to_mean: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable copy (tuples become lists, floats stay floats)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


class Aggregator(ABC):
    """Combines K site gradients (K, P) into one gradient (P,).

    The coordinator builds one with :func:`~fedbone_med.aggregation.build_aggregator`, calls it
    on the (K, P) matrix of a step's gradients (or a round's replica updates), rows in site-name
    order, and checkpoints :meth:`state_dict`.
    """

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

    @classmethod
    def from_config(cls, cfg: Any, *, seed: int, num_params: int) -> Aggregator:
        """Build from an ``AggregationConfig``; aggregators without options ignore it."""
        return cls()

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint with the server (tensors, ints and strings only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise CheckpointError(
                f"aggregator {self.name!r} is stateless but the checkpoint holds keys {sorted(state)}"
            )


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"aggregation reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    return reduction


def check_every(owner: str, every: int) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"{owner} aggregator: every must be an int >= 1, got {every!r}")
    return every


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


def aggregator_factory(name: str) -> Callable[..., Aggregator]:
    """The factory registered as ``name``; unknown names raise listing the known ones."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise RegistryError(f"unknown aggregator {name!r}; known aggregators: {', '.join(available_aggregators())}")
    return factory


def get_aggregator(name: str, **kwargs: Any) -> Aggregator:
    """Build the aggregator registered as ``name`` with ``kwargs`` (e.g. ``seed=`` for pcgrad)."""
    factory = aggregator_factory(name)
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid arguments for aggregator {name!r}: {exc}") from exc


def build_aggregator(cfg: Any, *, seed: int, num_params: int) -> Aggregator:
    """The aggregator ``cfg.method`` names (``cfg`` an ``AggregationConfig``), for ``num_params`` parameters.

    A registered class's ``from_config`` reads the options it takes (seed, reduction,
    ``project_every``, ``attention_temperature``); a plain factory is called without arguments.
    """
    factory = aggregator_factory(cfg.method)
    from_config = getattr(factory, "from_config", None)
    if from_config is None:
        return factory()
    return from_config(cfg, seed=seed, num_params=num_params)
