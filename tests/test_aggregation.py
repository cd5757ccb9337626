"""Tests for fedbone_med.aggregation: fast projection vs the reference loop, stats, registry, FedAvg."""

from __future__ import annotations

import io
import json
import math
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbone_med.aggregation import (
    AggregationStats,
    MeanAggregator,
    ProjectionAggregator,
    average_state_dicts,
    get_aggregator,
    gram_matrix,
    mean_aggregate,
    native,
    project_conflicting,
    project_conflicting_reference,
    project_from_gram,
    register_aggregator,
    sum_aggregate,
)
from fedbone_med.aggregation import base as agg_base
from fedbone_med.aggregation import projection as agg_projection
from fedbone_med.errors import AggregationError, CheckpointError, ConfigError, RegistryError

U32 = 2.0**-24  # unit roundoff of float32


# ---------------------------------------------------------------------------- helpers


@st.composite
def projection_cases(draw):
    """(grads float64 (K, P), order, reduction, weights) with optional conflicts and zero rows."""
    k = draw(st.integers(1, 12))
    p = draw(st.integers(1, 2000))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    grads = torch.randn(k, p, generator=gen, dtype=torch.float64) * scale  # (K, P)
    if k > 1 and draw(st.booleans()):
        # Deliberate conflicts: some rows become a negated (scaled) copy of another plus noise.
        for row in draw(st.lists(st.integers(1, k - 1), max_size=k, unique=True)):
            src = draw(st.integers(0, row - 1))
            noise = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]))
            factor = draw(st.sampled_from([0.5, 1.0, 2.0]))
            grads[row] = -factor * grads[src] + noise * scale * torch.randn(p, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        for row in draw(st.lists(st.integers(0, k - 1), max_size=k, unique=True)):
            grads[row] = 0.0
    order = draw(st.permutations(list(range(k))))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    weights = None
    if draw(st.booleans()):
        weights = draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.0, 7.5]), min_size=k, max_size=k))
        if not any(weights):
            weights[0] = 1.0
    return grads, order, reduction, weights


