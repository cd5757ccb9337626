"""Server-side aggregation: conflicting-gradient projection, plain mean/sum, FedAvg of state dicts.

All functions are pure functions on tensors; :mod:`.base` wraps them as checkpointable
aggregators behind a name registry.
"""

from .base import (
    AggregationStats,
    Aggregator,
    MeanAggregator,
    ProjectionAggregator,
    SumAggregator,
    available_aggregators,
    get_aggregator,
    register_aggregator,
)
from .fedavg import average_state_dicts
from .projection import (
    gram_entries,
    gram_matrix,
    incremental_gram,
    mean_aggregate,
    project_conflicting,
    project_from_gram,
    sum_aggregate,
)
from .reference import project_conflicting_reference


def build_aggregator(cfg, *, seed: int, num_params: int) -> Aggregator:  # type: ignore[no-untyped-def]
    """The aggregator ``cfg`` (an ``AggregationConfig``) names, for a backbone of ``num_params`` parameters."""
    kwargs = ({"seed": seed, "reduction": cfg.reduction, "every": cfg.project_every}
              if cfg.method == "projection" else {})
    return get_aggregator(cfg.method, **kwargs)


__all__ = [
    "AggregationStats",
    "Aggregator",
    "MeanAggregator",
    "ProjectionAggregator",
    "SumAggregator",
    "available_aggregators",
    "build_aggregator",
    "average_state_dicts",
    "get_aggregator",
    "gram_entries",
    "gram_matrix",
    "incremental_gram",
    "mean_aggregate",
    "project_conflicting",
    "project_conflicting_reference",
    "project_from_gram",
    "register_aggregator",
    "sum_aggregate",
]
