"""The reproduction (issue 7): every method on the same budget, what each method shares, the
bytes accounting, the outputs' consistency, and the command line. Phantom sites, tiny sizes."""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import CLS2, CLS5, SEG1, SEG9, site_cfg, tiny_server
from fedbone_med.cli.fedbone import main
from fedbone_med.config import ExperimentConfig
from fedbone_med.data.sources import load_site_data
from fedbone_med.errors import ConfigError, DataError
from fedbone_med.experiments import reproduce as rep
from fedbone_med.experiments.accounting import fedavg_bytes_per_round, fedbone_bytes_per_round, site_costs
from fedbone_med.experiments.baselines import Centralised, LocalGroup
from fedbone_med.experiments.report import LAST_ROUNDS, fmt
from fedbone_med.models import build_backbone

ROOT = Path(__file__).resolve().parents[1]


def _cfg(rounds: int = 2, steps: int = 2, seed: int = 0) -> ExperimentConfig:
    return ExperimentConfig(
        name="tiny-ophthalmic",
        seed=seed,
        rounds=rounds,
        steps_per_round=steps,
        embedding_fedavg=False,  # as the ophthalmic experiment: FedBone sites keep their embeddings
        server=tiny_server("projection", lr=2e-3),
        sites=(
            site_cfg("vessels", "vessels", "fundus", SEG1, size=32, n_train=12, n_val=8, batch=4),
            site_cfg("dr", "dr_grade", "fundus", CLS5, size=32, n_train=20, n_val=10, batch=4),
            site_cfg("layers", "oct_layers", "oct", SEG9, size=32, n_train=12, n_val=8, batch=4),
            site_cfg("edema", "oct_edema", "oct", CLS2, size=32, n_train=16, n_val=12, batch=4),
        ),
    )


def _data(cfg: ExperimentConfig):
    return {s.name: load_site_data(s) for s in cfg.sites}


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in state.values() if v.is_floating_point()])


# -- the methods ------------------------------------------------------------------------------


def test_every_method_trains_with_the_same_step_budget(tmp_path):
    cfg = _cfg(rounds=2, steps=3)
    data = _data(cfg)
    budget = cfg.rounds * cfg.steps_per_round
    steps_taken = {}
    for method in rep.METHODS:
        run_cfg = rep.with_method(cfg, method, cfg.seed)
        if method.startswith("fedbone-"):
            from fedbone_med.experiments.federation import Federation

            fed = Federation(run_cfg, tmp_path / method, audit=False)
            results = fed.run(progress=False)
            steps_taken[method] = {s.name: fed.coordinator.step for s in fed.sites}
            assert {a["method"] for a in results["aggregation"]} == {method.removeprefix("fedbone-")}
        elif method in ("local", "fedavg"):
            group = LocalGroup(run_cfg, data, fedavg=method == "fedavg")
            results = group.run()
            steps_taken[method] = {m.site.name: m.coordinator.step for m in group.members}
        else:
            central = Centralised(run_cfg, data)
            results = central.run()
            steps_taken[method] = {s.name: central.samples_seen[s.name] // s.cfg.train.batch_size
                                   for s in central.sites}
        assert [r["round"] for r in results["rounds"]] == [0, 1], method
        for s in cfg.sites:
            final = results["final"][s.name]
            assert math.isfinite(final["primary"]) and math.isfinite(final["train_loss"]), (method, s.name)
    assert all(v == budget for steps in steps_taken.values() for v in steps.values()), steps_taken


def test_fedavg_averages_backbones_and_embeddings_but_not_heads():
    cfg = _cfg(rounds=1, steps=2)
    assert not cfg.embedding_fedavg  # FedAvg averages the full model whatever FedBone does with embeddings
    group = LocalGroup(cfg, _data(cfg), fedavg=True)
    before = {m.site.name: _flat(m.coordinator.backbone.state_dict()) for m in group.members}
    results = group.run()
    states = group.backbone_states()
    first = next(iter(states.values()))
    for name, state in states.items():
        for k, v in state.items():
            assert torch.equal(v, first[k]), f"{name}: backbone differs at {k} after a FedAvg round"
    # the average is the sample-weighted mean of what the sites trained (not, e.g., one site's copy)
    assert not any(torch.equal(_flat(first), b) for b in before.values())
    sites = {m.site.name: m.site.model for m in group.members}
    for a, b in (("vessels", "dr"), ("layers", "edema")):  # same modality: embeddings averaged
        for k, v in sites[a].embedding.state_dict().items():
            assert torch.equal(v, sites[b].embedding.state_dict()[k]), (a, b, k)
    # adaptation modules (same shapes at every site) and heads stay local
    assert not torch.equal(_flat(sites["vessels"].adaptation.state_dict()), _flat(sites["dr"].adaptation.state_dict()))
    bb_bytes = sum(v.numel() * 4 for v in first.values() if v.is_floating_point())
    for name, m in results["final"].items():
        assert m["bytes_sent"] >= bb_bytes and m["bytes_received"] >= bb_bytes, name