def _reduction_vector(k: int, reduction: str, weights) -> torch.Tensor:
    r = torch.ones(k, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    return r / r.sum() if reduction == "mean" else r


def _magnitude(grads: torch.Tensor, reduction: str, weights) -> float:
    """S = sum_k r_k ||g_k||: an upper bound on ||combined|| (projection never grows a norm)."""
    r = _reduction_vector(grads.shape[0], reduction, weights)
    return float(r @ grads.double().norm(dim=1))


# ---------------------------------------------------------------------------- fast vs reference


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(projection_cases())
def test_fast_matches_reference_float64(case):
    grads, order, reduction, weights = case
    fast, stats = project_conflicting(grads, order=order, reduction=reduction, weights=weights)
    ref = project_conflicting_reference(grads, order, reduction, weights)
    assert fast.dtype == torch.float64 and fast.shape == (grads.shape[1],)
    # Normwise relative error against S = sum_k r_k ||g_k||, the natural size of the result;
    # a plain elementwise rtol is meaningless when conflicting gradients cancel to ~0.
    err = float((fast - ref).norm())
    assert err <= 1e-6 * _magnitude(grads, reduction, weights) + 1e-300
    assert stats.projection_order == tuple(order)
    assert not any(math.isnan(c) for c in stats.coefficients)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(projection_cases())
def test_fast_matches_reference_float32(case):
    grads64, order, reduction, weights = case
    grads = grads64.float()  # (K, P) float32
    fast, stats = project_conflicting(grads, order=order, reduction=reduction, weights=weights)
    assert fast.dtype == torch.float32
    # Oracle: the reference in float64 on the same float32 values.
    ref = project_conflicting_reference(grads, order, reduction, weights, dtype=torch.float64)
    # The coefficients w come from a float64 Gram matrix of the same values, so they match the
    # oracle's to ~1e-12. The float32 part is (a) rounding each w_k to float32 (relative error
    # <= u) and (b) the K-term float32 dot product per element (error <= K u sum_k |w_k g_kp|).
    # Hence |fast_p - ref_p| <= (K + 1) u sum_k |w_k| |g_kp|; we allow a factor 2 for slack,
    # plus a float64-level term for the coefficients themselves.
    w = torch.tensor(stats.coefficients, dtype=torch.float64)
    bound = 2 * (grads.shape[0] + 1) * U32 * (w.abs() @ grads.double().abs())  # (P,)
    bound += 1e-9 * _magnitude(grads, reduction, weights)
    assert bool(((fast.double() - ref).abs() <= bound).all())
    # Against the reference run entirely in float32 (as the benchmark does): its P-term float32
    # dot products carry relative error ~ sqrt(P) u ~ 3e-6 for P <= 2000, propagated through up
    # to K - 1 projections; 1e-4 of the result's natural size S leaves ample margin.
    ref32 = project_conflicting_reference(grads, order, reduction, weights, dtype=torch.float32)
    assert float((fast.double() - ref32.double()).norm()) <= 1e-4 * _magnitude(grads, reduction, weights) + 1e-30


@settings(max_examples=40, deadline=None)
@given(projection_cases())
def test_coefficients_reproduce_result_and_gram_path(case):
    grads, order, reduction, weights = case
    fast, stats = project_conflicting(grads, order=order, reduction=reduction, weights=weights)
    w = torch.tensor(stats.coefficients, dtype=torch.float64)
    torch.testing.assert_close(w @ grads, fast, rtol=0, atol=1e-12 * (1 + float(grads.abs().max())))
    w_gram = project_from_gram(agg_projection.incremental_gram(grads), order, reduction, weights)
    torch.testing.assert_close(w_gram, w, rtol=0, atol=0)
    # The BLAS Gram gives the same coefficients up to its rounding.
    w_blas = project_from_gram(gram_matrix(grads), order, reduction, weights)
    torch.testing.assert_close(w_blas, w, rtol=1e-9, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(projection_cases(), st.integers(0, 2**31 - 1))
def test_project_conflicting_has_the_bits_of_the_aggregator(case, seed):
    """One Gram definition: the function and the aggregator agree exactly for the same order."""
    grads, _, reduction, weights = case
    agg = ProjectionAggregator(seed=seed, reduction=reduction)
    out, stats = agg(grads.clone(), weights=weights)
    again, stats2 = project_conflicting(grads, order=stats.projection_order, reduction=reduction, weights=weights)
    assert torch.equal(out, again)
    assert stats.coefficients == stats2.coefficients and stats.site_norms == stats2.site_norms


# ---------------------------------------------------------------------------- known answers


def test_orthogonal_gradients_unchanged_mean():
    grads = torch.tensor([[3.0, 0.0, 0.0], [0.0, -2.0, 0.0]])
    out, stats = project_conflicting(grads, order=[1, 0])
    torch.testing.assert_close(out, torch.tensor([1.5, -1.0, 0.0]), rtol=0, atol=0)
    assert stats.projections_applied == 0 and stats.conflicting_pairs == 0
    assert stats.coefficients == (0.5, 0.5)


def test_opposite_gradients_cancel_to_zero():
    g = torch.randn(50, generator=torch.Generator().manual_seed(0))
    grads = torch.stack([g, -g])
    out, stats = project_conflicting(grads, order=[0, 1])
    assert torch.equal(out, torch.zeros(50))
    assert stats.conflicting_pairs == 1 and stats.projections_applied == 2
    assert stats.min_cosine == pytest.approx(-1.0)


def test_hand_computed_two_sites():
    # g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1.
    # g1' = g1 - (-1/2) g2 = (0.5, 0.5);  g2' = g2 - (-1/1) g1 = (0, 1);  mean = (0.25, 0.75).
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    out, stats = project_conflicting(grads, order=[0, 1])
    assert torch.equal(out, torch.tensor([0.25, 0.75]))
    assert stats.coefficients == (1.0, 0.75)  # 0.5 * [(1, 0.5) + (1, 1)]
    assert stats.site_norms == pytest.approx((1.0, math.sqrt(2.0)))
    assert stats.min_cosine == pytest.approx(-1 / math.sqrt(2.0))
    out_sum, _ = project_conflicting(grads, order=[1, 0], reduction="sum")
    assert torch.equal(out_sum, torch.tensor([0.5, 1.5]))


def test_hand_computed_three_sites_order_matters():
    # g1 = (1, 0), g2 = (-1, 1), g3 = (0, -1). Order (1, 2, 3):
    #   g1' = (0.5, 0.5) after g2, then (0.5, 0) after g3;  g2' = (0, 1) then (0, 0);
    #   g3' = unchanged by g1 (dot 0), (-0.5, -0.5) after g2.  Sum = (0, -0.5).
    # Order (3, 2, 1): g1' = (0.5, 0.5); g2' = (-1, 0) then (0, 0); g3' = (-0.5, -0.5) then (0, -0.5).
    #   Sum = (0.5, 0).
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    out_a, stats_a = project_conflicting(grads, order=[0, 1, 2], reduction="sum")
    out_b, stats_b = project_conflicting(grads, order=[2, 1, 0], reduction="sum")
    assert torch.equal(out_a, torch.tensor([0.0, -0.5], dtype=torch.float64))
    assert torch.equal(out_b, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert stats_a.projections_applied == 5 and stats_b.projections_applied == 5
    assert torch.equal(project_conflicting_reference(grads, [0, 1, 2], "sum"), out_a)
    assert torch.equal(project_conflicting_reference(grads, [2, 1, 0], "sum"), out_b)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 500), st.integers(0, 2**31 - 1), st.booleans())
def test_two_site_projection_removes_conflict(p, seed, conflicting):
    gen = torch.Generator().manual_seed(seed)
    g1 = torch.randn(p, generator=gen, dtype=torch.float64)
    g2 = torch.randn(p, generator=gen, dtype=torch.float64)
    if conflicting:
        g2 = -g1 + 0.3 * g2
    grads = torch.stack([g1, g2])
    # "sum" with one-hot weights extracts each projected gradient on its own.
    g1p, _ = project_conflicting(grads, order=[0, 1], reduction="sum", weights=[1.0, 0.0])
    g2p, _ = project_conflicting(grads, order=[0, 1], reduction="sum", weights=[0.0, 1.0])
    tol = 1e-12 * float(g1.norm() * g2.norm())
    assert float(g1p @ g2) >= -tol
    assert float(g2p @ g1) >= -tol


# ---------------------------------------------------------------------------- stats


def test_stats_conflicting_pairs_and_cosines():
    e1, e2 = torch.eye(2)
    grads = torch.stack([e1, -e1, e2, -e2, e1 + e2])  # (5, 2)
    # Negative dots: (0,1), (1,4), (2,3), (3,4) -> 4 pairs; cosines sum to -2 over 10 pairs.
    for fn in (project_conflicting, mean_aggregate, sum_aggregate):
        kwargs = {"order": list(range(5))} if fn is project_conflicting else {}
        _, stats = fn(grads, **kwargs)
        assert stats.conflicting_pairs == 4
        assert stats.min_cosine == pytest.approx(-1.0)
        assert stats.mean_cosine == pytest.approx(-0.2)
        assert -1.0 <= stats.min_cosine <= stats.mean_cosine <= 1.0
    _, stats = mean_aggregate(grads)
    assert stats.method == "mean" and stats.projection_order is None and stats.projections_applied == 0
    assert stats.coefficients == pytest.approx((0.2,) * 5)


@settings(max_examples=30, deadline=None)
@given(projection_cases())
def test_stats_are_bounded_and_json_serialisable(case):
    grads, order, reduction, weights = case
    names = [f"hospital-{k}" for k in range(grads.shape[0])]
    _, stats = project_conflicting(grads, order=order, reduction=reduction, weights=weights, site_names=names)
    if grads.shape[0] > 1:
        assert -1.0 <= stats.min_cosine <= stats.mean_cosine <= 1.0
    else:
        assert stats.min_cosine is None and stats.mean_cosine is None
    d = stats.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["site_names"] == names and len(d["coefficients"]) == grads.shape[0]
    assert isinstance(stats, AggregationStats)


def test_plain_mean_and_sum_with_weights():
    grads = torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=torch.float64)
    out, stats = mean_aggregate(grads, weights=[1.0, 3.0])
    torch.testing.assert_close(out, torch.tensor([2.5, -2.5], dtype=torch.float64))
    assert stats.coefficients == (0.25, 0.75)
    out, stats = sum_aggregate(grads, weights=[2.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([5.0, 0.0], dtype=torch.float64))
    assert stats.method == "sum"


# ---------------------------------------------------------------------------- edge cases


def test_single_site_returns_gradient_unchanged():
    g = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1))
    out, stats = project_conflicting(g, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, g[0])
    assert stats.min_cosine is None and stats.mean_cosine is None and stats.conflicting_pairs == 0
    assert stats.projection_order == (0,)
    out, _ = mean_aggregate(g)
    assert torch.equal(out, g[0])


