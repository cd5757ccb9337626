"""Server-side aggregation: GPAggregation (the paper's Algorithm 2), PCGrad, plain mean/sum, FedAvg of state dicts.

Every gradient aggregator is computed from the Gram matrix of the site gradients (one blocked
float64 GEMM, :mod:`.gram`) and one final combination; :mod:`.projection` and
:mod:`.gpaggregation` hold the pure functions, :mod:`.aggregators` the checkpointable aggregators
behind the name registry of :mod:`.base`, :mod:`.reference` the slow loops the tests check them
against. Results are reproducible bit for bit on one machine with the same torch thread count;
the BLAS summation order (so the last bits) may differ with another thread count.
"""

from .aggregators import GPAggregator, MeanAggregator, PCGradAggregator, ProjectionAggregator, SumAggregator
from .base import (
    AggregationStats,
    Aggregator,
    available_aggregators,
    build_aggregator,
    get_aggregator,
    register_aggregator,
)
from .fedavg import average_state_dicts
from .gpaggregation import gpaggregate, gpaggregation_coefficients
from .gram import gram_matrix
from .projection import mean_aggregate, project_conflicting, project_from_gram, sum_aggregate
from .reference import gpaggregation_reference, project_conflicting_reference

__all__ = [
    "AggregationStats",
    "Aggregator",
    "GPAggregator",
    "MeanAggregator",
    "PCGradAggregator",
    "ProjectionAggregator",
    "SumAggregator",
    "available_aggregators",
    "average_state_dicts",
    "build_aggregator",
    "get_aggregator",
    "gpaggregate",
    "gpaggregation_coefficients",
    "gpaggregation_reference",
    "gram_matrix",
    "mean_aggregate",
    "project_conflicting",
    "project_conflicting_reference",
    "project_from_gram",
    "register_aggregator",
    "sum_aggregate",
]