def test_fedavg_is_the_sample_weighted_mean():
    cfg = _cfg(rounds=1, steps=2)
    data = _data(cfg)
    local = LocalGroup(cfg, data, fedavg=False)
    local.run()
    fedavg = LocalGroup(cfg, data, fedavg=True)
    fedavg.run()
    # before averaging, FedAvg's sites trained exactly what local-only's did (same seeds, batches)
    weights = {m.site.name: len(m.site.data.train) for m in local.members}
    total = sum(weights.values())
    expected = sum(_flat(s) * weights[n] / total for n, s in local.backbone_states().items())
    got = _flat(next(iter(fedavg.backbone_states().values())))
    assert torch.allclose(got, expected, atol=1e-6)


def test_local_only_never_shares():
    cfg = _cfg(rounds=2, steps=2)
    group = LocalGroup(cfg, _data(cfg), fedavg=False)
    results = group.run()
    flat = {n: _flat(s) for n, s in group.backbone_states().items()}
    names = list(flat)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(flat[a], flat[b]), f"local-only backbones of {a} and {b} are equal"
    emb = {m.site.name: _flat(m.site.model.embedding.state_dict()) for m in group.members}
    assert not torch.equal(emb["vessels"], emb["dr"]) and not torch.equal(emb["layers"], emb["edema"])
    for record in results["rounds"]:
        for name, m in record["sites"].items():
            assert m["bytes_sent"] == 0 and m["bytes_received"] == 0, name


def test_centralised_sees_every_sites_data():
    cfg = _cfg(rounds=1, steps=2)
    central = Centralised(cfg, _data(cfg))
    seen: list[tuple[int, ...]] = []
    handle = central.coordinator.backbone.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    central.train_step(0, 0)
    handle.remove()
    # one backbone forward per site per step, each with that site's batch
    assert len(seen) == len(cfg.sites)
    assert [shape[0] for shape in seen] == [s.train.batch_size for s in cfg.sites]
    assert [shape[1] for shape in seen] == [16] * len(cfg.sites)  # one shared backbone (z width 16)
    assert central.samples_seen == {s.name: s.train.batch_size for s in cfg.sites}