def test_all_zero_gradients_no_nan():
    grads = torch.zeros(4, 100)
    for out, stats in (project_conflicting(grads, order=[3, 1, 0, 2]), mean_aggregate(grads)):
        assert torch.equal(out, torch.zeros(100))
        floats = []
        for value in stats.to_dict().values():
            floats += [x for x in (value if isinstance(value, list) else [value]) if isinstance(x, float)]
        assert floats and not any(math.isnan(x) for x in floats)
        assert stats.min_cosine == 0.0 and stats.mean_cosine == 0.0


def test_non_finite_rows_named_in_one_error():
    grads = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    grads[1, 3] = float("nan")
    grads[4, 0] = float("inf")
    names = ["alpha", "beta", "gamma", "delta", "epsilon"]
    for call in (
        lambda: project_conflicting(grads, order=range(5), site_names=names),
        lambda: mean_aggregate(grads, site_names=names),
        lambda: ProjectionAggregator(seed=0)(grads, names),
    ):
        with pytest.raises(AggregationError, match="non-finite backbone gradient") as info:
            call()
        msg = str(info.value)
        assert "'beta'" in msg and "'epsilon'" in msg and "'alpha'" not in msg
    with pytest.raises(AggregationError, match="site index 1, site index 4"):
        project_conflicting(grads, order=range(5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": [1.0, 2.0]}, "3 site gradients"),
        ({"weights": [1.0, -1.0, 1.0]}, "non-negative"),
        ({"weights": [0.0, 0.0, 0.0]}, "all zero"),
        ({"reduction": "median"}, "unknown reduction"),
        ({"order": [0, 0, 1]}, "permutation"),
        ({"order": [0, 1]}, "permutation"),
        ({"order": [0.0, 1.0, 2.0]}, "ints"),
        ({"site_names": ["a"]}, "site names"),
    ],
)
def test_invalid_arguments(kwargs, match):
    grads = torch.randn(3, 4)
    with pytest.raises(AggregationError, match=match):
        project_conflicting(grads, **kwargs)


def test_invalid_shapes():
    with pytest.raises(AggregationError, match="2-D"):
        project_conflicting(torch.randn(8))
    with pytest.raises(AggregationError, match="num_sites == 0"):
        project_conflicting(torch.randn(0, 8))
    with pytest.raises(AggregationError, match="floating point"):
        mean_aggregate(torch.ones(2, 3, dtype=torch.int64))


