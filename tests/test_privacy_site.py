"""Differential privacy in the training loop: noise on what leaves the site, one accountant,
a budget that is never exceeded, and a checkpointed accountant."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from opacus.accountants import RDPAccountant

from conftest import CLS2, SEG1, resume_after_crash, site_cfg, tiny_server
from fedbone_med.config import ExperimentConfig, PrivacyConfig
from fedbone_med.configtools import from_mapping
from fedbone_med.errors import ConfigError
from fedbone_med.experiments.federation import Federation
from fedbone_med.transport import InProcessTransport


def _experiment(privacy: PrivacyConfig, rounds: int = 2, steps: int = 3) -> ExperimentConfig:
    private = site_cfg("private", "oct_edema", "oct", CLS2, n_train=32, n_val=16, batch=8)
    return ExperimentConfig(
        name="dp", seed=3, rounds=rounds, steps_per_round=steps, server=tiny_server("projection"),
        sites=(replace(private, privacy=privacy), site_cfg("open", "vessels", "fundus", SEG1, n_train=16, batch=8)),
    )


def test_privacy_config_needs_exactly_one_of_target_or_sigma():
    with pytest.raises(ConfigError, match="give exactly one of them"):
        from_mapping(PrivacyConfig, {"enabled": True}, where="privacy")
    with pytest.raises(ConfigError, match="needs an epsilon_budget"):
        from_mapping(PrivacyConfig, {"enabled": True, "noise_multiplier": 1.0}, where="privacy")
    with pytest.raises(ConfigError, match="activation_clip: must be > 0"):
        from_mapping(PrivacyConfig, {"enabled": True, "target_epsilon": 4.0, "activation_clip": 0.0}, where="p")


def test_epsilon_matches_opacus_and_the_server_receives_noised_clipped_activations(tmp_path):
    privacy = PrivacyConfig(enabled=True, noise_multiplier=1.5, epsilon_budget=50.0, activation_clip=2.0)
    fed = Federation(_experiment(privacy), tmp_path)
    received = []
    original_forward = InProcessTransport.forward

    def spy(self, header, z):
        if header.site == "private" and header.mode == "train":
            received.append(z.clone())
        return original_forward(self, header, z)

    InProcessTransport.forward = spy  # type: ignore[method-assign]
    try:
        results = fed.run(progress=False)
    finally:
        InProcessTransport.forward = original_forward  # type: ignore[method-assign]
    # 6 steps, each with two releases (activation, label) at q = 8/32, sigma 1.5
    oracle = RDPAccountant()
    for _ in range(12):
        oracle.step(noise_multiplier=1.5, sample_rate=0.25)
    delta = 1 / (10 * 32)
    eps = results["final"]["private"]["epsilon"]
    assert eps == pytest.approx(oracle.get_epsilon(delta), rel=1e-6)
    assert results["final"]["private"]["delta"] == pytest.approx(delta)
    assert "epsilon" not in results["final"]["open"]
    # what the server saw: clipped to norm 2 plus N(0, (1.5 * 2)^2) per coordinate
    z = received[0]
    per_coord = z.flatten(1)
    assert len(received) == 6
    assert float(per_coord.std()) == pytest.approx(3.0, rel=0.05)
    # and the audit log carries epsilon for the private site only
    from fedbone_med.audit import load_public_keys, verify_log

    keys = load_public_keys([tmp_path / "keys" / "server-audit-key.pub.pem"])
    report = verify_log(tmp_path / "audit" / "server.jsonl", keys)
    rounds = [r["body"] for r in report.records if r["kind"] == "round"]
    sites = {s["site_id"]: s for s in rounds[-1]["sites"]}
    assert sites["private"]["epsilon"] == pytest.approx(eps) and sites["open"]["epsilon"] is None


def test_a_site_stops_before_it_would_exceed_its_budget(tmp_path):
    privacy = PrivacyConfig(enabled=True, noise_multiplier=0.8, epsilon_budget=2.0, label_dp=False)
    fed = Federation(_experiment(privacy, rounds=3, steps=10), tmp_path)
    results = fed.run(progress=False)
    stopped = results["stopped"]["private"]
    assert "budget" in stopped["reason"].lower()
    eps = fed.sites[0].privacy.train.epsilon()
    assert eps <= 2.0
    # one more step would have exceeded it
    assert fed.sites[0].privacy.train.epsilon_after([fed.sites[0].privacy.activation.release(0.25)]) > 2.0
    # the other site trained every step; the private site sent exactly as many steps as it charged
    steps_charged = sum(h[2] for h in fed.sites[0].privacy.train.history)
    assert results["rounds"][-1]["sites"]["private"] == {"stopped": stopped}
    assert len(results["aggregation"]) == 30
    sent = sum(1 for a in results["aggregation"] if "private" in a["site_names"])
    assert sent == steps_charged
    # the audit log records that the site left, and why
    from fedbone_med.audit import load_public_keys, verify_log

    report = verify_log(tmp_path / "audit" / "server.jsonl",
                        load_public_keys([tmp_path / "keys" / "server-audit-key.pub.pem"]))
    leaves = [r["body"] for r in report.records if r["kind"] == "leave"]
    assert [(b["site_id"], "budget" in b["reason"].lower()) for b in leaves] == [("private", True)]


def test_a_crash_mid_round_never_un_spends_budget(tmp_path, monkeypatch):
    """Steps charged (and sent) in a round that never completed stay charged after the restart."""
    from fedbone_med.site.runtime import SiteRuntime

    privacy = PrivacyConfig(enabled=True, noise_multiplier=1.0, epsilon_budget=50.0)
    cfg = _experiment(privacy, rounds=2, steps=3)
    full = Federation(cfg, tmp_path / "full")
    full.run(progress=False)
    eps_full = full.sites[0].privacy.train.epsilon()
    charged_full = sum(h[2] for h in full.sites[0].privacy.train.history)  # 6 steps x (activation + label DP)

    real = SiteRuntime.train_step
    calls = {"n": 0}

    def crash_in_round_1(self, rnd, step, i):
        if self.name == "private" and rnd == 1:
            calls["n"] += 1
            if calls["n"] == 3:  # two steps of round 1 were charged and sent; the process dies in the third
                self.privacy.charge_step()
                raise KeyboardInterrupt("power cut")
        return real(self, rnd, step, i)

    monkeypatch.setattr(SiteRuntime, "train_step", crash_in_round_1)
    first = Federation(cfg, tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        first.run(progress=False)
    monkeypatch.setattr(SiteRuntime, "train_step", real)
    resumed = Federation(cfg, tmp_path / "part")
    resumed.run(resume=True, progress=False)
    acc = resumed.sites[0].privacy.train
    charged = sum(h[2] for h in acc.history)
    assert charged == charged_full * (6 + 3) // 6  # the uninterrupted run's 6 steps plus the lost attempt's 3
    assert acc.epsilon() > eps_full
    # without the journal the restart would have forgotten them: the checkpoint alone holds round 0's 3 steps
    from fedbone_med.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "part" / "checkpoints" / "site-private.pt", "site")
    assert state["privacy"]["journal_count"] == 2 * 3 + 3 + 2  # + one validation pass per round


def test_resume_restores_the_accountant_and_the_noise(tmp_path):
    privacy = PrivacyConfig(enabled=True, target_epsilon=8.0)
    cfg = _experiment(privacy, rounds=2, steps=2)
    full = Federation(cfg, tmp_path / "full")
    full_results = full.run(progress=False)

    resumed, out = resume_after_crash(cfg, tmp_path / "part")
    assert out["final"]["private"]["epsilon"] == full_results["final"]["private"]["epsilon"]
    assert out["final"]["private"]["epsilon"] <= 8.0
    for (k, a), b in zip(full.coordinator.backbone.state_dict().items(),
                         resumed.coordinator.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_dpsgd_on_the_site_layers_is_accounted_resumes_exactly_and_allows_embedding_fedavg(tmp_path):
    privacy = PrivacyConfig(enabled=True, noise_multiplier=1.2, epsilon_budget=100.0, dpsgd=True, dpsgd_clip=1.0)
    cfg = _experiment(privacy, rounds=2, steps=2)
    full = Federation(cfg, tmp_path / "full")
    before = {k: v.clone() for k, v in full.sites[0].model.state_dict().items()}
    results = full.run(progress=False)
    # three releases per step (activation, label, DP-SGD), 4 steps, q = 8/32
    oracle = RDPAccountant()
    for _ in range(12):
        oracle.step(noise_multiplier=1.2, sample_rate=0.25)
    assert results["final"]["private"]["epsilon"] == pytest.approx(oracle.get_epsilon(1 / 320), rel=1e-6)
    after = full.sites[0].model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "DP-SGD must update the site layers"

    resumed, _ = resume_after_crash(cfg, tmp_path / "part")
    for (k, a), b in zip(full.sites[0].model.state_dict().items(),
                         resumed.sites[0].model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"site layer {k} differs after resume (DP-SGD noise must resume exactly)"
