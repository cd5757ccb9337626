"""Aggregator interface, per-round statistics and the aggregator registry.

An aggregator turns the K site gradients of one round, stacked as a (K, P) tensor,
into one backbone gradient (P,) plus an :class:`AggregationStats` record for the
audit log. The statistics hold only norms, cosines, counts and coefficients, never
gradient values.
"""

from __future__ import annotations

import operator
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import AggregationError, CheckpointError, ConfigError, RegistryError

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
    """Combines K site gradients (K, P) into one gradient (P,).

    The coordinator calls :meth:`prepare` (optional work as each site's slot row lands) and
    then ``__call__`` on the full slot matrix.
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

    def prepare(self, matrix: Tensor, row: int) -> None:  # noqa: B027 - optional hook, no-op by default
        """Hook: ``matrix[row]`` (a (K, P) slot matrix) has just been written; no-op by default.

        The coordinator calls it once per arriving site slot, before the call that aggregates
        ``matrix``; an aggregator may start work there that would otherwise wait for the last
        slot. Calling it is optional: the result of ``__call__`` must not depend on it.
        """

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


@dataclass
class _GramCache:
    """Gram entries computed by ``prepare`` for one slot matrix (see ProjectionAggregator)."""

    matrix: weakref.ReferenceType[Tensor]
    key: tuple[Any, ...]
    gram: Tensor  # (K, K) float64; entries valid between rows flagged in ``prepared``
    prepared: list[bool]
    version: int | None  # matrix._version after the last prepare: any later write invalidates the cache


def _version(matrix: Tensor) -> int | None:
    """The tensor's in-place write counter (shared with its views); None if it has none."""
    try:
        return int(matrix._version)
    except RuntimeError:  # inference tensors do not track versions: never trust a cache for them
        return None


def _matrix_key(matrix: Tensor) -> tuple[Any, ...]:
    return (matrix.data_ptr(), tuple(matrix.shape), tuple(matrix.stride()), matrix.dtype, matrix.device)


class _IncrementalGram(Aggregator):
    """The Gram matrix of the slot matrix, built row by row in :meth:`prepare` as slots arrive.

    Every entry is a fixed function of its two rows (:func:`~.projection.gram_entries`), so the
    matrix is bit-identical whether, and in which order, rows were prepared. The cache belongs to
    one matrix object (same storage, shape, strides); another matrix, a write to the matrix not
    followed by ``prepare`` of that row, or a call to ``__call__`` drops it. Not thread-safe: the
    coordinator calls ``prepare`` and ``__call__`` under its lock.
    """

    def __init__(self) -> None:
        self._cache: _GramCache | None = None
        self._workspace: Tensor | None = None

    def _cache_for(self, matrix: Tensor) -> _GramCache:
        """The cache of ``matrix``, a fresh one if the cache belongs to another matrix."""
        cache, key = self._cache, _matrix_key(matrix)
        if cache is None or cache.matrix() is not matrix or cache.key != key:
            k = matrix.shape[0]
            cache = _GramCache(weakref.ref(matrix), key, torch.zeros(k, k, dtype=torch.float64), [False] * k, -1)
            self._cache = cache
        return cache

    def _take_cache(self, matrix: Tensor) -> _GramCache | None:
        """Remove the cache; return it if it is still valid for ``matrix``."""
        cache, self._cache = self._cache, None
        if cache is None or cache.matrix() is not matrix or cache.key != _matrix_key(matrix):
            return None
        version = _version(matrix)
        if version is None or version != cache.version:  # written after the last prepare: may be stale
            return None
        return cache

    def _workspace_for(self, matrix: Tensor) -> Tensor | None:
        """A reusable product buffer for float64 slots (float32 slots need none)."""
        from .projection import gram_workspace_numel

        if matrix.dtype != torch.float64:
            return None
        need = gram_workspace_numel(matrix.shape[0], matrix.shape[1])
        ws = self._workspace
        if ws is None or ws.numel() < need or ws.device != matrix.device or ws.dtype != matrix.dtype:
            ws = self._workspace = torch.empty(need, dtype=matrix.dtype, device=matrix.device)
        return ws

    def prepare(self, matrix: Tensor, row: int) -> None:
        """Compute the Gram entries between ``matrix[row]`` and every row already prepared.

        Call right after writing ``matrix[row]``; a row written again must be prepared again
        (a write followed by no ``prepare`` at all is detected at ``__call__`` through the
        tensor's version counter, and the cache is then ignored). Draws no permutation.
        """
        from .projection import add_gram_row, check_grads_shape

        k = check_grads_shape(matrix)
        try:
            row = operator.index(row)
        except TypeError as exc:
            raise AggregationError(f"prepare row must be an int, got {type(row).__name__}") from exc
        if not 0 <= row < k:
            raise AggregationError(f"prepare row {row} is out of range for {k} site gradients")
        cache = self._cache_for(matrix)
        try:
            add_gram_row(matrix, cache.gram, cache.prepared, row, self._workspace_for(matrix))
        except BaseException:
            self._cache = None
            raise
        cache.version = _version(matrix)

    def _gram(self, grads: Tensor, cache: _GramCache | None, names: tuple[str, ...] | None) -> Tensor:
        """The checked Gram matrix of ``grads``: the entries ``cache`` holds (from :meth:`_take_cache`,
        which every call takes first) plus the missing ones."""
        from .projection import check_gram_finite, incremental_gram

        ws = self._workspace_for(grads)
        if cache is None:
            gram = incremental_gram(grads, workspace=ws)
        else:
            gram = incremental_gram(grads, cache.gram, cache.prepared, ws)
        return check_gram_finite(grads, gram, names)