def test_gram_chunking_matches_single_gemm():
    grads = torch.randn(3, 1001, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = grads @ grads.T
    torch.testing.assert_close(gram_matrix(grads), exact, rtol=1e-12, atol=1e-12)
    # float32 input: cast to float64 per column block (bounded memory), accumulated in float64,
    # so each entry is far inside a float32 rounding bound of the exact value.
    g32 = torch.randn(5, 200_001, generator=torch.Generator().manual_seed(3))
    exact = g32.double() @ g32.double().T
    norms = exact.diagonal().sqrt()
    for chunk_bytes in (4 * 5 * 7, 1 << 20):
        err = (gram_matrix(g32, chunk_bytes=chunk_bytes) - exact).abs()
        assert bool((err <= 1e-5 * norms[:, None] * norms[None, :]).all()), float(err.max())


# ---------------------------------------------------------------------------- aggregators and registry


def test_registry_names_and_errors():
    assert isinstance(get_aggregator("mean"), MeanAggregator)
    assert get_aggregator("projection", seed=3).name == "projection"
    with pytest.raises(RegistryError, match="known aggregators: mean, projection, sum"):
        get_aggregator("fedprox")
    with pytest.raises(RegistryError, match="already registered"):
        register_aggregator("mean", MeanAggregator)
    register_aggregator("test-mean-copy", MeanAggregator)
    try:
        assert isinstance(get_aggregator("test-mean-copy"), MeanAggregator)
    finally:
        del agg_base._REGISTRY["test-mean-copy"]


def _orders(agg: ProjectionAggregator, grads: torch.Tensor, n: int) -> list[tuple[int, ...] | None]:
    return [agg(grads)[1].projection_order for _ in range(n)]


def test_projection_aggregator_reproducible_and_checkpointable():
    grads = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    first = _orders(ProjectionAggregator(seed=11), grads, 6)
    assert first == _orders(ProjectionAggregator(seed=11), grads, 6)
    assert len(set(first)) > 1  # a fresh permutation each round

    agg = ProjectionAggregator(seed=11)
    _orders(agg, grads, 3)
    buf = io.BytesIO()
    torch.save(agg.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = ProjectionAggregator(seed=999)
    resumed.load_state_dict(state)
    assert _orders(resumed, grads, 3) == first[3:]
    assert resumed.rounds == 6 and resumed.seed == 11
    with pytest.raises(CheckpointError):
        ProjectionAggregator(seed=1, reduction="sum").load_state_dict(state)


def test_projection_every_n_steps_alternates_with_the_plain_mean_and_resumes_in_phase():
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(5, 300, generator=gen)
    grads[1] = -0.5 * grads[0] + 0.1 * grads[1]  # a conflicting pair, so projection changes the result
    every1 = ProjectionAggregator(seed=4)
    agg = ProjectionAggregator(seed=4, every=3)
    outs = [agg(grads.clone()) for _ in range(7)]
    methods = [stats.method for _, stats in outs]
    assert methods == ["projection", "mean", "mean", "projection", "mean", "mean", "projection"]
    mean_out, mean_stats = mean_aggregate(grads)
    for out, stats in outs:
        if stats.method == "mean":
            assert torch.equal(out, mean_out) and stats.projection_order is None and stats.projections_applied == 0
            assert stats.conflicting_pairs == mean_stats.conflicting_pairs
            assert stats.site_norms == mean_stats.site_norms
        else:
            assert stats.projections_applied > 0 and not torch.equal(out, mean_out)
    # only projecting calls draw an order: they follow the every-step aggregator's sequence
    assert [stats.projection_order for _, stats in outs if stats.method == "projection"] == _orders(every1, grads, 3)
    # a checkpoint taken after call 4 resumes in phase (call 5 plain, call 6 projects with the next order)
    agg2 = ProjectionAggregator(seed=4, every=3)
    for _ in range(5):
        agg2(grads.clone())
    resumed = ProjectionAggregator(seed=4, every=3)
    resumed.load_state_dict(agg2.state_dict())
    rest = [resumed(grads.clone()) for _ in range(2)]
    assert [stats.method for _, stats in rest] == ["mean", "projection"]
    assert torch.equal(rest[1][0], outs[6][0]) and rest[1][1].projection_order == outs[6][1].projection_order
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="every"):
            ProjectionAggregator(seed=0, every=bad)


@pytest.mark.parametrize("name", ["mean", "sum"])
def test_plain_aggregators_prepare_their_statistics_as_slots_arrive(name):
    """The coordinator's prepare calls change nothing in the result, only when the Gram work happens."""
    grads = torch.randn(6, 5000, generator=torch.Generator().manual_seed(9))
    fresh_out, fresh_stats = get_aggregator(name)(grads.clone())
    agg = get_aggregator(name)
    matrix = grads.clone()
    for row in (3, 0, 5, 1, 4, 2):
        agg.prepare(matrix, row)
    out, stats = agg(matrix)
    assert torch.equal(out, fresh_out) and stats == fresh_stats
    reference = (mean_aggregate if name == "mean" else sum_aggregate)(grads)[0]
    assert torch.equal(out, reference)  # the same combination as the pure function
    assert agg._cache is None  # the call took the cache


def test_failed_round_does_not_consume_a_permutation():
    grads = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    bad = grads.clone()
    bad[2, 2] = float("nan")
    agg = ProjectionAggregator(seed=5)
    with pytest.raises(AggregationError):
        agg(bad)
    assert _orders(agg, grads, 2) == _orders(ProjectionAggregator(seed=5), grads, 2)


# ---------------------------------------------------------------------------- FedAvg


def test_average_state_dicts_known_answer():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.float16), "n": torch.tensor(5)}
    out = average_state_dicts([a, b], weights=[1.0, 3.0])
    assert list(out) == ["w", "h", "n"]
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))
    assert out["h"].dtype == torch.float16 and float(out["h"]) == 1.75
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 3
    torch.testing.assert_close(average_state_dicts([a, b])["w"], torch.tensor([2.0, 4.0]))


