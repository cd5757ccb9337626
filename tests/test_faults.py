"""Fault injection with real processes: every case must end with nothing lost.

A server and three sites run as separate processes on loopback (mutual TLS, sealed frames). Each
case injects one fault -- the server killed with SIGKILL at three points of a round, a site
interrupted with SIGINT (Ctrl-C) at three points and resumed with ``--resume``, a full disk and a
read-only file system under the server's checkpoint directory, a site resumed with a checkpoint
ahead of the server -- and ends as an operator and an auditor would:

- the run completes (every process exits 0 after the documented recovery);
- the server's final backbone equals, within 1e-6, the backbone of the same experiment trained in
  one process with each site taking part in exactly the steps the server's results record
  (``replay_backbone`` in ``tests/fedprocs.py``; for the server-side faults, where every site
  takes part in every step, that is the uninterrupted run);
- ``fedbone-audit verify --require-ended`` passes on the server's log and on every site's, and
  ``cross-check`` of every site's log against the server's finds no round missing on either side:
  rounds agree, or (only where the fault struck) differ in the frames that were in flight, or are
  reported as an attempt interrupted by a server restart.

The disk faults need a file system the test can fill or make read-only: a tmpfs mounted over the
checkpoint directory (root, as CI runs). Without mount rights the full disk is a file-size limit
(``prlimit``, EFBIG) and the read-only case is skipped, saying so.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedbone_med.checkpoint import file_sha256
from fedprocs import SITES, Fed, backbone, experiment, max_diff, replay_backbone

pytestmark = pytest.mark.slow

ROUNDS, STEPS = 3, 3


@pytest.fixture
def fed(tmp_path: Path):
    f = Fed(tmp_path, experiment(tmp_path, rounds=ROUNDS, steps=STEPS))
    yield f
    f.close()


def _start_all(fed: Fed) -> None:
    fed.start_server()
    for name in SITES:
        fed.start_site(name)


def _log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _server_log(fed: Fed) -> Path:
    return fed.server_dir / "audit" / "server.jsonl"


def _round_recorded(fed: Fed, rnd: int) -> bool:
    """The server's signed log holds round ``rnd``'s record and the signed checkpoint after it."""
    lines = _log_lines(_server_log(fed))
    for i, e in enumerate(lines):
        if e["kind"] == "round" and e["body"]["round"] == rnd:
            return any(x["kind"] == "log_checkpoint" for x in lines[i + 1:])
    return False


def _site_checkpoint(fed: Fed, name: str) -> tuple[int, bool] | None:
    p = fed.site_dir(name) / "checkpoints" / "site.pt"
    try:
        state = torch.load(p, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError):
        return None
    return int(state["completed_round"]), bool(state["evaluated"])


def _finish(fed: Fed, faulted: set[int]) -> dict:
    """Every process exits 0; the backbone equals the replay; every log verifies and cross-checks."""
    for name in ("server", *SITES):
        assert fed.wait(name) == 0, f"{name} did not exit 0:\n{fed.logs()}"
    results = fed.server_results()
    assert [r["round"] for r in results["rounds"]] == list(range(ROUNDS))
    assert sorted(a["step"] for a in results["aggregation"]) == list(range(ROUNDS * STEPS))  # no step lost
    diff = max_diff(backbone(fed.server_dir / "checkpoints" / "server.pt"), replay_backbone(fed.cfg, results))
    assert diff <= 1e-6, f"backbone differs from the replay by {diff}"
    for name, report in fed.audit_everything().items():
        for check in report.rounds:
            if check.status in ("agree", "interrupted"):
                continue
            assert check.round in faulted and check.status == "differ", (name, check.line())
            # only what was in flight when the fault struck: frame counts, bytes and digests
            assert all(d.field.startswith(("ledger.", "tail.ledger.")) for d in check.differences), check.line()
    return results


# -- the server killed (SIGKILL) at three points of a round ----------------------------------------------


@pytest.mark.parametrize("point", ["mid-steps", "at-the-round-boundary", "after-the-round-record"])
def test_server_killed_at_three_points_of_a_round_resumes_to_the_same_backbone(fed: Fed, point: str) -> None:
    _start_all(fed)
    if point == "mid-steps":  # the second step of round 1 aggregated, the third not yet
        fed.until("step 5", lambda: fed.server_step() >= STEPS + 2)
    elif point == "at-the-round-boundary":  # round 1's results written: its checkpoint and record being written
        fed.wait_rounds(2)
    else:  # round 1 recorded and signed: the sites validate it and start round 2
        fed.until("round 1's record", lambda: _round_recorded(fed, 1))
    fed.procs["server"].send_signal(signal.SIGKILL)
    fed.procs["server"].wait()
    fed.start_server(resume=True)
    _finish(fed, faulted={1, 2})
    log = _log_lines(_server_log(fed))
    assert sum(e["kind"] == "run_end" for e in log) == 1


def test_server_killed_mid_round_in_the_round_cadence_resumes_to_the_uninterrupted_backbone(tmp_path: Path) -> None:
    """The paper's Figure-2 cadence: the sites' replicas and their optimizer states come back from the
    checkpoint, the interrupted round is trained again, and the run ends as one that was never stopped."""
    from fedbone_med.experiments.federation import Federation

    fed = Fed(tmp_path, experiment(tmp_path, rounds=ROUNDS, steps=STEPS, aggregation='cadence = "round"'))
    try:
        _start_all(fed)
        fed.until("round 0's record", lambda: _round_recorded(fed, 0))
        fed.procs["server"].send_signal(signal.SIGKILL)
        fed.procs["server"].wait()
        fed.start_server(resume=True)
        for name in ("server", *SITES):
            assert fed.wait(name) == 0, f"{name} did not exit 0:\n{fed.logs()}"
        assert [a["round"] for a in fed.server_results()["aggregation"]] == list(range(ROUNDS))
        torch.set_num_threads(1)
        Federation(fed.cfg, tmp_path / "inproc", audit=False).run(progress=False)
        diff = max_diff(backbone(fed.server_dir / "checkpoints" / "server.pt"),
                        backbone(tmp_path / "inproc" / "checkpoints" / "server.pt"))
        assert diff <= 1e-6, diff
        for name, report in fed.audit_everything().items():
            assert all(c.status in ("agree", "interrupted") or (c.status == "differ" and c.round in (1, 2) and all(
                d.field.startswith(("ledger.", "tail.ledger.")) for d in c.differences)) for c in report.rounds), name
    finally:
        fed.close()


# -- a site interrupted (SIGINT, Ctrl-C) at three points, then `fedbone-site train --resume` ------------------


@pytest.mark.parametrize("point", ["round-0-steps", "round-0-validation", "round-1-steps"])
def test_a_site_interrupted_at_three_points_resumes_and_nothing_is_lost(fed: Fed, point: str) -> None:
    name, slow = "fundus-vessels", "oct-edema"
    _start_all(fed)
    # Steps of this tiny model take milliseconds: to interrupt the site during a round's steps, another
    # site is paused (SIGSTOP) first, so the step barrier holds the federation inside the round.
    if point == "round-0-steps":  # before it has any checkpoint: the resume starts afresh
        fed.until("training to start", lambda: "training" in (fed.tmp / "server.log").read_text())
        fed.procs[slow].send_signal(signal.SIGSTOP)
        time.sleep(1.0)
    elif point == "round-1-steps":
        fed.until("round 0's record", lambda: _round_recorded(fed, 0))
        fed.procs[slow].send_signal(signal.SIGSTOP)
        time.sleep(1.0)
    else:  # round 0 trained and synced (checkpointed, not yet evaluated): during its validation
        fed.until("its round-0 checkpoint", lambda: _site_checkpoint(fed, name) is not None, poll=0.005)
    fed.procs[name].send_signal(signal.SIGINT)
    # The other sites pause (SIGSTOP) until the interrupted one is back: rounds of this tiny model take
    # less than a second, and the run must still be going when it rejoins (as it would with real data).
    others = [n for n in SITES if n != name]
    for n in others:
        fed.procs[n].send_signal(signal.SIGSTOP)
    assert fed.wait(name, timeout=60) == 130, fed.logs()
    site_log = fed.site_dir(name) / "audit" / "site.jsonl"
    launches = sum(e["kind"] == "site_run_start" for e in _log_lines(site_log))
    t0 = time.monotonic()
    fed.start_site(name, resume=True)
    fed.until("the resumed site's join", lambda: fed.procs[name].poll() is not None or sum(
        e["kind"] == "site_run_start" for e in _log_lines(site_log)) > launches)
    for n in others:
        fed.procs[n].send_signal(signal.SIGCONT)
    results = _finish(fed, faulted={0, 1, 2})
    log = (fed.tmp / f"site-{name}.log").read_text()
    assert "older than the log" not in log
    # nobody waited for a deadline: the leave was clean and the resumed site was admitted at a round start
    assert not [e for e in results["events"] if e["event"] in ("dropout", "step_skipped")], results["events"]
    assert time.monotonic() - t0 < 120
    # it took part again: the last round has all three sites
    assert sorted(results["rounds"][-1]["sites"]) == sorted(SITES)


# -- the server's disk fails at a round boundary ----------------------------------------------------------


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def checkpoint_fs(fed: Fed):
    """A tmpfs mounted over the server's checkpoint directory (None without mount rights)."""
    target = fed.server_dir / "checkpoints"
    target.mkdir(parents=True)
    mounted = _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(target))
    yield target if mounted else None
    if mounted:
        fed.close()
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _expect_refused_round(fed: Fed, what: str) -> str:
    """The server exits with code 7 within seconds, naming the failed write; nothing of round 1 is kept."""
    assert fed.wait("server", timeout=60) == 7, fed.logs()
    out = (fed.tmp / "server.log").read_text()
    assert "round 1 could not be recorded" in out and what in out and "serve --resume" in out, out[-2000:]
    assert "Traceback" not in out
    # the previous checkpoint is intact, and it is the one the signed log records for round 0
    log = _log_lines(_server_log(fed))
    rounds = [e["body"] for e in log if e["kind"] == "round"]
    assert [r["round"] for r in rounds] == [0]
    ckpt = fed.server_dir / "checkpoints" / "server.pt"
    assert file_sha256(ckpt) == rounds[0]["checkpoint_hash"]
    assert torch.load(ckpt, weights_only=True)["round"] == 1
    assert not [p.name for p in ckpt.parent.iterdir() if p.name != "server.pt"]  # no temporary file left
    from fedbone_med.cli import audit

    assert audit.main(["verify", str(_server_log(fed)), "--public-key",
                       str(fed.server_dir / "keys" / "server-audit-key.pub.pem")]) == 0
    assert [r["round"] for r in fed.server_results()["rounds"]] == [0]
    # the sites were told to retry and are waiting for the server, not finished
    assert all(fed.procs[n].poll() is None for n in SITES), fed.logs()
    return out


