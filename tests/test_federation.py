"""End to end in one process: a federation of phantom sites with different tasks learns,
and a run resumed from its checkpoints ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import CLS2, SEG1, SEG9, SimulatedCrash, resume_after_crash, site_cfg, tiny_server
from fedbone_med.config import ExperimentConfig
from fedbone_med.configtools import config_hash
from fedbone_med.errors import CheckpointError
from fedbone_med.experiments.federation import Federation, format_table

ROOT = Path(__file__).resolve().parents[1]


def _experiment(rounds: int, steps: int, method: str = "projection", n_train: int = 96) -> ExperimentConfig:
    # Vessels need 64 px to be more than a pixel wide; OCT layers and fluid show at 48 px.
    return ExperimentConfig(
        name="test",
        seed=7,
        rounds=rounds,
        steps_per_round=steps,
        server=tiny_server(method, lr=2e-3),
        sites=(
            site_cfg("vessels", "vessels", "fundus", SEG1, size=64, n_train=n_train, n_val=24, batch=8),
            site_cfg("layers", "oct_layers", "oct", SEG9, size=48, n_train=n_train, n_val=24, batch=8),
            site_cfg("edema", "oct_edema", "oct", CLS2, size=48, n_train=n_train, n_val=96, batch=8),
        ),
    )


@pytest.mark.slow
def test_short_federation_beats_chance_on_every_site(tmp_path):
    fed = Federation(_experiment(rounds=4, steps=40), tmp_path)
    results = fed.run(progress=False)
    final = results["final"]
    for name, info in results["sites"].items():
        m = final[name]
        assert m[info["primary_metric"]] > m["chance"] + 0.05, (name, m)
    # results.json is complete and matches what run() returned
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [r["round"] for r in on_disk["rounds"]] == [0, 1, 2, 3]
    assert len(on_disk["aggregation"]) == 160
    # metrics depend on the torch thread count: the run records it, apart from the machine's cores
    assert on_disk["machine"]["torch_threads"] == torch.get_num_threads()
    assert on_disk["machine"]["cpu_cores"] == os.cpu_count()
    step0 = on_disk["aggregation"][0]
    assert step0["method"] == "projection" and sorted(step0["site_names"]) == ["edema", "layers", "vessels"]
    assert len(step0["projection_order"]) == 3 and len(step0["site_norms"]) == 3
    # the OCT sites share a modality and average their embeddings; the fundus site is alone
    assert final["layers"]["fedavg_group"] == ["edema", "layers"] and final["vessels"]["fedavg_group"] == ["vessels"]
    sites = {s.name: s.model for s in fed.sites}
    for k, v in sites["layers"].embedding.state_dict().items():
        assert torch.equal(v, sites["edema"].embedding.state_dict()[k]), f"OCT embeddings differ at {k}"
    table = format_table(results)
    assert all(name in table for name in ("vessels", "layers", "edema"))


def test_projection_every_n_steps_in_a_federation(tmp_path):
    cfg = _experiment(rounds=2, steps=3, n_train=24)
    agg = replace(cfg.server.aggregation, project_every=2)
    cfg = replace(cfg, server=replace(cfg.server, aggregation=agg))
    results = Federation(cfg, tmp_path).run(progress=False)
    steps = results["aggregation"]
    assert [s["step"] for s in steps] == list(range(6))
    assert [s["method"] for s in steps] == ["projection", "mean"] * 3  # in phase across the round boundary
    assert all(s["projection_order"] is None for s in steps[1::2])


def _states(fed: Federation) -> dict[str, torch.Tensor]:
    out = {f"backbone.{k}": v for k, v in fed.coordinator.backbone.state_dict().items()}
    for site in fed.sites:
        out.update({f"{site.name}.{k}": v for k, v in site.model.state_dict().items()})
    return out


@pytest.mark.slow
def test_resumed_run_ends_equal_to_an_uninterrupted_run(tmp_path):
    cfg = _experiment(rounds=2, steps=3, n_train=24)
    # with train-time augmentation on two sites: its random draws must resume exactly too
    augment = str(ROOT / "pipelines" / "transforms")
    sites = (
        replace(cfg.sites[0], data=replace(cfg.sites[0].data, augment=f"{augment}/fundus_augment.toml")),
        replace(cfg.sites[1], data=replace(cfg.sites[1].data, augment=f"{augment}/oct_augment.toml")),
        cfg.sites[2],
    )
    cfg = replace(cfg, sites=sites)
    full = Federation(cfg, tmp_path / "full")
    full_results = full.run(progress=False)

    # The same run "crashes" right after round 0's checkpoint, then a new process resumes.
    resumed, resumed_results = resume_after_crash(cfg, tmp_path / "part")

    a, b = _states(full), _states(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert resumed_results["final"] == full_results["final"]
    assert resumed_results["aggregation"] == full_results["aggregation"]
    assert [r["round"] for r in resumed_results["rounds"]] == [0, 1]
    # the audit log of the interrupted run continues across the restart and verifies
    report = _verify(tmp_path / "part")
    assert report.rounds[resumed.run_id] == [0, 1] and report.ended == {resumed.run_id: 2}


def _files(directory: Path) -> dict[str, str]:
    from fedbone_med.checkpoint import file_sha256

    return {p.name: file_sha256(p) for p in sorted(directory.iterdir())}


def _assert_equal_runs(a: Federation, b: Federation) -> None:
    sa, sb = _states(a), _states(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"


def test_a_failure_at_the_round_record_keeps_nothing_of_the_round_and_resume_trains_it_again(tmp_path, monkeypatch):
    """The round boundary of `fedbone run` is all or none: the round record fails (before the commit point),
    the staged checkpoints go, the log is cut back, and --resume trains the round again to the same end."""
    from fedbone_med.server.audit_trail import ServerAuditTrail

    cfg = _experiment(rounds=2, steps=2, n_train=16)
    full = Federation(cfg, tmp_path / "full")
    full.run(progress=False)
    original = ServerAuditTrail.round_finished

    def fail_round_1(self, round, *args, **kwargs):
        if round == 1:
            raise RuntimeError("the signing service is gone")
        return original(self, round, *args, **kwargs)

    monkeypatch.setattr(ServerAuditTrail, "round_finished", fail_round_1)
    out = tmp_path / "part"
    saved: dict[str, str] = {}
    first = Federation(cfg, out)
    with pytest.raises(RuntimeError, match="signing service"):
        first.run(progress=False, on_round=lambda record: saved.update(_files(out / "checkpoints")))
    monkeypatch.setattr(ServerAuditTrail, "round_finished", original)
    assert _files(out / "checkpoints") == saved  # round 0's checkpoints, nothing staged left
    report = _verify(out)
    assert report.rounds[first.run_id] == [0] and report.unsigned_tail == 0
    assert next(r["body"] for r in report.records if r["kind"] == "round")["checkpoint_hash"] == saved["server.pt"]
    assert [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]] == [0]
    resumed = Federation(cfg, out)
    resumed.run(resume=True, progress=False)
    _assert_equal_runs(full, resumed)
    report = _verify(out)
    assert report.rounds[resumed.run_id] == [0, 1] and not report.backfilled.get(resumed.run_id)


@pytest.mark.parametrize("renamed", [0, 3])
def test_a_crash_after_the_round_record_is_completed_by_resume(tmp_path, monkeypatch, renamed):
    """A power cut after round 1's signed record, before (``renamed`` = 0) or amid (3: the site checkpoints
    in place, not results.json nor the server's checkpoint) the renames: --resume puts the staged files in place,
    back-fills the sites' own logs and ends equal to an uninterrupted run."""
    from fedbone_med.checkpoint import StagedCheckpoint

    cfg = _experiment(rounds=3, steps=2, n_train=16)
    full = Federation(cfg, tmp_path / "full")
    full.run(progress=False)
    original = StagedCheckpoint.commit
    commits: list[str] = []

    def power_cut(self):
        commits.append(self.path.name)
        if len(commits) > 5 + renamed:  # round 0: 5 files (server, three sites, results)
            raise SimulatedCrash
        return original(self)

    monkeypatch.setattr(StagedCheckpoint, "commit", power_cut)
    out = tmp_path / "part"
    first = Federation(cfg, out)
    with pytest.raises(SimulatedCrash):
        first.run(progress=False)
    monkeypatch.setattr(StagedCheckpoint, "commit", original)
    staged = sorted(p.name for p in (out / "checkpoints").glob("*.next"))
    sites = [] if renamed else ["site-edema.pt.next", "site-layers.pt.next", "site-vessels.pt.next"]
    assert staged == ["server.pt.next", *sites] and (out / "results.json.next").exists()
    assert _verify(out).rounds[first.run_id] == [0, 1]  # the commit point was passed
    resumed = Federation(cfg, out)
    results = resumed.run(resume=True, progress=False)
    assert not list((out / "checkpoints").glob("*.next"))
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    _assert_equal_runs(full, resumed)
    report = _verify(out)
    assert report.rounds[resumed.run_id] == [0, 1, 2] and report.ended == {resumed.run_id: 3}
    from fedbone_med.experiments.federation import verify_logs

    summary = verify_logs(cfg, out, out / "sites")
    assert all(v.startswith("agrees") for v in summary["sites"].values()), summary