def test_average_state_dicts_mismatch_errors():
    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(AggregationError, match="'b'"):
        average_state_dicts([a, {"w": torch.zeros(2)}])
    with pytest.raises(AggregationError, match="'extra'"):
        average_state_dicts([a, {**a, "extra": torch.zeros(1)}])
    with pytest.raises(AggregationError, match="'w'.*shape"):
        average_state_dicts([a, {"w": torch.zeros(3), "b": torch.zeros(1)}])
    with pytest.raises(AggregationError, match="weights"):
        average_state_dicts([a, a], weights=[1.0])
    with pytest.raises(AggregationError, match="no state dicts"):
        average_state_dicts([])


# ---------------------------------------------------------------------------- incremental Gram (prepare)


_FIXTURE_OK = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]  # gram_lanes is per test, not per example


@pytest.fixture(params=[(8, 3), None], ids=["lanes8-chunks3", "lanes-default"])
def gram_lanes(request, monkeypatch):
    """Run with the default layout and with 8 lanes in blocks of 3 chunks, so small P spans many
    chunks and column blocks (a block count that is not a power of two, a short last block)."""
    if request.param is not None:
        lanes, chunks = request.param
        monkeypatch.setattr(agg_projection, "GRAM_LANES", lanes)
        monkeypatch.setattr(agg_projection, "GRAM_BLOCK_CHUNKS", chunks)
    return request.param


def _fresh(grads: torch.Tensor, seed: int = 7, calls: int = 1, **kwargs):
    """Output and stats of call number ``calls`` of a new aggregator on a copy of ``grads``, no prepare."""
    agg = ProjectionAggregator(seed=seed, **kwargs)
    for _ in range(calls - 1):
        agg(grads.clone())
    return agg(grads.clone())


def _same(a, b) -> None:
    (out_a, stats_a), (out_b, stats_b) = a, b
    assert out_a.dtype == out_b.dtype
    assert torch.equal(out_a, out_b)
    assert stats_a == stats_b


@st.composite
def arrival_cases(draw):
    """(grads (K, P), dtype, arrival order, rewritten row or None, rows left unprepared)."""
    grads, _, reduction, _ = draw(projection_cases())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    k = grads.shape[0]
    arrival = draw(st.permutations(list(range(k))))
    rewrite = draw(st.none() | st.integers(0, k - 1))
    skipped = draw(st.lists(st.integers(0, k - 1), max_size=2, unique=True))
    return grads.to(dtype), arrival, rewrite, skipped, reduction


