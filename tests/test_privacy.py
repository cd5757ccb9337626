"""Privacy package: clipping bounds, noise statistics, generators, accountant oracle and budget."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from torch import nn

from fedbone_med.errors import FedboneError
from fedbone_med.models.embeddings import ConvStem
from fedbone_med.privacy import (
    BudgetExceeded,
    GaussianActivationDP,
    LabelDP,
    PrivacyError,
    Release,
    SiteAccountant,
    clip_joint_per_sample,
    clip_per_sample,
    noise_for_target,
    per_sample_norms,
)
from fedbone_med.privacy.dpsgd import check_module, fix_module, validate_module


def seeded(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def norms64(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1).double(), dim=1)


# -- clipping ----------------------------------------------------------------------------------
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4)
magnitudes = st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e3, 1e20, 1e30])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, scale=magnitudes, clip=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_clip_bounds_every_sample(shape: list[int], scale: float, clip: float, seed: int) -> None:
    x = torch.randn(shape, generator=seeded(seed)) * scale
    y = clip_per_sample(x, clip)
    assert y.shape == x.shape and y.dtype == x.dtype and bool(torch.isfinite(y).all())
    n_in, n_out = norms64(x), norms64(y)
    assert bool((n_out <= clip * (1 + 1e-5)).all())
    small = n_in <= clip  # samples already inside the ball are unchanged
    assert torch.equal(y[small], x[small])
    big = ~small & (n_in > 0)  # the others land on the sphere, direction kept
    assert torch.allclose(n_out[big], torch.full_like(n_out[big], clip), rtol=1e-5)


def test_clip_huge_float32_does_not_overflow_to_zero() -> None:
    x = torch.full((2, 4, 4), 1e30)
    y = clip_per_sample(x, 1.0)
    assert torch.allclose(norms64(y), torch.ones(2, dtype=torch.float64), rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    n_maps=st.integers(1, 4),
    batch=st.integers(1, 4),
    scales=st.lists(magnitudes, min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_label_clip_bounds_joint_norm(n_maps: int, batch: int, scales: list[float], seed: int) -> None:
    g = seeded(seed)
    maps = [torch.randn(batch, 2, 3 + i, 3 + i, generator=g) * scales[i] for i in range(n_maps)]
    out = clip_joint_per_sample(maps, 0.5)
    joint = torch.sqrt(sum(norms64(m) ** 2 for m in out))
    assert bool((joint <= 0.5 * (1 + 1e-5)).all())
    assert torch.allclose(per_sample_norms(out), joint, rtol=1e-9)


def test_label_clip_is_joint_not_per_map() -> None:
    # Each map alone has norm 1 <= C = 1.2, jointly sqrt(2) > C: every map must shrink by C/sqrt(2).
    maps = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])]
    out = LabelDP(1.2, 1.0, generator=seeded()).clip(maps)
    for m, o in zip(maps, out, strict=True):
        assert torch.allclose(o, m * 1.2 / math.sqrt(2))


def test_clip_refuses_non_finite_and_mismatched_batches() -> None:
    mech = GaussianActivationDP(1.0, 1.0, generator=seeded())
    for bad in (float("nan"), float("inf")):
        x = torch.zeros(2, 3)
        x[1, 2] = bad
        with pytest.raises(PrivacyError, match="non-finite"):
            mech.apply(x)
    with pytest.raises(PrivacyError, match="batch size"):
        LabelDP(1.0, 1.0, generator=seeded()).apply([torch.zeros(2, 3), torch.zeros(3, 3)])
    with pytest.raises(PrivacyError, match="floating"):
        mech.apply(torch.zeros(2, 3, dtype=torch.long))


# -- construction ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [GaussianActivationDP, LabelDP])
@pytest.mark.parametrize(
    ("clip", "sigma", "name"),
    [
        (0.0, 1.0, "clip_norm"),
        (-1.0, 1.0, "clip_norm"),
        (float("nan"), 1.0, "clip_norm"),
        (float("inf"), 1.0, "clip_norm"),
        (1.0, 0.0, "noise_multiplier"),
        (1.0, -0.5, "noise_multiplier"),
        (1.0, float("nan"), "noise_multiplier"),
    ],
)
def test_construction_refusals(cls: type, clip: float, sigma: float, name: str) -> None:
    with pytest.raises(PrivacyError, match=name):
        cls(clip, sigma)


def test_error_hierarchy() -> None:
    assert issubclass(BudgetExceeded, PrivacyError) and issubclass(PrivacyError, FedboneError)
    assert PrivacyError.exit_code == 10 and BudgetExceeded.exit_code == 10


# -- noise -------------------------------------------------------------------------------------
@pytest.mark.parametrize("secure", [False, True])
def test_noise_std_matches_sigma_c(secure: bool) -> None:
    clip, sigma = 0.7, 1.3
    mech = GaussianActivationDP(clip, sigma, generator=None if secure else seeded(1), secure_mode=secure)
    n = 200_000
    noise = mech.apply(torch.zeros(n, 1, dtype=torch.float64)).flatten()  # zeros: output is pure noise
    std = noise.std().item()
    # The sample std of n Gaussians has std ~ s / sqrt(2n); allow 5 of those (and a 5-sigma mean).
    assert abs(std - sigma * clip) <= 5 * sigma * clip / math.sqrt(2 * n)
    assert abs(noise.mean().item()) <= 5 * sigma * clip / math.sqrt(n)


def test_same_seed_same_noise_and_stream_advances() -> None:
    x = torch.randn(4, 3, 5, 5, generator=seeded(9))
    a = GaussianActivationDP(1.0, 0.8, generator=seeded(3))
    b = GaussianActivationDP(1.0, 0.8, generator=seeded(3))
    ya, yb = a.apply(x), b.apply(x)
    assert torch.equal(ya, yb)
    assert not torch.equal(a.apply(x), ya)  # second call: new noise from the same stream
    la = LabelDP(1.0, 0.8, generator=seeded(3)).apply([x, x[:, :1]])
    lb = LabelDP(1.0, 0.8, generator=seeded(3)).apply([x, x[:, :1]])
    assert all(torch.equal(p, q) for p, q in zip(la, lb, strict=True))


def test_secure_mode_refuses_generator_and_varies() -> None:
    for cls in (GaussianActivationDP, LabelDP):
        with pytest.raises(PrivacyError, match="secure mode"):
            cls(1.0, 1.0, generator=seeded(), secure_mode=True)
    mech = GaussianActivationDP(1.0, 1.0, secure_mode=True)
    x = torch.zeros(3, 8)
    torch.manual_seed(0)
    first = mech.apply(x)
    torch.manual_seed(0)  # the global RNG plays no part
    assert not torch.equal(mech.apply(x), first)


def test_unseeded_default_does_not_use_global_rng() -> None:
    mech = GaussianActivationDP(1.0, 1.0)
    torch.manual_seed(0)
    first = mech.apply(torch.zeros(2, 4))
    torch.manual_seed(0)
    assert not torch.equal(mech.apply(torch.zeros(2, 4)), first)


def test_label_dp_noise_on_every_map() -> None:
    out = LabelDP(1.0, 2.0, generator=seeded()).apply([torch.zeros(1000, 4), torch.zeros(1000, 2, 2)])
    for o in out:
        assert abs(o.std().item() - 2.0) < 0.1


# -- accountant --------------------------------------------------------------------------------
def test_default_delta_below_one_over_n() -> None:
    acc = SiteAccountant(num_records=500)
    assert acc.delta < 1 / 500 and acc.delta == pytest.approx(1 / 5000)
    with pytest.raises(PrivacyError, match="delta"):
        SiteAccountant(num_records=500, delta=1 / 500)
    with pytest.raises(PrivacyError, match="num_records"):
        SiteAccountant(num_records=0)
    with pytest.raises(PrivacyError, match="unknown"):
        SiteAccountant(num_records=10, accountant="gdp?")


def test_epsilon_matches_opacus_rdp_interleaved() -> None:
    n = 1000
    acc = SiteAccountant(num_records=n)
    oracle = RDPAccountant()
    act, lab = GaussianActivationDP(1.0, 1.1, generator=seeded()), LabelDP(1.0, 0.9, generator=seeded())
    for step in range(30):
        q = (32 if step % 3 else 16) / n
        for mech in (act, lab):
            acc.record(mech.name, mech.noise_multiplier, q)
            oracle.step(noise_multiplier=mech.noise_multiplier, sample_rate=q)
    acc.record("activation", 1.1, 0.032, steps=5)
    for _ in range(5):
        oracle.step(noise_multiplier=1.1, sample_rate=0.032)
    assert acc.epsilon() == pytest.approx(oracle.get_epsilon(delta=acc.delta), rel=1e-9)
    assert len(acc.history) == 4  # compacted: (sigma, q) pairs, not one entry per release
    assert acc.releases == {"activation": 35, "label": 30}


def test_prv_accountant_runs() -> None:
    acc = SiteAccountant(num_records=1000, accountant="prv")
    acc.record("activation", 1.0, 0.01, steps=50)
    rdp = SiteAccountant(num_records=1000)
    rdp.record("activation", 1.0, 0.01, steps=50)
    assert 0 < acc.epsilon() <= rdp.epsilon()  # PRV is tighter than RDP


@settings(max_examples=25, deadline=None)
@given(
    releases=st.lists(st.tuples(st.floats(0.5, 5.0), st.floats(0.001, 1.0), st.integers(1, 20)), min_size=1, max_size=8)
)
def test_epsilon_never_decreases(releases: list[tuple[float, float, int]]) -> None:
    acc = SiteAccountant(num_records=1000)
    last = acc.epsilon()
    assert last == 0.0
    for i, (sigma, q, steps) in enumerate(releases):
        acc.record(f"m{i % 2}", sigma, q, steps)
        now = acc.epsilon()
        assert now >= last
        last = now


def test_record_validation() -> None:
    acc = SiteAccountant(num_records=100)
    for args in [(0.0, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, 0), (1.0, float("nan"), 1)]:
        with pytest.raises(PrivacyError):
            acc.record("m", *args)
    assert acc.history == []


def test_state_dict_round_trip_weights_only() -> None:
    acc = SiteAccountant(num_records=1000)
    acc.record("activation", 1.0, 0.02, steps=10)
    acc.record("label", 0.8, 0.02, steps=10)
    buf = io.BytesIO()
    torch.save(acc.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    restored = SiteAccountant(num_records=1000)
    restored.load_state_dict(state)
    assert restored.epsilon() == acc.epsilon() and restored.releases == acc.releases
    for a in (acc, restored):
        a.record("activation", 1.0, 0.02, steps=3)
    assert restored.epsilon() == acc.epsilon()
    with pytest.raises(PrivacyError, match="num_records"):
        SiteAccountant(num_records=999).load_state_dict(state)
    with pytest.raises(PrivacyError, match="rdp"):
        SiteAccountant(num_records=1000, accountant="prv").load_state_dict(state)


def test_charge_refuses_overspend_and_leaves_state() -> None:
    acc = SiteAccountant(num_records=100)
    msg = [Release(1.0, 0.1, "activation"), (1.0, 0.1, "label")]
    acc.charge(2.0, msg)
    before_state, before_eps = acc.state_dict(), acc.epsilon()
    assert not acc.would_exceed(50.0, msg)
    # Keep sending until the budget refuses; the refused message leaves no trace.
    budget = before_eps * 3
    sent = 0
    while not acc.would_exceed(budget, msg):
        after = acc.charge(budget, msg)
        assert after <= budget and after == pytest.approx(acc.epsilon())
        sent += 1
    assert sent >= 1
    state, eps = acc.state_dict(), acc.epsilon()
    with pytest.raises(BudgetExceeded, match=r"epsilon=.* would be exceeded"):
        acc.charge(budget, msg)
    assert acc.state_dict() == state and acc.epsilon() == eps
    assert acc.would_exceed(budget, msg)
    assert acc.state_dict() == state  # would_exceed works on a copy
    assert before_state != state


# -- calibration -------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_noise_for_target_meets_target(k: int) -> None:
    n, q, steps, target = 1000, 0.032, 50, 3.0
    delta = 1 / (10 * n)
    sigma = noise_for_target(target, delta, q, steps, releases_per_step=k)
    acc = SiteAccountant(num_records=n, delta=delta)
    for _ in range(k):
        acc.record(f"m{_}", sigma, q, steps)
    assert target - 0.05 <= acc.epsilon() <= target


def test_noise_for_target_refuses_impossible() -> None:
    with pytest.raises(PrivacyError, match="no noise multiplier"):
        noise_for_target(1e-9, 1e-5, 1.0, 1000)
    with pytest.raises(PrivacyError, match="target_epsilon"):
        noise_for_target(0.0, 1e-5, 0.1, 10)
    with pytest.raises(PrivacyError, match="steps"):
        noise_for_target(1.0, 1e-5, 0.1, 0)


# -- DP-SGD compatibility ----------------------------------------------------------------------
def test_validate_and_fix_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    problems = validate_module(model)
    assert len(problems) == 1 and "BatchNorm" in problems[0]
    with pytest.raises(PrivacyError, match="BatchNorm"):
        check_module(model)
    fixed = fix_module(model)
    assert validate_module(fixed) == [] and isinstance(fixed[1], nn.GroupNorm)


def test_conv_stem_is_compatible() -> None:
    assert validate_module(ConvStem(3, 16, stride=4)) == []