def test_a_full_disk_at_a_round_boundary_stops_the_server_and_resume_ends_equal(fed: Fed, checkpoint_fs) -> None:
    _start_all(fed)
    ckpt = fed.server_dir / "checkpoints" / "server.pt"
    fed.until("round 0's checkpoint", lambda: _round_recorded(fed, 0))
    size = ckpt.stat().st_size
    limit = (size * 3 // 2 // 4096 + 1) * 4096  # room for one checkpoint, not for the next beside it
    if checkpoint_fs is not None:
        assert _mount("-o", f"remount,size={limit}", str(checkpoint_fs))
        reason = "ENOSPC"
    else:  # no mount rights: a file-size limit on the server process is the writer fault
        resource.prlimit(fed.procs["server"].pid, resource.RLIMIT_FSIZE, (limit, limit))
        reason = "EFBIG"
    _expect_refused_round(fed, reason)
    if checkpoint_fs is not None:  # space is freed
        assert _mount("-o", "remount,size=64m", str(checkpoint_fs))
    fed.start_server(resume=True)
    _finish(fed, faulted={1, 2})


def test_a_read_only_checkpoint_directory_stops_the_server_and_resume_ends_equal(fed: Fed, checkpoint_fs) -> None:
    if checkpoint_fs is None:
        pytest.skip("needs mount rights (root) to make the checkpoint file system read-only; not tested here")
    _start_all(fed)
    fed.until("round 0's checkpoint", lambda: _round_recorded(fed, 0))
    assert _mount("-o", "remount,ro", str(checkpoint_fs))
    _expect_refused_round(fed, "EROFS")
    assert _mount("-o", "remount,rw", str(checkpoint_fs))
    fed.start_server(resume=True)
    _finish(fed, faulted={1, 2})


def test_a_server_that_cannot_write_its_checkpoints_refuses_to_start(fed: Fed, checkpoint_fs) -> None:
    if checkpoint_fs is None:
        pytest.skip("needs mount rights (root) to make the checkpoint file system read-only; not tested here")
    assert _mount("-o", "remount,ro", str(checkpoint_fs))
    fed.start_server(wait=False)
    assert fed.wait("server", timeout=60) == 7
    out = (fed.tmp / "server.log").read_text()
    assert "is not writable" in out and "EROFS" in out and "Traceback" not in out


# -- a site resumed with a checkpoint ahead of the server ---------------------------------------------------


def test_a_site_ahead_of_the_server_is_refused_at_join_and_nothing_is_written(fed: Fed, tmp_path: Path) -> None:
    _start_all(fed)
    fed.until("round 0's record", lambda: _round_recorded(fed, 0))
    older = tmp_path / "server-backup"  # the operator's backup of the server at the end of round 0
    shutil.copytree(fed.server_dir, older, ignore=shutil.ignore_patterns("*.tmp"))
    name = "oct-edema"
    fed.until("the sites' round-1 checkpoints",
              lambda: all((_site_checkpoint(fed, n) or (-1, False)) >= (1, True) for n in SITES))
    fed.close()  # a power cut: every process gone
    latest = tmp_path / "server-latest"
    shutil.move(fed.server_dir, latest)
    shutil.copytree(older, fed.server_dir)  # the operator restores the older backup of the server only
    site_log = fed.site_dir(name) / "audit" / "site.jsonl"
    before = site_log.read_bytes()
    fed.start_server(resume=True)
    t0 = time.monotonic()
    fed.start_site(name, resume=True)
    assert fed.wait(name, timeout=60) == 6, fed.logs()
    assert time.monotonic() - t0 < 60  # refused at join, not after a deadline
    out = (fed.tmp / f"site-{name}.log").read_text()
    assert re.search(r"has completed round [12], but the server is at round 1", out), out[-2000:]
    assert site_log.read_bytes() == before  # nothing trained, nothing logged
    # the server gave its place back at once (a leave, not a dropout at a deadline) and trained nothing
    events = fed.server_results()["events"] if (fed.server_dir / "server-results.json").exists() else []
    assert not [e for e in events if e["event"] == "dropout"]
    assert fed.procs["server"].poll() is None and _round_recorded(fed, 1) is False
    fed.close()
    # the right recovery: the latest server state back in place, every site resumed
    shutil.rmtree(fed.server_dir)
    shutil.move(latest, fed.server_dir)
    fed.start_server(resume=True)
    for n in SITES:
        fed.start_site(n, resume=True)
    _finish(fed, faulted={1, 2})
