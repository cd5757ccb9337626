"""Tests for fedbone_med.aggregation: PCGrad vs the reference loop, the Gram matrix, stats, registry, FedAvg.

GPAggregation (Algorithm 2) has its own file, tests/test_aggregation_gp.py.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbone_med.aggregation import (
    AggregationStats,
    GPAggregator,
    MeanAggregator,
    PCGradAggregator,
    ProjectionAggregator,
    SumAggregator,
    average_state_dicts,
    build_aggregator,
    get_aggregator,
    gram_matrix,
    mean_aggregate,
    project_conflicting,
    project_conflicting_reference,
    project_from_gram,
    register_aggregator,
    sum_aggregate,
)
from fedbone_med.aggregation import base as agg_base
from fedbone_med.config import AggregationConfig
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
    # The coefficients are a function of the Gram matrix alone: the same Gram, the same bits.
    w_gram = project_from_gram(gram_matrix(grads), order, reduction, weights)
    torch.testing.assert_close(w_gram, w, rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(projection_cases(), st.integers(0, 2**31 - 1))
def test_project_conflicting_has_the_bits_of_the_aggregator(case, seed):
    """The function and the aggregator run the same Gram and combination: the same bits for the same order."""
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
        lambda: PCGradAggregator(seed=0)(grads, names),
        lambda: SumAggregator()(grads, names),
        lambda: GPAggregator()(grads, names),
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


def test_gram_blocks_match_single_gemm():
    grads = torch.randn(3, 1001, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = grads @ grads.T
    for block_bytes in (8 * 3 * 7, 1 << 20):  # 7 columns a block (a short last block), or one block
        torch.testing.assert_close(gram_matrix(grads, block_bytes=block_bytes), exact, rtol=1e-12, atol=1e-12)
    # float32 input: upcast per column block (bounded memory), multiplied and accumulated in float64,
    # so each entry is at float64 rounding of the exact value, far inside float32 rounding.
    g32 = torch.randn(5, 200_001, generator=torch.Generator().manual_seed(3))
    extra = torch.randn(200_001, generator=torch.Generator().manual_seed(4))
    full = torch.cat([g32, extra[None]]).double()  # (6, P)
    exact = full @ full.T
    norms = exact.diagonal().sqrt()
    for block_bytes in (8 * 6 * 7, 1 << 20, None):
        gram = gram_matrix(g32, extra, block_bytes=block_bytes)
        assert gram.shape == (6, 6) and gram.dtype == torch.float64 and torch.equal(gram, gram.T)
        err = (gram - exact).abs()
        assert bool((err <= 1e-12 * norms[:, None] * norms[None, :]).all()), float(err.max())
    with pytest.raises(AggregationError, match="previous aggregate has 3 entries"):
        gram_matrix(g32, torch.zeros(3))


def test_same_inputs_give_the_same_bits_in_fresh_aggregators():
    """Reproducible on one machine with one thread count (not promised across thread counts)."""
    gen = torch.Generator().manual_seed(21)
    calls = [torch.randn(6, 50_001, generator=gen) for _ in range(3)]
    calls[1][2] = -calls[1][0] + 0.01 * calls[1][2]
    names = [f"site-{c}" for c in "fbdace"]
    for method in ("gpaggregation", "pcgrad", "projection", "mean", "sum"):
        runs = []
        for _ in range(2):
            agg = build_aggregator(AggregationConfig(method=method), seed=5, num_params=50_001)
            runs.append([agg(g.clone(), site_names=names) for g in calls])
        for (out_a, stats_a), (out_b, stats_b) in zip(*runs, strict=True):
            assert torch.equal(out_a, out_b) and stats_a == stats_b, method


# ---------------------------------------------------------------------------- aggregators and registry


def test_registry_names_and_errors():
    assert isinstance(get_aggregator("mean"), MeanAggregator)
    assert get_aggregator("projection", seed=3).name == "projection"
    assert get_aggregator("pcgrad", seed=3).name == "pcgrad"
    assert isinstance(get_aggregator("gpaggregation"), GPAggregator)
    with pytest.raises(RegistryError, match="known aggregators: gpaggregation, mean, pcgrad, projection, sum"):
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
def test_plain_aggregators_are_the_pure_functions(name):
    grads = torch.randn(6, 5000, generator=torch.Generator().manual_seed(9))
    out, stats = get_aggregator(name)(grads.clone())
    ref_out, ref_stats = (mean_aggregate if name == "mean" else sum_aggregate)(grads)
    assert torch.equal(out, ref_out) and stats == ref_stats
    torch.testing.assert_close(out, grads.mean(0) if name == "mean" else grads.sum(0))
    assert stats.norm_ratio_to_mean == pytest.approx(1.0 if name == "mean" else 6.0)
    assert stats.attention_weights is None


def test_pcgrad_is_projection_under_its_new_name_and_loads_projection_checkpoints():
    grads = torch.randn(5, 400, generator=torch.Generator().manual_seed(12))
    grads[3] = -grads[1] + 0.2 * grads[3]
    old, new = ProjectionAggregator(seed=9, every=2), PCGradAggregator(seed=9, every=2)
    for _ in range(3):
        (out_old, stats_old), (out_new, stats_new) = old(grads.clone()), new(grads.clone())
        assert torch.equal(out_old, out_new)
        assert stats_new.projection_order == stats_old.projection_order
    assert (stats_old.method, stats_new.method) == ("projection", "pcgrad")
    resumed = PCGradAggregator(seed=0, every=2)
    resumed.load_state_dict(old.state_dict())  # a checkpoint written under the old name
    for _ in range(2):
        (out_a, stats_a), (out_b, stats_b) = resumed(grads.clone()), old(grads.clone())
        assert torch.equal(out_a, out_b) and stats_a.projection_order == stats_b.projection_order


def test_build_aggregator_reads_the_config():
    cfg = AggregationConfig(method="pcgrad", reduction="sum", project_every=3)
    agg = build_aggregator(cfg, seed=4, num_params=10)
    assert isinstance(agg, PCGradAggregator) and (agg.seed, agg.reduction, agg.every) == (4, "sum", 3)
    agg = build_aggregator(AggregationConfig(method="projection"), seed=4, num_params=10)
    assert type(agg) is ProjectionAggregator
    gp = build_aggregator(AggregationConfig(method="gpaggregation", project_every=2), seed=4, num_params=10)
    assert isinstance(gp, GPAggregator) and (gp.num_params, gp.temperature, gp.every) == (10, None, 2)
    gp = build_aggregator(AggregationConfig(method="gpaggregation", attention_temperature=0.5), seed=0, num_params=10)
    assert gp.temperature == 0.5
    with pytest.raises(ConfigError, match="pcgrad only"):
        build_aggregator(AggregationConfig(method="gpaggregation", reduction="sum"), seed=0, num_params=10)
    assert isinstance(build_aggregator(AggregationConfig(method="sum"), seed=0, num_params=10), SumAggregator)
    with pytest.raises(RegistryError, match="known aggregators: gpaggregation, mean, pcgrad"):
        build_aggregator(AggregationConfig(method="fedprox"), seed=0, num_params=10)
    register_aggregator("test-factory", lambda: MeanAggregator())  # a plain factory: called without arguments
    try:
        assert isinstance(build_aggregator(AggregationConfig(method="test-factory"), seed=0, num_params=1),
                          MeanAggregator)
    finally:
        del agg_base._REGISTRY["test-factory"]


def test_config_rejects_unknown_methods_listing_the_known_ones():
    problems = AggregationConfig(method="fedprox").validate()
    assert any("unknown aggregation method 'fedprox'; known: gpaggregation, mean, pcgrad, projection, sum" in p
               for p in problems), problems
    assert any("reduction" in p for p in AggregationConfig(method="gpaggregation", reduction="sum").validate())
    for method in ("gpaggregation", "pcgrad", "projection", "mean", "sum"):
        assert AggregationConfig(method=method).validate() == []


def test_stats_keep_the_audit_keys_and_add_attention_and_norm_ratio():
    grads = torch.randn(3, 100, generator=torch.Generator().manual_seed(13))
    keys = {"method", "num_sites", "conflicting_pairs", "min_cosine", "mean_cosine", "site_norms",
            "projection_order", "projections_applied", "coefficients", "site_names"}
    for method in ("gpaggregation", "pcgrad", "projection", "mean", "sum"):
        agg = build_aggregator(AggregationConfig(method=method), seed=0, num_params=100)
        out, stats = agg(grads, site_names=("a", "b", "c"))
        d = stats.to_dict()
        assert keys | {"attention_weights", "norm_ratio_to_mean"} == set(d)
        assert json.loads(json.dumps(d)) == d
        assert (d["attention_weights"] is not None) == (method == "gpaggregation")
        assert d["norm_ratio_to_mean"] == pytest.approx(float(out.norm() / grads.mean(0).norm()), rel=1e-5)


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
