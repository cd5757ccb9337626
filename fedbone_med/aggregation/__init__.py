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

__all__ = [
    "AggregationStats",
    "Aggregator",
    "MeanAggregator",
    "ProjectionAggregator",
    "SumAggregator",
    "available_aggregators",
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
