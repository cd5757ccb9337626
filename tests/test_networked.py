"""The networked federation with real processes: a server and three sites on loopback, mutual TLS,
the sealed envelope, real certificates from `fedbone-server provision`.

Each test starts separate Python processes (``python -m fedbone_med.cli.server serve`` and
``python -m fedbone_med.cli.site train``), each with one torch thread.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from fedbone_med.config import load_experiment
from fedbone_med.experiments.federation import Federation
from fedbone_med.experiments.networked import NetworkedRunError, run_networked
from fedprocs import ROOT, SITES, Fed, backbone, experiment, max_diff


def _in_process(exp: Path, out: Path) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)  # the site and server processes use one thread each
    Federation(load_experiment(exp), out, audit=False).run(progress=False)
    return backbone(out / "checkpoints" / "server.pt")


def test_three_site_processes_train_the_same_backbone_as_the_in_process_federation(tmp_path: Path) -> None:
    exp = experiment(tmp_path, private=True)  # one site with activation and label DP on
    cfg = load_experiment(exp)
    names = ("fundus-dr", "fundus-vessels", "oct-edema-private")
    results = run_networked(cfg, tmp_path / "net", quiet=True, timeout=600)
    assert results["transport"] == "grpc" and set(results["final"]) == set(names)
    assert results["machine"]["torch_threads"] == results["machine"]["server_torch_threads"] == 1  # per process
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    # the run ends as an auditor would: server log verified, every site's own log cross-checked against it
    assert "2 round(s)" in results["audit"]["server"]
    assert "(1 closed by run_end)" in results["audit"]["server"]
    assert all(v == "agrees with the server on 2 round(s) and the exchange after the last round"
               for v in results["audit"]["sites"].values())
    assert len(results["aggregation"]) == 4 and all(a["num_sites"] == 3 for a in results["aggregation"])
    net = backbone(tmp_path / "net" / "server" / "checkpoints" / "server.pt")
    ref = _in_process(exp, tmp_path / "inproc")
    assert max_diff(net, ref) <= 1e-6
    # The same site metrics too: every site trained exactly as in one process.
    inproc = json.loads((tmp_path / "inproc" / "results.json").read_text())
    for name in names:
        assert results["final"][name]["primary"] == pytest.approx(inproc["final"][name]["primary"], abs=1e-6)
    # The private site's epsilon reached the server each round (for its audit log), as in one process.
    server = json.loads((tmp_path / "net" / "server" / "server-results.json").read_text())
    eps = [r["sites"]["oct-edema-private"]["epsilon"] for r in server["rounds"]]
    assert 0 < eps[0] < eps[1] and eps[1] == pytest.approx(inproc["final"]["oct-edema-private"]["epsilon"])
    assert "epsilon" not in server["rounds"][0]["sites"]["fundus-dr"]
    # Every party left a signed trail, and each site's log agrees with the server's on every frame exchanged.
    from fedbone_med.cli import audit

    net = tmp_path / "net"
    server_log = net / "server" / "audit" / "server.jsonl"
    server_key = net / "server" / "keys" / "server-audit-key.pub.pem"
    assert audit.main(["verify", str(server_log), "--public-key", str(server_key), "--require-ended"]) == 0
    for name in names:
        site = net / "sites" / name
        assert audit.main(["cross-check", str(server_log), str(site / "audit" / "site.jsonl"),
                           "--server-key", str(server_key),
                           "--site-key", str(site / "keys" / f"site-{name}-audit-key.pub.pem")]) == 0
    # A second run into the same directory is refused rather than mixing two runs.
    with pytest.raises(NetworkedRunError, match="--resume"):
        run_networked(cfg, tmp_path / "net", quiet=True)


# -- failures: processes started by hand, as an operator would -------------------------------------------


@pytest.fixture
def fed_factory(tmp_path: Path):
    made: list[Fed] = []

    def make(**kw) -> Fed:
        f = Fed(tmp_path, experiment(tmp_path, **kw))
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def test_a_site_killed_mid_round_is_dropped_at_the_deadline_and_the_others_carry_on(fed_factory) -> None:
    fed = fed_factory(rounds=3, steps=3, network="min_sites = 2\nstep_deadline_s = 2.0\nround_deadline_s = 5.0")
    fed.start_server()
    for name in SITES:
        fed.start_site(name)
    fed.wait_rounds(1)
    fed.procs["oct-edema"].send_signal(signal.SIGKILL)  # mid-round 1 (or in its validation of round 0)
    for name in ("server", "fundus-dr", "fundus-vessels"):
        assert fed.wait(name) == 0, fed.logs()
    rounds = fed.server_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert sorted(rounds[0]["sites"]) == sorted(SITES)
    assert all(sorted(r["sites"]) == ["fundus-dr", "fundus-vessels"] for r in rounds[1:])
    server = json.loads((fed.tmp / "server" / "server-results.json").read_text())
    drops = [e for e in server["events"] if e["event"] == "dropout"]
    assert [d["site"] for d in drops] == ["oct-edema"] and "deadline" in drops[0]["reason"]
    # Every step of the schedule was taken, by the two remaining sites after the drop.
    assert len(server["aggregation"]) == 9 and server["aggregation"][-1]["num_sites"] == 2


def test_a_restarted_site_rejoins_at_the_next_round(fed_factory) -> None:
    # A long deadline: the restarted site's join, not the deadline, is what releases the others.
    fed = fed_factory(rounds=4, steps=3, network="min_sites = 2\nstep_deadline_s = 120.0")
    fed.start_server()
    for name in SITES:
        fed.start_site(name)
    fed.wait_rounds(1)
    t0 = time.monotonic()
    fed.procs["oct-edema"].send_signal(signal.SIGKILL)
    fed.procs["oct-edema"].wait()
    fed.start_site("oct-edema", resume=True)  # the administrator restarts it
    for name in ("server", *SITES):
        assert fed.wait(name) == 0, fed.logs()
    assert time.monotonic() - t0 < 120.0
    rounds = fed.server_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert sorted(rounds[-1]["sites"]) == sorted(SITES)  # back for the last round
    missed = [r["round"] for r in rounds if "oct-edema" not in r["sites"]]
    assert len(missed) == 1  # the round it was killed in (or whose validation it lost)
    site = json.loads((fed.tmp / "sites" / "oct-edema" / "site-results.json").read_text())
    assert site["rounds"][-1]["round"] == 3


def test_a_restarted_server_resumes_and_ends_equal_to_an_uninterrupted_run(fed_factory, tmp_path: Path) -> None:
    fed = fed_factory(rounds=3, steps=2)
    fed.start_server()
    for name in SITES:
        fed.start_site(name)
    fed.wait_rounds(1)
    fed.procs["server"].send_signal(signal.SIGKILL)  # somewhere in round 1
    fed.procs["server"].wait()
    # The operator restarts it with one more round and a longer step deadline (allowed, and recorded);
    # the sites learn the new schedule when they join again.
    from fedbone_med.configtools import read_toml, to_toml

    server_cfg = read_toml(fed.server_toml)
    server_cfg["rounds"] = 4
    server_cfg.setdefault("network", {})["step_deadline_s"] = 555.0
    fed.server_toml.write_text(to_toml(server_cfg))
    time.sleep(1.0)  # the sites notice and retry with backoff
    fed.start_server(resume=True)
    for name in ("server", *SITES):
        assert fed.wait(name) == 0, fed.logs()
    assert [r["round"] for r in fed.server_rounds()] == [0, 1, 2, 3]
    from fedbone_med.audit import load_public_keys, verify_log

    log = verify_log(fed.tmp / "server" / "audit" / "server.jsonl",
                     load_public_keys([fed.tmp / "server" / "keys" / "server-audit-key.pub.pem"]), require_ended=True)
    changes = [e["body"] for e in log.records if e["kind"] == "config_change"]
    assert [(c["round"], c["changed_keys"]) for c in changes] == [(1, ["network.step_deadline_s", "rounds"])]
    assert log.ended == {log.runs[0]: 4}
    exp = tmp_path / "exp.toml"  # the same federation run uninterrupted for 4 rounds
    exp.write_text(exp.read_text().replace("rounds = 3\n", "rounds = 4\n"))
    reconnects = [json.loads((fed.tmp / "sites" / n / "site-results.json").read_text())["reconnects"] for n in SITES]
    assert all(r >= 1 for r in reconnects)
    ref = _in_process(tmp_path / "exp.toml", tmp_path / "inproc")
    assert max_diff(backbone(fed.tmp / "server" / "checkpoints" / "server.pt"), ref) <= 1e-6


def test_ctrl_c_at_a_site_leaves_cleanly_and_the_server_carries_on(fed_factory) -> None:
    fed = fed_factory(rounds=3, steps=3, network="min_sites = 2\nstep_deadline_s = 60.0")
    fed.start_server()
    for name in SITES:
        fed.start_site(name)
    fed.wait_rounds(1)
    ckpt = fed.tmp / "sites" / "fundus-dr" / "checkpoints" / "site.pt"
    deadline = time.monotonic() + 120
    while not ckpt.is_file():  # round 0 is complete at the site too
        assert time.monotonic() < deadline, fed.logs()
        time.sleep(0.05)
    t0 = time.monotonic()
    fed.procs["fundus-dr"].send_signal(signal.SIGINT)
    assert fed.wait("fundus-dr") == 130, fed.logs()
    for name in ("server", "fundus-vessels", "oct-edema"):
        assert fed.wait(name) == 0, fed.logs()
    assert time.monotonic() - t0 < 60.0  # a clean leave: nobody waited for a deadline
    server = json.loads((fed.tmp / "server" / "server-results.json").read_text())
    leaves = [e for e in server["events"] if e["event"] == "leave" and e["site"] == "fundus-dr"]
    assert leaves and not any(e["event"] == "dropout" for e in server["events"])
    assert "fundus-dr" not in server["rounds"][-1]["sites"]
    assert "interrupted" in (fed.tmp / "site-fundus-dr.log").read_text()
    # Its own audit log says it left, and holds the round it left in: the server's log lists the site in
    # that round too (the frames it exchanged), so the two logs can be compared on every round.
    site_log = fed.tmp / "sites" / "fundus-dr" / "audit" / "site.jsonl"
    assert '"kind":"leave"' in site_log.read_text()
    from fedbone_med.audit.crosscheck import cross_check

    report = cross_check(fed.tmp / "server" / "audit" / "server.jsonl", site_log)
    assert [c.round for c in report.rounds if not c.tail] == [0, 1]
    assert report.rounds[0].status == "agree"
    # round 1 was cut by the interrupt: it agrees, or differs only in what was in flight (never "missing")
    assert all(d.field.startswith("ledger.") for d in report.rounds[1].differences), report.rounds[1].line()


def test_a_site_that_fails_to_start_stops_the_run_at_once_with_its_error(tmp_path: Path, monkeypatch) -> None:
    exp = experiment(tmp_path)
    cfg = load_experiment(exp)
    monkeypatch.setenv("FEDBONE_DATA_ROOT", str(tmp_path / "nowhere"))
    from dataclasses import replace

    bad = replace(cfg.sites[1], data=replace(cfg.sites[1].data, source="manifest",
                                             manifest=str(ROOT / "pipelines" / "datasets" / "chase_db1.toml")))
    cfg = replace(cfg, sites=(cfg.sites[0], bad, cfg.sites[2]))
    t0 = time.monotonic()
    with pytest.raises(NetworkedRunError) as err:
        run_networked(cfg, tmp_path / "net", quiet=True, timeout=300)
    assert time.monotonic() - t0 < 120  # not the server's join timeout
    assert "fundus-vessels exited with code 3" in str(err.value) and "folder not found" in str(err.value)


def test_a_site_that_spends_its_budget_mid_round_leaves_a_log_that_agrees_with_the_server(tmp_path: Path) -> None:
    """The partial round it left in is in its own log and the server's, with the epsilon it reported on leaving."""
    private = tmp_path / "private.toml"
    text = (ROOT / "sites" / "phantom-oct-edema-private.toml").read_text()
    private.write_text(text[:text.index("[privacy]")] + "[privacy]\nenabled = true\nnoise_multiplier = 1.5\n"
                       "epsilon_budget = 1.8\nlabel_dp = false\nactivation_clip = 1.0\nsecure_mode = false\n")
    exp = experiment(tmp_path, rounds=2, steps=4)
    exp.write_text(exp.read_text().replace(str(ROOT / "sites" / "phantom-oct-edema.toml"), str(private)))
    results = run_networked(load_experiment(exp), tmp_path / "net", quiet=True, timeout=600)
    site = json.loads((tmp_path / "net" / "sites" / "oct-edema-private" / "site-results.json").read_text())
    stopped = site["stopped"]
    assert stopped is not None and "budget" in stopped["reason"].lower()
    # every site's own log agrees with the server's, the leaver's partial round included
    assert results["audit"]["sites"]["oct-edema-private"].startswith("agrees with the server"), results["audit"]
    from fedbone_med.audit import load_public_keys, verify_log

    net = tmp_path / "net"
    server = verify_log(net / "server" / "audit" / "server.jsonl",
                        load_public_keys([net / "server" / "keys" / "server-audit-key.pub.pem"]))
    entry = next(s for e in server.records if e["kind"] == "round" and e["body"]["round"] == stopped["round"]
                 for s in e["body"]["sites"] if s["site_id"] == "oct-edema-private")
    own = verify_log(net / "sites" / "oct-edema-private" / "audit" / "site.jsonl",
                     load_public_keys([net / "sites" / "oct-edema-private" / "keys"
                                       / "site-oct-edema-private-audit-key.pub.pem"]))
    partial = next(e["body"] for e in own.records
                   if e["kind"] == "site_round" and e["body"]["round"] == stopped["round"])
    assert stopped["round"] == 1 and 0 < partial["steps"] == entry["steps"] == stopped["step"] % 4 < 4
    assert entry["epsilon"] is not None and entry["epsilon"] == partial["epsilon"] <= 1.8
    assert [e["kind"] for e in own.records if e["kind"] in ("leave", "site_run_end")] == ["leave"]