def _verify(out):
    from fedbone_med.audit import load_public_keys, verify_log

    keys = load_public_keys([out / "keys" / "server-audit-key.pub.pem"])
    return verify_log(out / "audit" / "server.jsonl", keys)


def test_every_round_is_in_a_signed_audit_log_without_patient_data(tmp_path):
    cfg = _experiment(rounds=2, steps=3, n_train=16)
    fed = Federation(cfg, tmp_path)
    fed.run(progress=False)
    report = _verify(tmp_path)
    assert report.rounds[fed.run_id] == [0, 1] and report.unsigned_tail == 0 and report.signed_checkpoints >= 3
    rounds = [r["body"] for r in report.records if r["kind"] == "round"]
    for body in rounds:
        assert {s["site_id"]: (s["steps"], s["samples"]) for s in body["sites"]} == {
            "vessels": (3, 24), "layers": (3, 24), "edema": (3, 24)
        }
        assert body["aggregation"]["method"] == "projection" and body["aggregation"]["steps"] == 3
        assert all(isinstance(s["train_loss"], float) and s["train_loss"] > 0 for s in body["sites"])
        assert body["backbone_hash_before"] != body["backbone_hash_after"]
    assert rounds[0]["backbone_hash_after"] == rounds[1]["backbone_hash_before"]
    from fedbone_med.checkpoint import file_sha256

    assert rounds[-1]["checkpoint_hash"] == file_sha256(tmp_path / "checkpoints" / "server.pt")
    key = tmp_path / "keys" / "server-audit-key.pem"
    assert key.stat().st_mode & 0o077 == 0, "the signing key must be private to its owner"
    # each site keeps its own signed log, and it agrees with the server's on every exchange
    from fedbone_med.audit import load_public_keys
    from fedbone_med.audit.crosscheck import cross_check

    for name in ("vessels", "layers", "edema"):
        site = tmp_path / "sites" / name
        report = cross_check(tmp_path / "audit" / "server.jsonl", site / "audit" / "site.jsonl",
                             server_keys=load_public_keys([tmp_path / "keys" / "server-audit-key.pub.pem"]),
                             site_keys=load_public_keys([site / "keys" / f"site-{name}-audit-key.pub.pem"]))
        assert report.agree and [(r.round, r.tail) for r in report.rounds] == [(0, False), (1, False), (2, True)]
        assert report.rounds[1].up is not None and report.rounds[1].up["frames"] > 6
        # the exchange after the last round (the last sync and validation) is in both logs' run_end records
        tail = report.rounds[2]
        assert tail.up is not None and tail.down is not None and tail.up["frames"] > 0 and tail.down["frames"] > 0
    assert _verify(tmp_path).ended == {fed.run_id: 2}
    # tampering with a round record is found
    log = tmp_path / "audit" / "server.jsonl"
    lines = log.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"kind":"round"' in line)
    lines[i] = lines[i].replace('"samples":24', '"samples":25', 1)
    log.write_text("\n".join(lines) + "\n")
    from fedbone_med.audit import AuditError

    with pytest.raises(AuditError):
        _verify(tmp_path)