def test_centralised_backbone_gradient_is_the_sum_over_every_site():
    cfg = _cfg(rounds=1, steps=1)
    data = _data(cfg)
    central = Centralised(cfg, data)
    params = list(central.coordinator.backbone.parameters())
    central.optimizer.step = lambda *a, **k: None  # keep the gradients, skip the update
    central.train_step(0, 0)
    pooled = torch.cat([p.grad.reshape(-1) for p in params])
    per_site = []
    for site in central.sites:
        central.optimizer.zero_grad(set_to_none=True)
        x, y = central._batch(site, 0, 0)
        z = site.model.embed(x)
        site.loss_fn(site.model.top(central.coordinator.backbone(z), z, (x.shape[-2], x.shape[-1])), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        assert g.abs().sum() > 0, site.name
        per_site.append(g)
    assert torch.allclose(pooled, sum(per_site), atol=1e-6)


# -- bytes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fedbone-mean", "fedbone-projection-avgemb"])
def test_fedbone_bytes_counted_match_tensor_sizes(tmp_path, method):
    cfg = rep.with_method(_cfg(rounds=1, steps=2), method, 0)
    results = rep.run_fedbone(cfg, tmp_path / "run", "inprocess", keep_checkpoints=False)
    backbone = build_backbone(cfg.server.backbone)
    # by hand: 32 px images, stride-2 stem -> z (16, 16, 16); 4 Swin stages -> F_l (16 * 2^l, 16 / 2^l, ...)
    z = 16 * 16 * 16 * 4
    feats = sum(16 * 2 ** (level + 1) * (16 // 2 ** (level + 1)) ** 2 * 4 for level in range(4))
    for s in cfg.sites:
        m = results["rounds"][0]["sites"][s.name]
        n_val = results["sites"][s.name]["n_val"]
        # embeddings go up and the modality's average comes down only in the averaged-embedding ablation
        emb = sum(v.numel() * 4 for v in _embedding_state(cfg, s).values()) if cfg.embedding_fedavg else 0
        batch = s.train.batch_size
        want_sent = 2 * batch * (z + feats) + n_val * z + emb
        want_received = 2 * batch * (feats + z) + n_val * feats + emb  # both modalities have 2 sites
        assert m["bytes_sent"] == want_sent, (s.name, m["bytes_detail"])
        assert m["bytes_received"] == want_received, (s.name, m["bytes_detail"])
        assert m["bytes_detail"]["sent"]["z_train"] == 2 * batch * z
        assert m["bytes_detail"]["received"]["F_train"] == 2 * batch * feats
        shapes = fedbone_bytes_per_round(cfg, s, backbone, results["sites"][s.name]["n_train"], n_val, 2)
        assert shapes == {"bytes_sent": want_sent, "bytes_received": want_received}
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert (tmp_path / "run" / "audit" / "server.jsonl").is_file()


def _embedding_state(cfg, s):
    from fedbone_med.models import CutSpec, build_site_model

    return build_site_model(s, CutSpec.of(build_backbone(cfg.server.backbone))).embedding.state_dict()


def test_fedavg_bytes_match_state_sizes():
    cfg = _cfg(rounds=1, steps=1)
    group = LocalGroup(cfg, _data(cfg), fedavg=True)
    results = group.run()
    backbone = build_backbone(cfg.server.backbone)
    bb = sum(p.numel() for p in backbone.parameters()) * 4
    bb += sum(b.numel() * 4 for b in backbone.buffers() if b.is_floating_point())
    for s in cfg.sites:
        emb = sum(v.numel() * 4 for v in _embedding_state(cfg, s).values())
        m = results["final"][s.name]
        assert m["bytes_sent"] == bb + emb and m["bytes_received"] == bb + emb
        assert fedavg_bytes_per_round(s, backbone, 2) == {"bytes_sent": bb + emb, "bytes_received": bb + emb}


def test_site_costs_are_below_the_full_model():
    costs = site_costs(_cfg(), measure_memory=True)
    for name, c in costs.items():
        assert c["full_parameters"] == c["site_parameters"] + c["backbone_parameters"]
        assert 0 < c["site_macs"] < c["full_macs"] and c["backbone_macs"] > 0, name
        assert 0 < c["site_step_peak_bytes"] < c["full_step_peak_bytes"], name


# -- outputs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    summary = rep.reproduce(_cfg(rounds=2, steps=2), out, seeds=(0, 1), methods=rep.ALL_METHODS,
                            measure_memory=False, profile="test")
    return out, summary


def test_outputs_are_written_and_consistent(reproduction):
    out, summary = reproduction
    for f in ("table.md", "results.csv", "costs.csv", "results.json", "report.md", "curves.png", "conflicts.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    fedbone_methods = [m for m in rep.ALL_METHODS if m.startswith("fedbone-")]
    assert {"fedbone-mean", "fedbone-projection", "fedbone-projection-avgemb", "fedbone-gpagg-step",
            "fedbone-gpagg-round"} == set(fedbone_methods)
    for m in fedbone_methods:
        for seed in (0, 1):
            log = out / "runs" / f"{m}-seed{seed}" / "audit" / "server.jsonl"
            assert log.is_file() and log.read_text().strip(), log
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"] == list(rep.ALL_METHODS)
    assert set(on_disk["sites"]) == {"vessels", "dr", "layers", "edema"}
    # every FedBone method x 2 seeds: the server's log and each of the 4 sites' own
    logs = on_disk["audit_logs"]
    runs = len(fedbone_methods) * 2
    assert sum(p.endswith("audit/server.jsonl") for p in logs) == runs
    assert sum(p.endswith("audit/site.jsonl") for p in logs) == runs * 4 and len(logs) == runs * 5
    table = (out / "table.md").read_text()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(rep.ALL_METHODS) * sum(len(i["metrics"]) for i in on_disk["sites"].values())
    for row in rows:
        j = on_disk["metrics"][row["method"]][row["site"]][row["metric"]]
        values = [float(v) for v in row["values"].split(";")]
        assert values == j["values"] and len(values) == 2
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values)) == pytest.approx(j["mean"])
        assert float(row["std"]) == pytest.approx(statistics.stdev(values)) == pytest.approx(j["std"])
        assert fmt(j["mean"], j["std"]) in table, row
    # the per-seed values are the runs' own final metrics
    for run in on_disk["runs"]:
        for site, m in run["results"]["final"].items():
            j = on_disk["metrics"][run["method"]][site]
            for key, c in j.items():
                assert c["values"][on_disk["meta"]["seeds"].index(run["seed"])] == m[key]
    # splits are recorded
    assert all("split" in i for i in on_disk["sites"].values())


def test_report_statements_follow_the_numbers(reproduction):
    out, _ = reproduction
    on_disk = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    for site, info in on_disk["sites"].items():
        key = info["primary_metric"]
        ours = on_disk["metrics"]["fedbone-projection"][site][key]["mean"]
        line = next(li for li in report.splitlines() if li.startswith(f"- **{site}**"))
        wins_part, loses_part = line.split("; loses against ")
        for m in rep.METHODS:
            if m == "fedbone-projection":
                continue
            other = on_disk["metrics"][m][site][key]["mean"]
            label = rep.LABELS[m]
            assert (f"{label} (" in wins_part) == (ours > other), (site, m, line)
            assert (f"{label} (" in loses_part) == (ours < other), (site, m, line)
    wins = sum(on_disk["metrics"]["fedbone-projection"][s][i["primary_metric"]]["mean"]
               > on_disk["metrics"]["fedavg"][s][i["primary_metric"]]["mean"] for s, i in on_disk["sites"].items())
    assert f"({wins} of 4)" in report
    # the ablation's section states its differences to FedBone (projection) from the same numbers
    section = report.split("## Ablation")[1]
    for site, info in on_disk["sites"].items():
        key = info["primary_metric"]
        diff = (on_disk["metrics"]["fedbone-projection-avgemb"][site][key]["mean"]
                - on_disk["metrics"]["fedbone-projection"][site][key]["mean"])
        assert f"{site} {diff:+.3f}" in section
    # the last-rounds check: each run's mean over its last 2 rounds, from the per-round records
    tail = report.split(f"last {LAST_ROUNDS} rounds")[1].split("##")[0]
    for m in rep.METHODS:
        for site, info in on_disk["sites"].items():
            per_seed = []
            for run in (r for r in on_disk["runs"] if r["method"] == m):
                values = [rec["sites"][site]["primary"] for rec in run["results"]["rounds"]][-LAST_ROUNDS:]
                per_seed.append(sum(values) / len(values))
            got = on_disk["metrics_last_rounds"][m][site][info["primary_metric"]]
            assert got["values"] == pytest.approx(per_seed)
    d = [on_disk["metrics_last_rounds"]["fedbone-projection"][s][i["primary_metric"]]["mean"]
         - on_disk["metrics_last_rounds"]["fedbone-mean"][s][i["primary_metric"]]["mean"]
         for s, i in on_disk["sites"].items()]
    assert f"(mean difference of the primary metrics {sum(d) / len(d):+.3f})" in tail


def test_costs_csv_matches_json(reproduction):
    out, _ = reproduction
    on_disk = json.loads((out / "results.json").read_text())
    for row in csv.DictReader((out / "costs.csv").open()):
        c = on_disk["costs"][row["site"]]
        assert int(row["site_parameters"]) == c["site_parameters"]
        assert int(row["full_macs"]) == c["full_macs"]
        t = on_disk["traffic"]
        assert float(row["fedbone-projection_bytes_sent_per_round"]) == t["fedbone-projection"][row["site"]][
            "bytes_sent_per_round"]
        assert float(row["local_bytes_sent_per_round"]) == 0.0


# -- the command line ------------------------------------------------------------------------


def _phantom_experiment(tmp_path: Path, rounds: int, steps: int) -> Path:
    path = tmp_path / "phantom.toml"
    sites = "".join(f'[[sites]]\nconfig = "{ROOT / "sites" / f}"\n\n' for f in
                    ("phantom-vessels.toml", "phantom-oct-layers.toml", "phantom-oct-edema.toml"))
    path.write_text(f"""
name = "phantom-ophthalmic"
embedding_fedavg = false   # averaging the two OCT stems keeps oedema at chance this early (see the report)
rounds = {rounds}
steps_per_round = {steps}
[server.backbone]
name = "swin-tiny"
embed_dim = 16
depths = [1, 1, 1, 1]
num_heads = [1, 2, 2, 4]
window_size = 4
[server.optimizer]
lr = 2e-3
[site_overrides.data]
image_size = 48
n_train = 64
n_val = 48
[site_overrides.model]
adapt_dim = 16
adapt_heads = 2
[site_overrides.train]
batch_size = 8
{sites}""")
    return path


@pytest.mark.slow
def test_cli_quick_on_phantoms(tmp_path, capsys):
    exp = _phantom_experiment(tmp_path, rounds=3, steps=12)
    out = tmp_path / "out"
    code = main(["reproduce", "ophthalmic", "--quick", "--experiment-file", str(exp), "--out", str(out), "--no-memory"])
    assert code == 0
    assert "FedBone (projection)" in capsys.readouterr().out
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["meta"]["seeds"] == [0] and on_disk["meta"]["profile"] == "quick"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} == set(rep.load_profile("ophthalmic", "quick").methods) >= set(rep.METHODS)
    assert {r["site"] for r in rows} == {"fundus-vessels", "oct-layers", "oct-edema"}
    for site, info in on_disk["sites"].items():
        m = on_disk["metrics"]["fedbone-projection"][site][info["primary_metric"]]["mean"]
        assert m > info["chance"], (site, m, info["chance"])


