"""GPAggregation (the FedBone paper's Algorithm 2): the Gram path vs the literal loop, state, checkpoints, edges."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbone_med.aggregation import (
    GPAggregator,
    gpaggregate,
    gpaggregation_reference,
    gram_matrix,
    mean_aggregate,
)
from fedbone_med.aggregation.gpaggregation import gpaggregation_coefficients
from fedbone_med.errors import AggregationError, CheckpointError, ConfigError

U32 = 2.0**-24  # unit roundoff of float32


@st.composite
def gp_cases(draw):
    """(grads float64 (K, P), previous (P,) or None, temperature or None, order, weights)."""
    k = draw(st.integers(1, 12))
    p = draw(st.integers(1, 2000))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    grads = torch.randn(k, p, generator=gen, dtype=torch.float64) * scale  # (K, P)
    if k > 1 and draw(st.booleans()):
        # Forced conflicts: some rows become a negated (scaled) copy of an earlier one plus noise.
        for row in draw(st.lists(st.integers(1, k - 1), max_size=k, unique=True)):
            src = draw(st.integers(0, row - 1))
            noise = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]))
            factor = draw(st.sampled_from([0.5, 1.0, 2.0]))
            grads[row] = -factor * grads[src] + noise * scale * torch.randn(p, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        for row in draw(st.lists(st.integers(0, k - 1), max_size=k, unique=True)):
            grads[row] = 0.0
    previous = temperature = None
    if draw(st.booleans()):
        previous = grads.mean(0) + scale * torch.randn(p, generator=gen, dtype=torch.float64)  # (P,)
        # None: the default d = P (logits ~ 0 here, a ~ 1/K); otherwise d such that the largest
        # |logit| is ``sharpness``: attention far from uniform, yet a_k >= e^-60 / K, so the
        # literal loop's |a_k g_k|^2 cannot underflow (the Gram path does not square a_k at all)
        sharpness = draw(st.sampled_from([None, 1.0, 10.0, 30.0]))
        top = float((grads @ previous).abs().max())
        if sharpness is not None and top > 0:
            temperature = top / sharpness
    order = draw(st.permutations(list(range(k))))
    weights = None
    if draw(st.booleans()):
        weights = draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.0]), min_size=k, max_size=k))
        if not any(weights):
            weights[0] = 1.0
    return grads, previous, temperature, order, weights


def _magnitude(grads: torch.Tensor, attention, weights) -> float:
    """S = sum_k r_k a_k ||g_k||: bounds ||result|| (a projection never grows a norm)."""
    k = grads.shape[0]
    r = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.tensor(weights).double()
    r = r / r.sum()
    return float((r * torch.tensor(attention, dtype=torch.float64)) @ grads.double().norm(dim=1))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gp_cases())
def test_gram_path_matches_algorithm_2_float64(case):
    grads, previous, temperature, order, weights = case
    fast, stats = gpaggregate(grads, previous, temperature=temperature, order=order, weights=weights)
    ref = gpaggregation_reference(grads, previous, order, temperature, weights)
    assert fast.dtype == torch.float64 and fast.shape == (grads.shape[1],)
    # Normwise, against the result's natural size S: conflicting gradients may cancel to ~0.
    err = float((fast - ref).norm())
    assert err <= 1e-6 * _magnitude(grads, stats.attention_weights, weights) + 1e-300
    assert stats.method == "gpaggregation" and stats.projection_order == tuple(order)
    assert math.fsum(stats.attention_weights) == pytest.approx(1.0)
    if previous is None:
        assert stats.attention_weights == (1.0 / grads.shape[0],) * grads.shape[0]
    w = torch.tensor(stats.coefficients, dtype=torch.float64)
    torch.testing.assert_close(w @ grads, fast, rtol=0, atol=1e-12 * (1 + float(grads.abs().max())))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gp_cases())
def test_gram_path_matches_algorithm_2_float32(case):
    grads64, previous, temperature, order, weights = case
    grads = grads64.float()  # (K, P) float32
    prev = None if previous is None else previous.float()
    fast, stats = gpaggregate(grads, prev, temperature=temperature, order=order, weights=weights)
    assert fast.dtype == torch.float32
    ref = gpaggregation_reference(grads, prev, order, temperature, weights)  # float64 on the float32 values
    # The weights w come from a float64 Gram of the same values (float64-accurate); the float32
    # part is rounding w to float32 and the K-term float32 combination: <= (K + 1) u sum_k |w_k g_kp|.
    w = torch.tensor(stats.coefficients, dtype=torch.float64)
    bound = 2 * (grads.shape[0] + 1) * U32 * (w.abs() @ grads.double().abs())  # (P,)
    bound += 1e-6 * _magnitude(grads, stats.attention_weights, weights)
    # weights or products in float32's subnormal range (a tiny attention weight): absolute rounding
    bound += 2.0**-149 * (grads.double().abs().sum(0) + grads.shape[0] + 1)
    assert bool(((fast.double() - ref).abs() <= bound).all())


def test_hand_computed_two_sites():
    # g1 = (1, 0), g2 = (-1, 1), g' = (x, 0) with x = ln(3) / 2 and d = 1: logits (x, -x),
    # a = (3/4, 1/4); h1 = (3/4, 0), h2 = (-1/4, 1/4); h1 . h2 = -3/16.
    # p1 = h1 + (3/16) / (1/8) h2 = (3/8, 3/8); p2 = h2 + (3/16) / (9/16) h1 = (0, 1/4); mean (3/16, 5/16).
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    previous = torch.tensor([math.log(3.0) / 2, 0.0], dtype=torch.float64)
    out, stats = gpaggregate(grads, previous, temperature=1.0)
    torch.testing.assert_close(out, torch.tensor([3 / 16, 5 / 16], dtype=torch.float64), rtol=1e-15, atol=1e-15)
    assert stats.attention_weights == pytest.approx((0.75, 0.25), rel=1e-15)
    assert stats.projections_applied == 2 and stats.conflicting_pairs == 1
    # p1 = h1 + 1.5 h2, p2 = h2 + h1 / 3: w = a * (mean of the rows of C) = (3/4 * 2/3, 1/4 * 5/4)
    assert stats.coefficients == pytest.approx((0.5, 0.3125), rel=1e-15)
    # Without g' (or with g' orthogonal to both, logits 0) the weights are equal: a = (1/2, 1/2),
    # h1 = (1/2, 0), h2 = (-1/2, 1/2): p1 = (1/4, 1/4), p2 = (0, 1/2), result (1/8, 3/8).
    expected = torch.tensor([0.125, 0.375], dtype=torch.float64)
    out, stats = gpaggregate(grads)
    assert torch.equal(out, expected) and stats.attention_weights == (0.5, 0.5)
    out, _ = gpaggregate(grads, torch.tensor([0.0, 0.0], dtype=torch.float64), temperature=1.0)
    assert torch.equal(out, expected)
    # Step 1 with d = P: logits g_k . g' / P are tiny, so the result is about 1/K of the PCGrad mean.
    assert float(stats.norm_ratio_to_mean) == pytest.approx(float(expected.norm() / grads.mean(0).norm()))


def test_fixed_order_is_the_site_names_order():
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(4, 300, generator=gen, dtype=torch.float64)
    grads[2] = -grads[0] + 0.3 * grads[2]
    grads[3] = -grads[1] + 0.3 * grads[3]
    names = ["delta", "alpha", "charlie", "bravo"]  # sorted: rows 1, 3, 2, 0
    out, stats = gpaggregate(grads, site_names=names)
    assert stats.projection_order == (1, 3, 2, 0)
    torch.testing.assert_close(out, gpaggregation_reference(grads, None, [1, 3, 2, 0]), rtol=1e-12, atol=1e-14)
    # the same sites in another row order give the same result: the order follows the names
    perm = [2, 0, 3, 1]
    again, _ = gpaggregate(grads[perm], site_names=[names[i] for i in perm])
    torch.testing.assert_close(again, out, rtol=1e-12, atol=1e-14)
    assert gpaggregate(grads)[1].projection_order == (0, 1, 2, 3)  # no names: row order


def test_the_aggregator_keeps_the_previous_aggregate_and_uses_it():
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(5, 1000, generator=gen) for _ in range(3)]
    agg = GPAggregator(num_params=1000)
    assert agg.previous is None
    out, stats = agg(steps[0])
    assert stats.attention_weights == (0.2,) * 5  # equal weights at the first call
    assert agg.previous is not None and agg.previous.dtype == torch.float32 and torch.equal(agg.previous, out)
    for grads in steps[1:]:
        expected, expected_stats = gpaggregate(grads, agg.previous.clone(), temperature=1000.0)
        got, got_stats = agg(grads)
        assert torch.equal(got, expected) and got_stats == expected_stats
    assert agg.rounds == 3
    # d = P: the logits are tiny, so a ~ 1/K and the result is ~ 1/K of the plain PCGrad mean
    assert max(abs(a - 0.2) for a in got_stats.attention_weights) < 1e-3


def test_temperature_sharpens_attention_towards_the_previous_aggregate():
    gen = torch.Generator().manual_seed(6)
    grads = torch.randn(3, 500, generator=gen)
    previous = grads[1] * 0.05  # site 1 points along g'; |g_1|^2 ~ P, so its logit is ~0.05 with d = P
    _, soft = gpaggregate(grads, previous)  # d = P
    _, sharp = gpaggregate(grads, previous, temperature=1.0)
    assert max(soft.attention_weights) < 0.5 < sharp.attention_weights[1]
    assert sharp.attention_weights[1] == max(sharp.attention_weights)
    agg = GPAggregator(temperature=1.0)
    agg.previous = previous.clone()
    assert agg(grads)[1].attention_weights == sharp.attention_weights
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="temperature"):
            GPAggregator(temperature=bad)
        with pytest.raises(AggregationError, match="temperature"):
            gpaggregate(grads, previous, temperature=bad)
    with pytest.raises(AggregationError, match="overflow"):
        gpaggregate(grads * 1e30, previous * 1e30, temperature=1e-300)


def test_checkpoint_round_trip_continues_bit_for_bit():
    gen = torch.Generator().manual_seed(7)
    steps = [torch.randn(4, 700, generator=gen) for _ in range(4)]
    fresh = GPAggregator(num_params=700)
    buf = io.BytesIO()
    torch.save(fresh.state_dict(), buf)
    buf.seek(0)
    empty = GPAggregator(num_params=700)
    empty.load_state_dict(torch.load(buf, weights_only=True))
    assert empty.previous is None and empty.rounds == 0

    agg = GPAggregator(num_params=700, every=2)
    for grads in steps[:2]:
        agg(grads)
    buf = io.BytesIO()
    torch.save(agg.state_dict(), buf)
    buf.seek(0)
    resumed = GPAggregator(num_params=700, every=2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.rounds == 2 and torch.equal(resumed.previous, agg.previous)
    for grads in steps[2:]:
        (a, sa), (b, sb) = agg(grads), resumed(grads)
        assert torch.equal(a, b) and sa == sb


def test_every_n_alternates_with_the_plain_mean_and_the_mean_becomes_g_prime():
    gen = torch.Generator().manual_seed(8)
    grads = torch.randn(4, 300, generator=gen)
    grads[1] = -grads[0] + 0.1 * grads[1]
    agg = GPAggregator(every=2)
    outs = [agg(grads.clone()) for _ in range(3)]
    assert [s.method for _, s in outs] == ["gpaggregation", "mean", "gpaggregation"]
    mean_out, mean_stats = mean_aggregate(grads)
    assert torch.equal(outs[1][0], mean_out) and outs[1][1] == mean_stats
    expected, _ = gpaggregate(grads, mean_out.clone())
    assert torch.equal(outs[2][0], expected)  # g' of call 2 is call 1's plain mean
    with pytest.raises(ConfigError, match="every"):
        GPAggregator(every=0)


def test_load_state_dict_refuses_bad_state():
    agg = GPAggregator(num_params=10)
    good = {"previous": torch.zeros(10), "rounds": 3}
    agg.load_state_dict(good)
    bad_states = [
        ({"previous": torch.zeros(10)}, "keys"),
        ({**good, "extra": 1}, "keys"),
        ({**good, "previous": torch.zeros(9)}, "9 entries"),
        ({**good, "previous": torch.zeros(10, dtype=torch.float64)}, "float32"),
        ({**good, "previous": torch.full((10,), float("nan"))}, "not finite"),
        ({**good, "previous": torch.zeros(0)}, "no previous aggregate"),
        ({**good, "rounds": -1}, "rounds"),
        ({"seed": 0, "reduction": "mean", "rounds": 0, "generator_state": torch.zeros(5, dtype=torch.uint8)}, "keys"),
    ]
    for state, match in bad_states:
        with pytest.raises(CheckpointError, match=match):
            GPAggregator(num_params=10).load_state_dict(state)


def test_edge_cases_single_site_zero_rows_wrong_size():
    g = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1))
    agg = GPAggregator()
    for _ in range(2):  # without g', then with it: a = (1,) either way, the gradient unchanged
        out, stats = agg(g)
        assert torch.equal(out, g[0]) and stats.attention_weights == (1.0,)
        assert stats.min_cosine is None and stats.conflicting_pairs == 0
    zeros = torch.zeros(4, 100)
    for previous in (None, torch.zeros(100), torch.ones(100)):
        out, stats = gpaggregate(zeros, previous)
        assert torch.equal(out, torch.zeros(100)) and stats.norm_ratio_to_mean is None
        assert not any(math.isnan(x) for x in stats.coefficients + stats.attention_weights)
    with pytest.raises(AggregationError, match="1000 parameters, the backbone has 10"):
        GPAggregator(num_params=10)(g)
    with pytest.raises(AggregationError, match="previous aggregate must be a tensor of 1000"):
        gpaggregate(g, torch.zeros(3))


def test_non_finite_input_raises_naming_sites_and_changes_no_state():
    gen = torch.Generator().manual_seed(9)
    grads = torch.randn(3, 50, generator=gen)
    agg = GPAggregator()
    agg(grads)
    before = agg.previous.clone()
    bad = grads.clone()
    bad[1, 4] = float("inf")
    with pytest.raises(AggregationError, match="non-finite backbone gradient.*'b'"):
        agg(bad, ["a", "b", "c"])
    assert torch.equal(agg.previous, before) and agg.rounds == 1
    with pytest.raises(AggregationError, match="previous aggregate is not finite"):
        gpaggregate(grads, torch.full((50,), float("nan")))


def test_coefficients_are_a_function_of_the_gram_matrix():
    gen = torch.Generator().manual_seed(10)
    grads = torch.randn(5, 800, generator=gen, dtype=torch.float64)
    previous = torch.randn(800, generator=gen, dtype=torch.float64)
    out, stats = gpaggregate(grads, previous, temperature=30.0)
    w, a, applied = gpaggregation_coefficients(gram_matrix(grads, previous), 5, range(5), 30.0)
    assert tuple(w.tolist()) == stats.coefficients and tuple(a.tolist()) == stats.attention_weights
    assert applied == stats.projections_applied
    with pytest.raises(AggregationError, match="5 x 5 or 6 x 6"):
        gpaggregation_coefficients(torch.eye(3, dtype=torch.float64), 5, range(5), 1.0)


def test_a_tiny_attention_weight_still_projects_exactly():
    # g1 = (1, 0), g2 = (-1, 1), g' = (0, -460), d = 1: a = (1 - e^-460, e^-460 ~ 1e-200). Exactly, p1 is
    # a1 g1 projected onto g2's normal plane (the plane does not depend on h2's length): a1 (1/2, 1/2);
    # p2 = a2 (0, 1). The result is about (1/4, 1/4). Squaring a2 (|h2|^2 ~ 1e-400) underflows in
    # float64: a literal loop in float64 would skip h2 and return (1/2, 0).
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    out, stats = gpaggregate(grads, torch.tensor([0.0, -460.0], dtype=torch.float64), temperature=1.0)
    assert 0.0 < stats.attention_weights[1] < 1e-199
    torch.testing.assert_close(out, torch.tensor([0.25, 0.25], dtype=torch.float64), rtol=1e-15, atol=1e-15)
    assert stats.projections_applied == 2