def test_resume_refuses_a_missing_checkpoint_or_another_configuration(tmp_path):
    from fedbone_med.errors import CheckpointError

    cfg = _experiment(rounds=1, steps=1, n_train=8)
    with pytest.raises(CheckpointError, match="no server checkpoint"):
        Federation(cfg, tmp_path).run(resume=True, progress=False)
    Federation(cfg, tmp_path).run(progress=False)
    other = ExperimentConfig(**{**cfg.__dict__, "seed": 8})
    with pytest.raises(CheckpointError, match="seed changed; a resumed run may change only rounds and network"):
        Federation(other, tmp_path).run(resume=True, progress=False)
    longer = ExperimentConfig(**{**cfg.__dict__, "rounds": 3})  # the run is finished: its log is closed
    with pytest.raises(CheckpointError, match="finished all its 1 rounds"):
        Federation(longer, tmp_path).run(resume=True, progress=False)


def test_an_unfinished_run_resumes_with_more_rounds_and_the_change_is_on_the_record(tmp_path):
    """The operator extends a run that crashed after round 0: the new rounds run, the log says why its
    configuration hash changed, and the closing record counts every round."""
    cfg = _experiment(rounds=2, steps=2, n_train=16)
    with pytest.raises(SimulatedCrash):
        Federation(cfg, tmp_path).run(progress=False, on_round=_crash_after_round_0)
    longer = ExperimentConfig(**{**cfg.__dict__, "rounds": 3})
    resumed = Federation(longer, tmp_path)
    results = resumed.run(resume=True, progress=False)
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    report = _verify(tmp_path)
    change = [r["body"] for r in report.records if r["kind"] == "config_change"]
    assert [(c["round"], c["changed_keys"]) for c in change] == [(1, ["rounds"])]
    assert change[0]["config_hash_before"] == config_hash(cfg) and change[0]["config_hash_after"] == config_hash(longer)
    rounds = [r["body"] for r in report.records if r["kind"] == "round"]
    assert [(r["round"], r["config_hash"]) for r in rounds] == [(0, config_hash(cfg)), (1, config_hash(longer)),
                                                                (2, config_hash(longer))]
    assert report.ended == {resumed.run_id: 3}
    # fewer rounds than are done is refused
    with pytest.raises(CheckpointError, match="already done"):
        _resume_with_rounds(cfg, tmp_path / "short", 1)