class ProjectionAggregator(_IncrementalGram):
    """Conflicting-gradient projection (FedBone / PCGrad) with a seeded site order.

    Owns one ``torch.Generator`` seeded once; each projecting call draws a fresh permutation
    of the K sites with ``torch.randperm``. A call that raises does not consume a draw.
    ``every = n`` projects on calls 0, n, 2n, ... (counted by ``rounds``, which checkpoints
    keep) and returns the plain reduction on the others, with that reduction's statistics
    (``method`` "mean" or "sum", no order); 1 projects on every call.

    The Gram matrix is built as the slots arrive (see :class:`_IncrementalGram`).
    """

    name = "projection"

    def __init__(self, seed: int, reduction: str = "mean", every: int = 1) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"projection aggregator seed must be an int, got {type(seed).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"projection aggregator: every must be an int >= 1, got {every!r}")
        self.seed = seed
        self.reduction = _check_reduction(reduction)
        self.every = every
        super().__init__()
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
        from .projection import (
            check_grads_shape,
            check_order,
            check_site_names,
            plain_with_gram,
            project_with_gram,
            reduction_weights,
        )

        cache = self._take_cache(grads) if isinstance(grads, Tensor) else None
        num_sites = check_grads_shape(grads)
        saved = self.generator.get_state()
        project = self.rounds % self.every == 0
        try:
            names = check_site_names(site_names, num_sites)
            r = reduction_weights(num_sites, self.reduction, weights)
            order = check_order(torch.randperm(num_sites, generator=self.generator), num_sites) if project else []
            gram = self._gram(grads, cache, names)
            if project:
                out = project_with_gram(grads, gram, order, r, names)
            else:
                out = plain_with_gram(grads, gram, self.reduction, r, names)
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


class _PlainAggregator(_IncrementalGram):
    """Plain (optionally weighted) reduction of the site gradients; no projection. The Gram matrix
    (for the statistics) is built as the slots arrive, like the projection's."""

    def __call__(
        self,
        grads: Tensor,
        site_names: Sequence[str] | None = None,
        *,
        weights: Sequence[float] | Tensor | None = None,
    ) -> tuple[Tensor, AggregationStats]:
        from .projection import check_grads_shape, check_site_names, plain_with_gram, reduction_weights

        cache = self._take_cache(grads) if isinstance(grads, Tensor) else None
        k = check_grads_shape(grads)
        names = check_site_names(site_names, k)
        r = reduction_weights(k, self.name, weights)
        return plain_with_gram(grads, self._gram(grads, cache, names), self.name, r, names)


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