def test_cli_missing_data_names_the_dataset(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("FEDBONE_DATA_ROOT", str(empty))  # restored after the test (the CLI sets it too)
    code = main(["reproduce", "ophthalmic", "--quick", "--data-root", str(empty), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == DataError.exit_code
    for word in ("chase_db1", "idrid_od_he", "retinamnist", "--data-root", "FEDBONE_DATA_ROOT"):
        assert word in err, (word, err)
    assert not (tmp_path / "o" / "results.json").exists()


def test_grpc_without_the_networked_runner_fails_clearly(tmp_path, monkeypatch):
    import fedbone_med.experiments as pkg

    monkeypatch.delattr(pkg, "networked", raising=False)
    monkeypatch.setitem(sys.modules, "fedbone_med.experiments.networked", None)
    with pytest.raises(ConfigError, match="grpc is not available yet"):
        rep.run_fedbone(rep.with_method(_cfg(), "fedbone-projection", 0), tmp_path, "grpc", False)
    assert not (tmp_path / "results.json").exists()


def test_grpc_uses_the_networked_runner(tmp_path, monkeypatch):
    """With the networked runner present, FedBone runs go through it (no in-process fallback)."""
    import types

    calls = []

    def run_networked(cfg, out_dir, **kw):
        calls.append((cfg.server.aggregation.method, Path(out_dir)))
        from fedbone_med.experiments.federation import Federation

        return Federation(cfg, out_dir, audit=False).run(progress=False)

    fake = types.ModuleType("fedbone_med.experiments.networked")
    fake.run_networked = run_networked  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fedbone_med.experiments.networked", fake)
    import fedbone_med.experiments as pkg

    monkeypatch.setattr(pkg, "networked", fake, raising=False)
    cfg = rep.with_method(_cfg(rounds=1, steps=1), "fedbone-mean", 0)
    results = rep.run_fedbone(cfg, tmp_path / "r", "grpc", False)
    assert calls == [("mean", tmp_path / "r")]
    assert all(m["bytes_source"] == "shapes" and m["bytes_sent"] > 0 for m in results["final"].values())


# -- the experiment as data ------------------------------------------------------------------


def test_profiles_describe_the_five_site_experiment():
    names = {"chase-vessels", "idrid-od-he", "retinamnist-dr", "oct-layers", "oct-edema"}
    loaded = {}
    for profile in ("default", "quick", "gpu"):
        p = rep.load_profile("ophthalmic", profile)
        cfg = rep.load_experiment_file(p.experiment)
        assert {s.name for s in cfg.sites} == names, profile
        assert set(rep.METHODS) <= set(p.methods) <= set(rep.ALL_METHODS)
        assert cfg.embedding_fedavg is False, profile  # the paper's FedBone: embeddings stay at the sites
        loaded[profile] = (p, cfg)
    assert loaded["default"][0].seeds == (0, 1, 2) and loaded["quick"][0].seeds == (0,)
    gpu = loaded["gpu"][1]
    assert gpu.server.backbone.name == "swin-t"
    assert {s.data.image_size for s in gpu.sites if s.name != "retinamnist-dr"} == {512}
    tasks = {s.name: (s.task.type, s.task.mode, s.task.num_classes) for s in loaded["default"][1].sites}
    assert tasks["idrid-od-he"] == ("segmentation", "multilabel", 2)
    assert tasks["retinamnist-dr"][0] == "classification" and tasks["oct-edema"][2] == 2
    # the real-data splits are fixed by the dataset manifests, the same in every profile
    for profile in ("quick", "gpu"):
        for a, b in zip(loaded["default"][1].sites, loaded[profile][1].sites, strict=True):
            assert (a.data.manifest, a.data.seed, a.data.val_split) == (b.data.manifest, b.data.seed, b.data.val_split)


def test_gpu_profile_builds_swin_t_and_fits_every_site():
    from fedbone_med.models import CutSpec, build_site_model

    cfg = rep.load_experiment_file(rep.load_profile("ophthalmic", "gpu").experiment)
    backbone = build_backbone(cfg.server.backbone)
    assert 25e6 < sum(p.numel() for p in backbone.parameters()) < 35e6  # Swin-T (MONAI: 32 M)
    cut = CutSpec.of(backbone)
    for s in cfg.sites:
        build_site_model(replace(s, train=replace(s.train, device="cpu")), cut)


def test_fedbone_keeps_embeddings_local_and_the_ablation_averages_them(tmp_path):
    base = _cfg(rounds=1, steps=1)
    cfg = rep.with_method(base, "fedbone-projection", 0)
    assert cfg.server.aggregation.method == "projection" and cfg.embedding_fedavg is False
    results = rep.run_fedbone(cfg, tmp_path / "local", "inprocess", keep_checkpoints=False)
    for name, m in results["final"].items():
        assert m["fedavg_group"] == [name]
        assert m["bytes_detail"]["sent"].get("embedding", 0) == 0
        assert m["bytes_detail"]["received"].get("embedding", 0) == 0
    ablation = rep.with_method(base, "fedbone-projection-avgemb", 0)
    assert ablation.server.aggregation.method == "projection" and ablation.embedding_fedavg is True
    results = rep.run_fedbone(ablation, tmp_path / "avg", "inprocess", keep_checkpoints=False)
    groups = {"vessels": {"vessels", "dr"}, "dr": {"vessels", "dr"}, "layers": {"layers", "edema"},
              "edema": {"layers", "edema"}}
    for name, m in results["final"].items():
        assert set(m["fedavg_group"]) == groups[name], (name, m["fedavg_group"])
        assert m["bytes_detail"]["sent"]["embedding"] > 0 and m["bytes_detail"]["received"]["embedding"] > 0


def test_retired_method_name_says_what_replaced_it(tmp_path):
    with pytest.raises(ConfigError, match="fedbone-projection-avgemb"):
        rep.reproduce(_cfg(rounds=1, steps=1), tmp_path, seeds=(0,), methods=("fedbone-projection-localemb",))
    with pytest.raises(ConfigError, match="unknown method 'fedbone-nope'"):
        rep.check_methods(["local", "fedbone-nope"])
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("method,cadence,aggregations", [("fedbone-gpagg-step", "step", 4),
                                                          ("fedbone-gpagg-round", "round", 2)])
def test_the_papers_gpaggregation_runs_at_both_cadences(tmp_path, method, cadence, aggregations):
    cfg = rep.with_method(_cfg(rounds=2, steps=2), method, 0)
    assert cfg.server.aggregation.method == "gpaggregation" and cfg.server.aggregation.cadence == cadence
    results = rep.run_fedbone(cfg, tmp_path, "inprocess", keep_checkpoints=False)
    assert len(results["aggregation"]) == aggregations  # every step, or once per round
    assert all(a["method"] == "gpaggregation" for a in results["aggregation"])
    assert all(math.isfinite(m["primary"]) for m in results["final"].values())
    assert method in rep.ALL_METHODS and method not in rep.METHODS  # on request, beside today's methods