def _crash_after_round_0(record: dict) -> None:
    if record["round"] == 0:
        raise SimulatedCrash


def _resume_with_rounds(cfg, out, rounds):
    with pytest.raises(SimulatedCrash):
        Federation(cfg, out).run(progress=False, on_round=_crash_after_round_0)
    Federation(ExperimentConfig(**{**cfg.__dict__, "rounds": rounds}), out).run(resume=True, progress=False)


# -- `fedbone run`: the checkpoint directory's file system fails at a round boundary -------------------------

_CLI_EXPERIMENT = """
name = "disk"
seed = 3
rounds = 3
steps_per_round = 2
[server.backbone]
name = "swin-tiny"
embed_dim = 16
depths = [1, 1, 1, 1]
num_heads = [1, 2, 2, 4]
[[sites]]
config = "{root}/sites/phantom-vessels.toml"
[sites.data]
image_size = 32
n_train = 8
n_val = 4
[[sites]]
config = "{root}/sites/phantom-oct-edema.toml"
[sites.data]
image_size = 32
n_train = 8
n_val = 8
"""


def _mount(*args: str) -> bool:
    import subprocess

    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def run_checkpoint_fs(tmp_path: Path):
    """A tmpfs mounted over ``tmp_path/part/checkpoints`` (skips without mount rights)."""
    import subprocess

    target = tmp_path / "part" / "checkpoints"
    target.mkdir(parents=True)
    if not _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(target)):
        pytest.skip("needs mount rights (root) to fill or remount the checkpoint file system; not tested here")
    yield target
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.mark.parametrize("fault", ["ENOSPC", "EROFS"])
def test_fedbone_run_stops_with_code_7_when_its_disk_fails_and_resume_ends_equal(tmp_path, monkeypatch, capsys,
                                                                                   run_checkpoint_fs, fault):
    """The file system under `fedbone run`'s checkpoints fills up (or turns read-only) during round 1: the
    run exits 7 naming the checkpoint, round 0's checkpoints and the log stay as they were, and
    `fedbone run --resume` after the fix ends bit-identical to an uninterrupted run."""
    from fedbone_med.audit import load_public_keys, verify_log
    from fedbone_med.cli import fedbone

    exp = tmp_path / "exp.toml"
    exp.write_text(_CLI_EXPERIMENT.format(root=ROOT))
    assert fedbone.main(["run", str(exp), "--out", str(tmp_path / "full"), "--quiet"]) == 0
    out, ckpts = tmp_path / "part", run_checkpoint_fs
    saved: dict[str, str] = {}
    original = Federation._train_step

    def fault_in_round_1(self, rnd, step, i):
        if rnd == 1 and i == 0 and not saved:
            saved.update(_files(ckpts))
            if fault == "EROFS":
                assert _mount("-o", "remount,ro", str(ckpts))
            else:  # room for what is there and half a server checkpoint more: its next copy does not fit
                used = sum(-(-(ckpts / n).stat().st_size // 4096) * 4096 for n in saved)
                half = (ckpts / "server.pt").stat().st_size // 2 // 4096 * 4096
                assert _mount("-o", f"remount,size={used + half}", str(ckpts))
        return original(self, rnd, step, i)

    monkeypatch.setattr(Federation, "_train_step", fault_in_round_1)
    capsys.readouterr()
    assert fedbone.main(["run", str(exp), "--out", str(out), "--quiet"]) == 7
    err = capsys.readouterr().err
    assert "round 1 could not be recorded" in err and str(ckpts / "server.pt") in err and fault in err, err
    assert "--resume" in err and "Traceback" not in err
    assert _files(ckpts) == saved  # round 0's checkpoints, nothing staged left
    keys = load_public_keys([out / "keys" / "server-audit-key.pub.pem"])
    report = verify_log(out / "audit" / "server.jsonl", keys)
    rounds = [e["body"] for e in report.records if e["kind"] == "round"]
    assert [r["round"] for r in rounds] == [0] and rounds[0]["checkpoint_hash"] == saved["server.pt"]
    assert report.unsigned_tail == 0
    assert [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]] == [0]
    monkeypatch.setattr(Federation, "_train_step", original)
    assert _mount("-o", "remount,rw,size=64m", str(ckpts))  # the operator fixes the cause
    assert fedbone.main(["run", str(exp), "--out", str(out), "--quiet", "--resume"]) == 0
    for name, part in (("server.pt", "backbone"), ("site-fundus-vessels.pt", "model"), ("site-oct-edema.pt", "model")):
        a = torch.load(tmp_path / "full" / "checkpoints" / name, weights_only=True)[part]
        b = torch.load(ckpts / name, weights_only=True)[part]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}: {part} differs"
    report = verify_log(out / "audit" / "server.jsonl", keys, require_ended=True)
    assert report.rounds[report.runs[0]] == [0, 1, 2]
