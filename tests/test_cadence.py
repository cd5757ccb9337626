"""The two cadences of the FedBone paper (``[server.aggregation] cadence``), in one process.

``step`` (Algorithm 1): one backbone; every site's gradient of a step is aggregated, then one
optimizer step. ``round`` (Figure 2): one replica of the backbone per site, stepped on each of that
site's mini-batches; at the round's end the replicas' updates are aggregated and the global
backbone moves by ``server_lr`` times the aggregate.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import CLS2, SEG1, resume_after_crash, site_cfg, tiny_server
from fedbone_med.config import AggregationConfig, ExperimentConfig, OptimizerConfig
from fedbone_med.experiments.federation import Federation


def _experiment(cadence: str, sites: int = 2, method: str = "mean", optimizer: str = "sgd", lr: float = 0.05,
                momentum: float = 0.9, rounds: int = 3, steps: int = 3, server_lr: float = 1.0) -> ExperimentConfig:
    server = tiny_server(method)
    server = replace(server, optimizer=OptimizerConfig(name=optimizer, lr=lr, weight_decay=0.0, momentum=momentum),
                     aggregation=AggregationConfig(method=method, cadence=cadence, server_lr=server_lr))
    all_sites = (site_cfg("vessels", "vessels", "fundus", SEG1, size=32, n_train=12, n_val=4, batch=4),
                 site_cfg("edema", "oct_edema", "oct", CLS2, size=32, n_train=12, n_val=8, batch=4))
    return ExperimentConfig(name="cad", seed=5, rounds=rounds, steps_per_round=steps, server=server,
                            sites=all_sites[:sites], embedding_fedavg=False)


def _backbone(fed: Federation) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in fed.coordinator.backbone.state_dict().items()}


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in a)


def test_round_cadence_with_one_site_mean_sgd_and_server_lr_1_equals_the_site_training_alone(tmp_path: Path):
    """One replica stepped by SGD with momentum, its update applied with server_lr = 1: the backbone
    follows exactly the path of the site training alone (the step cadence with one site, whose mean
    is its own gradient), round after round (the replica's momentum carries over)."""
    alone = Federation(_experiment("step", sites=1), tmp_path / "alone", audit=False)
    alone.run(progress=False)
    fed = Federation(_experiment("round", sites=1), tmp_path / "round", audit=False)
    results = fed.run(progress=False)
    assert _max_rel(_backbone(fed), _backbone(alone)) < 1e-5
    assert len(results["aggregation"]) == 3  # one aggregation per round
    assert results["final"]["vessels"]["primary"] == pytest.approx(alone.results["final"]["vessels"]["primary"],
                                                                   abs=1e-4)


def test_round_cadence_moves_the_backbone_once_per_round_by_the_aggregated_update(tmp_path: Path):
    """With two sites the global backbone after a round is theta + server_lr * mean(theta_k - theta)."""
    cfg = _experiment("round", rounds=1, server_lr=0.5)
    fed = Federation(cfg, tmp_path, audit=False)
    before = _backbone(fed)
    replicas: dict[str, dict[str, torch.Tensor]] = {}
    original = fed.coordinator._aggregate_replicas

    def spy(reported: list[str]) -> None:
        reps = fed.coordinator.replicas
        assert reps is not None
        for name in reported:
            replicas[name] = {k: v.detach().clone() for k, v in reps._get(name).module.state_dict().items()}
        original(reported)

    fed.coordinator._aggregate_replicas = spy  # type: ignore[method-assign]
    fed.run(progress=False)
    after = _backbone(fed)
    assert sorted(replicas) == ["edema", "vessels"]
    for k in [k for k, v in before.items() if v.is_floating_point()]:
        expected = before[k] + 0.5 * ((replicas["edema"][k] - before[k]) + (replicas["vessels"][k] - before[k])) / 2
        assert torch.allclose(after[k], expected, rtol=1e-5, atol=1e-6), k
    # every replica restarted from the new global backbone
    reps = fed.coordinator.replicas
    assert reps is not None
    for name in ("edema", "vessels"):
        state = reps._get(name).module.state_dict()
        assert all(torch.equal(state[k], after[k]) for k in after)


@pytest.mark.parametrize("cadence", ["step", "round"])
def test_a_resumed_run_ends_where_an_uninterrupted_run_ends_in_both_cadences(tmp_path: Path, cadence: str):
    cfg = _experiment(cadence, optimizer="adamw", lr=1e-3, method="projection")
    whole = Federation(cfg, tmp_path / "whole")
    whole.run(progress=False)
    resumed, _ = resume_after_crash(cfg, tmp_path / "resumed")
    a, b = _backbone(resumed), _backbone(whole)
    assert all(torch.equal(a[k], b[k]) for k in a), cadence


def test_the_cadences_differ_and_the_round_cadence_is_recorded(tmp_path: Path):
    step = Federation(_experiment("step"), tmp_path / "step", audit=False)
    step.run(progress=False)
    rnd = Federation(_experiment("round"), tmp_path / "round", audit=False)
    results = rnd.run(progress=False)
    assert _max_rel(_backbone(step), _backbone(rnd)) > 1e-3
    assert [a["round"] for a in results["aggregation"]] == [0, 1, 2]
    assert all(sorted(a["site_names"]) == ["edema", "vessels"] for a in results["aggregation"])
    state = torch.load(tmp_path / "round" / "checkpoints" / "server.pt", weights_only=True)
    assert state["cadence"] == "round" and sorted(state["replica_optimizers"]) == ["edema", "vessels"]


@pytest.mark.slow
def test_the_round_cadence_over_the_network_equals_the_in_process_run(tmp_path: Path):
    """Three site processes, mutual TLS, the round cadence: the same backbone as in one process, every log
    verified and cross-checked."""
    from fedbone_med.config import load_experiment
    from fedbone_med.experiments.networked import run_networked
    from fedprocs import backbone, experiment, max_diff

    exp = experiment(tmp_path, rounds=2, steps=3, aggregation='cadence = "round"')
    cfg = load_experiment(exp)
    assert cfg.server.aggregation.cadence == "round"
    results = run_networked(cfg, tmp_path / "net", quiet=True, timeout=600)
    assert all(v.startswith("agrees with the server") for v in results["audit"]["sites"].values()), results["audit"]
    assert [a["round"] for a in results["aggregation"]] == [0, 1]
    torch.set_num_threads(1)  # as each process of the federation
    Federation(cfg, tmp_path / "inproc", audit=False).run(progress=False)
    net = backbone(tmp_path / "net" / "server" / "checkpoints" / "server.pt")
    assert max_diff(net, backbone(tmp_path / "inproc" / "checkpoints" / "server.pt")) <= 1e-6