@settings(max_examples=120, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(case=arrival_cases(), seed=st.integers(0, 2**31 - 1))
def test_prepare_in_any_order_is_bit_identical_to_no_prepare(gram_lanes, case, seed):
    grads, arrival, rewrite, skipped, reduction = case
    k, p = grads.shape
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.empty(k, p, dtype=grads.dtype).uniform_(-1, 1, generator=gen)  # stale data before arrival
    agg = ProjectionAggregator(seed=7, reduction=reduction)
    for row in arrival:
        matrix[row] = grads[row]
        if row not in skipped:
            agg.prepare(matrix, row)
    if rewrite is not None:  # a site's slot written again (new data) and prepared again
        matrix[rewrite] = torch.randn(p, generator=gen, dtype=grads.dtype)
        agg.prepare(matrix, rewrite)
    expected = _fresh(matrix, reduction=reduction)
    _same(agg(matrix), expected)
    # and in the reverse arrival order, every row prepared
    agg2 = ProjectionAggregator(seed=7, reduction=reduction)
    for row in reversed(arrival):
        agg2.prepare(matrix, row)
    _same(agg2(matrix), expected)


@settings(max_examples=40, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(case=projection_cases(), order_seed=st.integers(0, 2**31 - 1))
def test_prepared_aggregator_matches_reference(gram_lanes, case, order_seed):
    grads64, _, reduction, weights = case
    for grads in (grads64, grads64.float()):
        k = grads.shape[0]
        agg = ProjectionAggregator(seed=order_seed % 1000, reduction=reduction)
        for row in torch.randperm(k, generator=torch.Generator().manual_seed(order_seed)).tolist():
            agg.prepare(grads, row)
        out, stats = agg(grads, weights=weights)
        order = list(stats.projection_order)
        ref = project_conflicting_reference(grads, order, reduction, weights, dtype=torch.float64)
        w = torch.tensor(stats.coefficients, dtype=torch.float64)
        if grads.dtype == torch.float64:  # the bounds of the two tests above
            assert float((out - ref).norm()) <= 1e-6 * _magnitude(grads, reduction, weights) + 1e-300
        else:
            bound = 2 * (k + 1) * U32 * (w.abs() @ grads.double().abs())
            bound += 1e-9 * _magnitude(grads, reduction, weights)
            assert bool(((out.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepare_is_thread_count_invariant(gram_lanes, dtype):
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(7, 70_001, generator=gen).to(dtype)
    grads[3] = -0.5 * grads[1] + 1e-3 * grads[3]  # a conflict
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fresh(grads)
        torch.set_num_threads(2)
        agg = ProjectionAggregator(seed=7)
        for row in (5, 0, 6, 2, 4, 1, 3):
            agg.prepare(grads, row)
        two = agg(grads)
        two_fresh = _fresh(grads)
    finally:
        torch.set_num_threads(threads)
    assert one[1] == two[1] == two_fresh[1]  # Gram statistics and coefficients
    _same(two, two_fresh)
    assert torch.equal(one[0], two[0])  # the combination is element-wise, so it is invariant too


def test_prepare_cache_dropped_for_another_matrix(gram_lanes):
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(5, 300, generator=gen)
    b = torch.randn(5, 300, generator=gen)
    agg = ProjectionAggregator(seed=7)
    for row in range(5):
        agg.prepare(a, row)
    _same(agg(b), _fresh(b))  # same shape, other matrix: a's entries must not be used
    for row in range(5):
        agg.prepare(a, row)
    agg.prepare(b, 2)  # preparing another matrix drops a's cache
    _same(agg(a), _fresh(a, calls=2))


def test_prepare_cache_dropped_when_matrix_relaid_with_other_k(gram_lanes):
    gen = torch.Generator().manual_seed(6)
    storage = torch.randn(6, 300, generator=gen)
    first = storage[:4]  # same data pointer and row stride as ``second``, fewer rows
    second = storage[:6]
    agg = ProjectionAggregator(seed=7)
    for row in range(4):
        agg.prepare(first, row)
    for row in (5, 4):
        agg.prepare(second, row)
    _same(agg(second), _fresh(second))


def test_write_after_prepare_without_prepare_is_not_used(gram_lanes):
    gen = torch.Generator().manual_seed(8)
    grads = torch.randn(5, 300, generator=gen)
    agg = ProjectionAggregator(seed=7)
    for row in range(5):
        agg.prepare(grads, row)
    grads[2] = -grads[0]  # written, but the coordinator contract (prepare after write) broken
    _same(agg(grads), _fresh(grads))


def test_reprepared_row_is_recomputed_and_call_resets_cache(gram_lanes):
    gen = torch.Generator().manual_seed(9)
    grads = torch.randn(5, 300, generator=gen)
    agg = ProjectionAggregator(seed=7)
    for row in range(5):
        agg.prepare(grads, row)
    # ``.data`` writes do not bump the version counter, so only the cache logic itself can
    # notice these changes.
    grads.data[1] = -grads[4]
    agg.prepare(grads, 1)  # re-prepared after being written again: must be recomputed
    _same(agg(grads), _fresh(grads))
    grads.data[3] = -grads[0]
    _same(agg(grads), _fresh(grads, calls=2))  # the first call reset the cache


def test_coordinator_like_steps_reuse_one_matrix(gram_lanes):
    gen = torch.Generator().manual_seed(10)
    k, p = 6, 500
    matrix = torch.empty(k, p)
    agg = ProjectionAggregator(seed=3)
    plain = ProjectionAggregator(seed=3)
    for _ in range(4):
        for row in torch.randperm(k, generator=gen).tolist():
            matrix[row].copy_(torch.randn(p, generator=gen))
            if row % 2 == 0:
                matrix[row, :7] = -matrix[(row + 1) % k, :7]
            agg.prepare(matrix, row)
        _same(agg(matrix), plain(matrix.clone()))


def test_prepare_does_not_consume_permutations_or_change_state():
    grads = torch.randn(6, 40, generator=torch.Generator().manual_seed(11))
    agg = ProjectionAggregator(seed=5)
    state = agg.state_dict()
    for row in range(6):
        agg.prepare(grads, row)
    assert set(state) == set(agg.state_dict()) and torch.equal(state["generator_state"], agg.generator.get_state())
    assert agg.rounds == 0
    assert _orders(agg, grads, 3) == _orders(ProjectionAggregator(seed=5), grads, 3)


def test_prepare_invalid_arguments_and_default_noop():
    agg = ProjectionAggregator(seed=0)
    grads = torch.randn(3, 10)
    with pytest.raises(AggregationError, match="out of range"):
        agg.prepare(grads, 3)
    with pytest.raises(AggregationError, match="out of range"):
        agg.prepare(grads, -1)
    with pytest.raises(AggregationError, match="must be an int"):
        agg.prepare(grads, 1.0)
    with pytest.raises(AggregationError, match="2-D"):
        agg.prepare(torch.randn(10), 0)
    MeanAggregator().prepare(grads, 0)  # the base-class hook does nothing
    out, _ = MeanAggregator()(grads)
    torch.testing.assert_close(out, grads.mean(0))


def test_prepared_non_finite_rows_named():
    grads = torch.randn(4, 20, generator=torch.Generator().manual_seed(0))
    grads[2, 5] = float("nan")
    agg = ProjectionAggregator(seed=0)
    for row in range(4):
        agg.prepare(grads, row)
    with pytest.raises(AggregationError, match="non-finite backbone gradient.*'c'"):
        agg(grads, ["a", "b", "c", "d"])
    assert agg.rounds == 0


def _documented_gram_entry(x: list[float], v: list[float], lanes: int, chunks: int) -> float:
    """gram_entries' summation tree, written out in Python floats (IEEE double) from its docstring."""
    p, width = len(x), lanes * chunks
    block_sums = []
    for b0 in range(0, p, width):
        acc = [0.0] * lanes
        for t in range(b0, min(p, b0 + width)):  # increasing t: lane (t - b0) % lanes
            acc[(t - b0) % lanes] += x[t] * v[t]  # float32 values: the double product is exact
        w = lanes
        while w > 1:
            acc[: w // 2] = [acc[i] + acc[i + w // 2] for i in range(w // 2)]
            w //= 2
        block_sums.append(acc[0])
    span = 1
    while span < len(block_sums):
        span *= 2
    block_sums += [0.0] * (span - len(block_sums))
    while span > 1:
        block_sums[: span // 2] = [block_sums[i] + block_sums[i + span // 2] for i in range(span // 2)]
        span //= 2
    return block_sums[0]


@pytest.mark.parametrize("use_native", [False, True], ids=["torch-path", "compiled"])
@pytest.mark.parametrize("p", [1, 7, 24, 50, 97])
def test_gram_entries_follow_the_documented_summation_tree(monkeypatch, use_native, p):
    if use_native and not native.available():
        pytest.skip(f"compiled kernel unavailable here ({native.status()}); the PyTorch path is checked")
    monkeypatch.setattr(agg_projection, "GRAM_LANES", 8)
    monkeypatch.setattr(agg_projection, "GRAM_BLOCK_CHUNKS", 3)
    grads = torch.randn(3, p, generator=torch.Generator().manual_seed(p)) * torch.logspace(-3, 3, p)
    lanes, chunks, _ = agg_projection.gram_layout(p)
    got = agg_projection.gram_entries(grads, 0, 3, 1, native=use_native)
    rows = [[float(a) for a in r] for r in grads.tolist()]
    expected = [_documented_gram_entry(rows[i], rows[1], lanes, chunks) for i in range(3)]
    assert got.tolist() == expected  # every bit


def test_incremental_gram_is_float64_accurate(gram_lanes):
    g32 = torch.randn(5, 200_001, generator=torch.Generator().manual_seed(3))
    exact = g32.double() @ g32.double().T
    norms = exact.diagonal().sqrt()
    gram = agg_projection.incremental_gram(g32)
    assert torch.equal(gram, gram.T)
    # float64 accumulation of exact products: far inside float32 rounding of the entries
    assert bool(((gram - exact).abs() <= 1e-12 * norms[:, None] * norms[None, :]).all())
    with pytest.raises(AggregationError, match="out of range"):
        agg_projection.gram_entries(g32, 0, 2, 5)
    # an entry does not depend on the other rows in the call, nor on which row is the vector
    for lo, hi in ((0, 5), (1, 2), (1, 4), (3, 5)):
        for row in range(5):
            got = agg_projection.gram_entries(g32, lo, hi, row)
            assert torch.equal(got, gram[lo:hi, row])


# ---------------------------------------------------------------------------- compiled Gram kernel

_HAS_CC = shutil.which(os.environ.get("CC", "cc")) is not None or shutil.which("gcc") is not None


@pytest.fixture
def native_kernel(tmp_path, monkeypatch):
    """The compiled kernel, built into a fresh cache directory for this test."""
    if not _HAS_CC:
        pytest.skip("no C compiler on this machine: the PyTorch Gram path is the one in use (tested above)")
    monkeypatch.setenv("FEDBONE_NATIVE_CACHE", str(tmp_path / "native"))
    native.reset()
    assert native.available(), native.status()
    yield native
    native.reset()


@settings(max_examples=60, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(p=st.integers(1, 70_000), k=st.integers(1, 9), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_native_gram_entries_are_bit_identical_to_the_torch_path(native_kernel, gram_lanes, p, k, seed, data):
    gen = torch.Generator().manual_seed(seed)
    scale = data.draw(st.sampled_from([1e-30, 1.0, 1e30]))
    grads = torch.randn(k + 1, p, generator=gen) * scale
    grads = grads[1:] if data.draw(st.booleans()) else grads[:k]  # a view at an offset, or the start
    lo = data.draw(st.integers(0, k - 1))
    hi = data.draw(st.integers(lo + 1, k))
    row = data.draw(st.integers(0, k - 1))
    assert native.supports(grads)
    fast = agg_projection.gram_entries(grads, lo, hi, row)
    slow = agg_projection.gram_entries(grads, lo, hi, row, native=False)
    assert fast.dtype == torch.float64 and fast.shape == (hi - lo,)
    assert torch.equal(fast, slow)


def test_native_gram_is_thread_count_invariant_and_used_by_the_aggregator(native_kernel, monkeypatch):
    gen = torch.Generator().manual_seed(11)
    grads = torch.randn(6, 200_003, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = agg_projection.gram_entries(grads, 0, 6, 5)
        torch.set_num_threads(2)
        two = agg_projection.gram_entries(grads, 0, 6, 5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    # The aggregator on the kernel gives the bits of the PyTorch path.
    with_kernel = _fresh(grads)
    native.reset()
    monkeypatch.setenv("FEDBONE_NATIVE", "0")
    assert not native.available() and "FEDBONE_NATIVE=0" in native.status()
    _same(with_kernel, _fresh(grads))


def test_native_kernel_refuses_a_library_others_could_have_written(native_kernel, tmp_path):
    (lib,) = (tmp_path / "native").glob("*.so")
    lib.chmod(0o666)  # anyone could have replaced it: never load it
    native.reset()
    assert not native.available() and "writable by others" in native.status()
    lib.chmod(0o700)
    (tmp_path / "native").chmod(0o777)
    native.reset()
    assert not native.available() and "writable by others" in native.status()


def test_native_kernel_falls_back_when_it_cannot_be_built(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBONE_NATIVE_CACHE", str(tmp_path / "native"))
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that always fails
    native.reset()
    try:
        assert not native.available()
        assert "build or load failed" in native.status()
        grads = torch.randn(3, 1000)
        assert not native.supports(grads)
        ref = agg_projection.gram_entries(grads, 0, 3, 2, native=False)
        assert torch.equal(agg_projection.gram_entries(grads, 0, 3, 2), ref)  # the PyTorch path ran
        assert not list((tmp_path / "native").glob("*.so"))  # nothing half-built left to load later
    finally:
        native.reset()


def test_native_kernel_is_not_used_for_other_layouts_or_dtypes(native_kernel):
    grads = torch.randn(4, 3000)
    assert not native.supports(grads.T.contiguous().T)  # columns not contiguous
    assert not native.supports(grads.double())
    assert not native.supports(grads.half())
    strided = torch.randn(4, 6000)[:, ::2]
    assert torch.equal(agg_projection.gram_entries(strided, 0, 4, 1),
                       agg_projection.gram_entries(strided, 0, 4, 1, native=False))



def _kernel_outputs(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Gram row, the whole Gram matrix and a combination, through whatever kernel is loaded."""
    k = grads.shape[0]
    lanes, chunks, _ = agg_projection.gram_layout(grads.shape[1])
    row = native.gram_entries_f32(grads, 0, k, k - 1, lanes, chunks)
    gram = native.gram_all_f32(grads, lanes, chunks)
    coeffs = torch.linspace(-1.5, 2.0, k).tolist()
    return row, gram, native.combine_f32(grads, coeffs)


def _same_outputs(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("p", [1_000, 200_003])
def test_native_kernel_gives_the_same_bits_on_every_instruction_set(native_kernel, monkeypatch, p):
    grads = torch.randn(7, p, generator=torch.Generator().manual_seed(p)) * torch.logspace(-20, 20, p)
    outputs, levels = {}, []
    for isa in native.ISA_LEVELS:
        monkeypatch.setenv("FEDBONE_NATIVE_ISA", isa)
        native.reset()
        assert native.available(), native.status()
        levels.append(native.status())
        outputs[isa] = _kernel_outputs(grads)
    assert "; base;" in levels[0]  # the cap is applied (higher levels only where the CPU has them)
    for isa in native.ISA_LEVELS[1:]:
        _same_outputs(outputs["base"], outputs[isa])
    ref = agg_projection.gram_entries(grads, 0, 7, 6, native=False)
    assert torch.equal(outputs["base"][0], ref)  # and the PyTorch path's
    monkeypatch.setenv("FEDBONE_NATIVE_ISA", "sse4")
    native.reset()
    assert not native.available() and "FEDBONE_NATIVE_ISA must be one of" in native.status()


def test_native_openmp_team_and_thread_pool_give_the_same_bits(native_kernel, monkeypatch):
    if "OpenMP team" not in native.status():
        pytest.skip(f"this compiler builds the kernel without OpenMP ({native.status()}); the pool is tested")
    grads = torch.randn(9, 300_007, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_kernel_outputs(grads))  # on torch's OpenMP team of n threads
            monkeypatch.setattr(native, "_openmp", False)
            results.append(_kernel_outputs(grads))  # on the Python thread pool
            monkeypatch.setattr(native, "_openmp", True)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        _same_outputs(results[0], other)


def test_native_kernel_builds_without_openmp_when_the_compiler_lacks_it(tmp_path, monkeypatch):
    real = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if real is None:
        pytest.skip("no C compiler on this machine: the PyTorch Gram path is the one in use (tested above)")
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'for a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "unsupported option -fopenmp" >&2; exit 1; }; done\n'
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("FEDBONE_NATIVE_CACHE", str(tmp_path / "native"))
    grads = torch.randn(5, 70_001, generator=torch.Generator().manual_seed(2))
    try:
        native.reset()
        assert native.available(), native.status()
        assert "thread pool" in native.status()
        assert torch.equal(agg_projection.gram_entries(grads, 0, 5, 3),
                           agg_projection.gram_entries(grads, 0, 5, 3, native=False))
        assert len(log.read_text().splitlines()) == 2  # tried with OpenMP, then built without
        native.reset()
        assert native.available() and "thread pool" in native.status()
        assert len(log.read_text().splitlines()) == 2  # the next process loads it: no new attempt
    finally:
        native.reset()
