"""Resuming a server and its audit log (issue 14: D7, D13, D8).

- D7: a server checkpoint that differs from the one the signed log recorded is refused by
  ``serve --resume`` (CheckpointError naming both hashes and the path), and ``fedbone-audit verify``
  checks that every round, resume and run_end continues from the backbone (and checkpoint) the log
  recorded last; the crash window (checkpoint one round ahead of the log) still resumes.
- D13: ``serve --resume`` verifies the whole log with the server's public keys before extending it: a
  log re-chained after its signed checkpoints were deleted is refused, naming the failed check.
- D8: a resume writes ``round_interrupted``; a site that abandons booked frames to join again writes
  ``site_round_interrupted``; cross-check lists each restart with the frames only the site booked.

The resume cases run a real :class:`NetworkedServer` (real kit, checkpoint, keys and log) whose
sites never come: a resume that is not refused ends at the join timeout (ProtocolError).
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbone_med.audit import load_public_keys, verify_log
from fedbone_med.audit import records as R
from fedbone_med.audit.canonical import canonical_json, sha256_hex
from fedbone_med.audit.crosscheck import cross_check
from fedbone_med.audit.errors import AuditError
from fedbone_med.audit.keys import key_from_seed, key_id, load_private_key, save_private_key, save_public_key
from fedbone_med.audit.ledger import FrameLedger, LedgerBook
from fedbone_med.audit.log import ZERO_HASH
from fedbone_med.audit.samples import fixed_clock
from fedbone_med.audit.site_trail import SiteAuditTrail
from fedbone_med.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from fedbone_med.cli import audit as audit_cli
from fedbone_med.config import ServeConfig, load_experiment
from fedbone_med.errors import CheckpointError, ProtocolError
from fedbone_med.server.audit_trail import ServerAuditTrail, ensure_server_key, module_hash
from fedbone_med.server.networked import NetworkedServer
from fedprocs import SITES, Fed, experiment

RUN = "run-resume"
H = "ab" * 32
SERVER_KEY = key_from_seed(bytes(range(32)))
SITE_KEY = key_from_seed(bytes(range(1, 33)))
SITE = "site-a"


def _keys(*keys: Any) -> dict[str, Any]:
    return {key_id(k.public_key()): k.public_key() for k in keys}


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _rechain(path: Path, keep: Any) -> None:
    """Rewrite the log keeping the envelopes ``keep(env, index)`` accepts, with seq and prev recomputed:
    what an attacker without the signing key can do (the signed checkpoints cannot be rebuilt)."""
    envs = [json.loads(line) for line in _lines(path)]
    envs = [e for i, e in enumerate(envs) if keep(e, i)]
    out, prev = [], ZERO_HASH
    for seq, env in enumerate(envs):
        env = {**env, "seq": seq, "prev": prev}
        line = canonical_json(env)
        out.append(line)
        prev = sha256_hex(line)
    path.write_bytes(b"".join(line + b"\n" for line in out))


# ---- a stopped networked run: checkpoint and signed log as `serve` writes them ------------------------------


@dataclass
class _Stopped:
    tmp: Path
    cfg: ServeConfig
    out: Path
    backbones: list[str]  # module_hash of the backbone at each round boundary: [start, after round 0, ...]
    digests: list[str]  # the checkpoint SHA-256 recorded for each round

    @property
    def log(self) -> Path:
        return self.out / "audit" / "server.jsonl"

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoints" / "server.pt"

    @property
    def public_key(self) -> Path:
        return self.out / "keys" / "server-audit-key.pub.pem"

    def server(self) -> NetworkedServer:
        return NetworkedServer(self.cfg, self.tmp / "provision", self.out, address="127.0.0.1:0", resume=True,
                               progress="none", log=lambda msg: None)

    def resume(self) -> NetworkedServer:
        """``serve --resume``; no site comes, so a resume that is not refused stops at the join timeout."""
        srv = self.server()
        with pytest.raises(ProtocolError, match="site"):
            srv.run()
        return srv


def _stopped_run(tmp: Path, completed: int, *, recorded: int | None = None, rounds: int = 3) -> _Stopped:
    """A networked server that completed ``completed`` rounds (checkpointed) and was stopped mid-round.

    ``recorded``: how many of them reached the audit log (default all; one fewer = the crash window
    between the checkpoint write and the round record). The records are written as
    ``NetworkedServer._round_finished`` writes them, with the server's own key and trail.
    """
    from fedbone_med.crypto.provision import provision

    recorded = completed if recorded is None else recorded
    exp_cfg = load_experiment(experiment(tmp, rounds=rounds, network="join_timeout_s = 0.5"))
    provision(tmp / "provision", list(SITES), server_address="127.0.0.1:50051")
    cfg = ServeConfig.of(exp_cfg)
    out = tmp / "server"
    srv = NetworkedServer(cfg, tmp / "provision", out, progress="none", log=lambda msg: None)
    c, method = srv.coordinator, cfg.server.aggregation.method
    trail = ServerAuditTrail(out / "audit" / "server.jsonl", ensure_server_key(out / "keys"), run_id=c.run_id,
                             config_hash=srv.hash)
    trail.start(c.backbone, method, list(srv.expected), cfg.seed, 0, joins=False)
    trail.round_started(c.backbone)
    backbones, digests = [module_hash(c.backbone)], []
    for r in range(completed):
        with torch.no_grad():  # the round's update
            next(c.backbone.parameters()).add_(0.01 * (r + 1))
        c.round, c.step = r + 1, (r + 1) * cfg.steps_per_round
        digests.append(save_checkpoint(c.state_dict(), srv.ckpt_path))
        backbones.append(module_hash(c.backbone))
        if r < recorded:
            trail.round_finished(r, c.backbone, {SITES[0]: (cfg.steps_per_round, 8)}, [], method, digests[-1])
            trail.round_started(c.backbone)
    trail.close()  # the process stops here
    return _Stopped(tmp, cfg, out, backbones, digests)


def _tamper(ckpt: Path) -> None:
    """Change one backbone weight and write the checkpoint again (it still loads: weights only)."""
    state = load_checkpoint(ckpt, "server")
    name = next(iter(state["backbone"]))
    state["backbone"][name] = state["backbone"][name] + 0.5
    save_checkpoint(state, ckpt)


# ---- D7: the checkpoint must be the one the log recorded ------------------------------------------------------


def test_resume_refuses_a_checkpoint_that_differs_from_the_one_the_log_recorded(tmp_path: Path) -> None:
    run = _stopped_run(tmp_path, completed=1)
    recorded, genuine = run.digests[-1], run.ckpt.read_bytes()
    _tamper(run.ckpt)
    actual = file_sha256(run.ckpt)
    before = run.log.read_bytes()
    with pytest.raises(CheckpointError) as info:
        run.server().run()
    msg = str(info.value)
    assert actual in msg and recorded in msg and str(run.ckpt) in msg, msg
    assert "Refusing to resume" in msg and "restore the checkpoint" in msg
    assert info.value.exit_code == 7
    assert run.log.read_bytes() == before  # nothing appended to the log
    # the genuine checkpoint resumes: the restart is on the record, from the checkpoint and backbone recorded
    run.ckpt.write_bytes(genuine)
    assert file_sha256(run.ckpt) == recorded
    run.resume()
    report = verify_log(run.log, load_public_keys([run.public_key]))
    resumed = [e["body"] for e in report.records if e["kind"] == "round_interrupted"]
    assert [(b["round"], b["checkpoint_hash"], b["backbone_hash"]) for b in resumed] == [
        (1, recorded, run.backbones[1])]
    assert report.interrupted == {report.runs[0]: [1]} and "1 round(s) restarted" in report.summary()


def test_the_crash_window_still_resumes_and_a_checkpoint_further_ahead_is_refused(tmp_path: Path) -> None:
    run = _stopped_run(tmp_path, completed=2, recorded=1)  # round 1's checkpoint written, its record not
    run.resume()
    report = verify_log(run.log, load_public_keys([run.public_key]))
    run_id = report.runs[0]
    assert report.rounds[run_id] == [0, 1] and report.backfilled[run_id] == [1] and report.interrupted[run_id] == [2]
    back = next(e["body"] for e in report.records if e["kind"] == "round_backfill")
    assert (back["checkpoint_hash"], back["backbone_hash"]) == (run.digests[1], run.backbones[2])
    # a second resume from the same checkpoint: now the log records it, and it matches
    run.resume()
    assert verify_log(run.log, load_public_keys([run.public_key])).interrupted[run_id] == [2, 2]


def test_resume_refuses_a_checkpoint_more_than_one_round_ahead_of_the_log(tmp_path: Path) -> None:
    run = _stopped_run(tmp_path, completed=2, recorded=0)
    before = run.log.read_bytes()
    with pytest.raises(CheckpointError, match="more than the one round"):
        run.server().run()
    assert run.log.read_bytes() == before


def test_verify_checks_backbone_continuity_between_rounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A server resumed (as before this fix: reconcile only) from a checkpoint whose backbone is not the one
    the last round record ended with: the log chains and is signed, but the backbone jumps."""
    key_path = tmp_path / "server-key.pem"
    save_private_key(SERVER_KEY, key_path)
    backbone = torch.nn.Linear(3, 3)
    trail = ServerAuditTrail(tmp_path / "server.jsonl", key_path, run_id=RUN, config_hash=H, clock=fixed_clock())
    trail.start(backbone, "mean", [SITE], seed=0, round=0)
    trail.round_started(backbone)
    with torch.no_grad():
        backbone.weight.add_(0.1)
    trail.round_finished(0, backbone, {SITE: (1, 8)}, [], "mean", H)
    trail.close()
    with torch.no_grad():  # the checkpoint was modified while the server was down
        backbone.weight.add_(1.0)
    trail = ServerAuditTrail(tmp_path / "server.jsonl", key_path, run_id=RUN, config_hash=H, clock=fixed_clock())
    trail.reconcile(1, "cd" * 32, backbone_hash=module_hash(backbone), step=1)
    trail.round_started(backbone)
    trail.round_finished(1, backbone, {SITE: (1, 8)}, [], "mean", "cd" * 32)
    trail.run_finished(2, backbone, "cd" * 32)
    trail.close()
    pem = tmp_path / "server.pub.pem"
    save_public_key(SERVER_KEY.public_key(), pem)
    assert audit_cli.main(["verify", str(tmp_path / "server.jsonl"), "--public-key", str(pem), "--require-ended"]) == 8
    err = capsys.readouterr().err
    assert "backbone check failed" in err and "round 1 starts from backbone" in err, err


def test_verify_checks_the_resume_record_and_run_end_against_the_last_round(tmp_path: Path) -> None:
    from fedbone_med.audit.log import AuditLog

    def log(*extra: R.Record) -> Path:
        path = tmp_path / f"log-{len(list(tmp_path.iterdir()))}.jsonl"
        with AuditLog(path, SERVER_KEY, clock=fixed_clock()) as a:
            a.append(R.run_start(run_id=RUN, config_hash=H, software_version="0.1.0", backbone_hash="01" * 32,
                                 aggregation_method="mean", sites=[SITE]))
            a.append(R.round_record(run_id=RUN, round=0, started_at="2026-01-01T00:00:00Z",
                                    ended_at="2026-01-01T00:01:00Z", sites=[], aggregation=R.AggregationSummary(
                                        "mean", 1, 0, None, None, {}), backbone_hash_before="01" * 32,
                                    backbone_hash_after="02" * 32, checkpoint_hash="c0" * 32, config_hash=H,
                                    software_version="0.1.0"))
            for rec in extra:
                a.append(rec)
            a.checkpoint()
        return path

    def resumed(ckpt: str, backbone: str, rnd: int = 1) -> R.Record:
        return R.round_interrupted(run_id=RUN, round=rnd, checkpoint_hash=ckpt, backbone_hash=backbone, reason="x")

    keys = _keys(SERVER_KEY)
    assert verify_log(log(resumed("c0" * 32, "02" * 32)), keys).interrupted == {RUN: [1]}
    for path, check, words in [
        (log(resumed("c1" * 32, "02" * 32)), "checkpoint-hash", "the server resumed from checkpoint"),
        (log(resumed("c0" * 32, "03" * 32)), "backbone", "the resume at round 1 loaded backbone"),
        (log(resumed("c0" * 32, "02" * 32, rnd=3)), "rounds", "should resume at round 1"),
        (log(R.run_end(run_id=RUN, rounds=1, sites={}, backbone_hash="03" * 32, checkpoint_hash="c0" * 32)),
         "backbone", "run_end names as the final backbone"),
        (log(R.run_end(run_id=RUN, rounds=1, sites={}, backbone_hash="02" * 32, checkpoint_hash="c1" * 32)),
         "checkpoint-hash", "run_end names checkpoint"),
    ]:
        with pytest.raises(AuditError) as info:
            verify_log(path, keys)
        assert info.value.check == check and words in str(info.value), str(info.value)


# ---- D13: the log is verified before it is extended ----------------------------------------------------------


def test_resume_refuses_a_log_rechained_after_its_signed_checkpoints_were_deleted(tmp_path: Path) -> None:
    run = _stopped_run(tmp_path, completed=2)
    genuine = run.log.read_bytes()
    # every signed checkpoint deleted and the chain rebuilt: no signature left
    _rechain(run.log, lambda e, i: e["kind"] != "log_checkpoint")
    assert verify_log(run.log, {}, signatures=False, require_complete=False).signed_checkpoints == 0
    tampered = run.log.read_bytes()
    with pytest.raises(AuditError) as info:
        run.server().run()
    assert info.value.check == "unsigned-tail" and "no signed checkpoint" in str(info.value)
    assert run.log.read_bytes() == tampered  # not extended, not signed over
    # the checkpoints after the first deleted and the chain rebuilt: two round records unsigned
    run.log.write_bytes(genuine)
    first = next(i for i, e in enumerate(map(json.loads, _lines(run.log))) if e["kind"] == "log_checkpoint")
    _rechain(run.log, lambda e, i: e["kind"] != "log_checkpoint" or i == first)
    with pytest.raises(AuditError) as info:
        run.server().run()
    assert info.value.check == "unsigned-tail" and "2 round records after its last signed checkpoint" in str(
        info.value)
    # a record edited and the chain rebuilt, checkpoints kept: the next signed checkpoint no longer matches
    run.log.write_bytes(genuine)
    _rechain(run.log, lambda e, i: not (e["kind"] == "checkpoint_write" and e["body"]["round"] == 0))
    with pytest.raises(AuditError) as info:
        run.server().run()
    assert info.value.check == "checkpoint" and "fails verification" in str(info.value)
    # the genuine log resumes, and stays verifiable
    run.log.write_bytes(genuine)
    run.resume()
    assert verify_log(run.log, load_public_keys([run.public_key])).interrupted


def test_resume_refuses_a_missing_log_and_a_crash_window_tail_is_accepted(tmp_path: Path) -> None:
    run = _stopped_run(tmp_path, completed=1)
    genuine = run.log.read_bytes()
    run.log.unlink()
    with pytest.raises(AuditError, match="missing or empty") as info:
        run.server().run()
    assert info.value.check == "empty"
    # a crash between the round record and its signature leaves one unsigned round: accepted, then signed
    lines = genuine.split(b"\n")[:-1]
    assert json.loads(lines[-1])["kind"] == "log_checkpoint"
    run.log.write_bytes(b"".join(line + b"\n" for line in lines[:-1]))
    run.resume()
    assert verify_log(run.log, load_public_keys([run.public_key])).unsigned_tail == 0


def test_resume_verifies_checkpoints_signed_by_a_retired_key(tmp_path: Path) -> None:
    from fedbone_med.audit.keys import generate_key
    from fedbone_med.server.audit_trail import install_rotated_key

    run = _stopped_run(tmp_path, completed=1)
    keys = run.out / "keys"
    new_key = tmp_path / "new-key.pem"
    save_private_key(generate_key(), new_key)
    old_id = key_id(load_private_key(keys / "server-audit-key.pem").public_key())
    install_rotated_key(keys, new_key, old_id)  # the old key (which signed the whole log) is retired
    run.resume()
    pems = [keys / "server-audit-key.pub.pem", keys / "retired" / f"{old_id}.pub.pem"]
    assert verify_log(run.log, load_public_keys(pems)).interrupted


# ---- D8: an interrupted attempt is on the record at both ends, and cross-check says so -------------------------


def _frames(book: LedgerBook | None, site: FrameLedger, rnd: int, n: int, tag: bytes = b"") -> None:
    for i in range(n):
        frame = bytes([rnd, i]) * (8 + i) + tag
        for direction, kind in (("up", "forward"), ("down", "features")):
            if book is not None:
                book.record(SITE, direction, kind, rnd, i, frame)
            site.record(direction, kind, rnd, i, frame)


def _restarted_logs(tmp_path: Path, *, restart: bool = True, site_frames: int = 3) -> tuple[Path, Path]:
    """Two rounds; round 1's first attempt is cut (the server restarts when ``restart``), then trained again."""
    key_path = tmp_path / "server-key.pem"
    save_private_key(SERVER_KEY, key_path)
    backbone = torch.nn.Linear(3, 3)
    server = ServerAuditTrail(tmp_path / "server.jsonl", key_path, run_id=RUN, config_hash=H, clock=fixed_clock())
    site = SiteAuditTrail(tmp_path / "site.jsonl", SITE_KEY, run_id=RUN, site_id=SITE, clock=fixed_clock())
    server.start(backbone, "mean", [SITE], seed=0, round=0)
    site.start(round=0)
    book, ledger = LedgerBook(), FrameLedger()
    server.round_started(backbone)
    _frames(book, ledger, 0, 2)
    server.round_finished(0, backbone, {SITE: (2, 8)}, [], "mean", H, ledgers=book.take_round(0))
    site.round_finished(0, steps=2, samples=8, ledger=ledger.take(0), checkpoint_hash=H)
    _frames(None if restart else book, ledger, 1, site_frames, b"first attempt")  # the attempt that is cut
    if restart:  # the server process dies: its ledgers go with it; the resumed server says so
        server.close()
        server = ServerAuditTrail(tmp_path / "server.jsonl", key_path, run_id=RUN, config_hash=H,
                                  clock=fixed_clock())
        server.log.append(R.round_interrupted(run_id=RUN, round=1, checkpoint_hash=H,
                                              backbone_hash=module_hash(backbone), step=2, reason="resumed"))
        server.log.checkpoint()
        book = LedgerBook()
    site.attempt_abandoned(1, 1, ledger, {}, cause="UNAVAILABLE")
    ledger = FrameLedger()
    server.round_started(backbone)
    _frames(book, ledger, 1, 2)
    server.round_finished(1, backbone, {SITE: (2, 8)}, [], "mean", H, ledgers=book.take_round(1))
    site.round_finished(1, steps=2, samples=8, ledger=ledger.take(1), checkpoint_hash=H)
    server.run_finished(2, backbone, H, book.take_round(2))
    site.run_finished(2, ledger=ledger.take(2))
    server.close()
    site.close()
    return tmp_path / "server.jsonl", tmp_path / "site.jsonl"


def test_cross_check_lists_a_round_interrupted_by_a_server_restart(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    server, site = _restarted_logs(tmp_path)
    report = cross_check(server, site, server_keys=_keys(SERVER_KEY), site_keys=_keys(SITE_KEY))
    assert report.agree  # an honest run with a restart does not fail
    assert [(c.round, c.status) for c in report.rounds] == [(0, "agree"), (1, "interrupted"), (1, "agree"),
                                                            (2, "agree")]
    (cut,) = report.interrupted
    assert cut.frames == 6 and cut.up is not None and cut.up["frames"] == 3
    assert report.scope() == ("2 round(s) and the exchange after the last round; round 1: an attempt interrupted "
                              "by a server restart: the site booked 6 frame(s) the server could not "
                              f"(up 3 frames / {cut.up['bytes']} B, down 3 frames / {cut.down['bytes']} B)")
    own = verify_log(site, _keys(SITE_KEY))
    (rec,) = [e["body"] for e in own.records if e["kind"] == "site_round_interrupted"]
    assert (rec["round"], rec["rejoined_round"], [x["round"] for x in rec["ledgers"]]) == (1, 1, [1])
    assert "UNAVAILABLE" in rec["reason"]
    pems = []
    for name, key in (("server.pub.pem", SERVER_KEY), ("site.pub.pem", SITE_KEY)):
        save_public_key(key.public_key(), tmp_path / name)
        pems.append(str(tmp_path / name))
    assert audit_cli.main(["cross-check", str(server), str(site), "--server-key", pems[0], "--site-key", pems[1]]) == 0
    out, err = capsys.readouterr()
    assert "round 1: an attempt interrupted by a server restart: the site booked 6 frame(s)" in out
    assert "OK: server and site site-a agree on 2 round(s)" in out and "not compared" in err
    # the reports render the new records
    assert audit_cli.main(["report", str(site), "--public-key", pems[1]]) == 0
    assert "site_round_interrupted" in capsys.readouterr().out
    assert audit_cli.main(["report", str(server), "--public-key", pems[0], "--out", str(tmp_path / "r.html")]) == 0
    assert "Restarts and abandoned exchanges" in (tmp_path / "r.html").read_text()


def test_cross_check_names_abandoned_frames_no_restart_explains(tmp_path: Path) -> None:
    server, site = _restarted_logs(tmp_path, restart=False)
    report = cross_check(server, site, server_keys=_keys(SERVER_KEY), site_keys=_keys(SITE_KEY))
    assert not report.agree and not report.interrupted
    (diff,) = [d for d in report.differences if d.field == "interrupted"]
    assert diff.round == 1 and diff.server == "no server restart at this round" and "6 frame(s)" in diff.site


def test_a_restart_in_which_the_site_booked_nothing_is_listed_as_such(tmp_path: Path) -> None:
    server, site = _restarted_logs(tmp_path, site_frames=0)
    assert not any(b'"site_round_interrupted"' in line for line in _lines(site))  # nothing to record
    report = cross_check(server, site, server_keys=_keys(SERVER_KEY), site_keys=_keys(SITE_KEY))
    assert report.agree and "round 1: an attempt interrupted by a server restart: the site booked no frame in it" \
        in report.scope()


def test_a_site_keeps_a_completed_rounds_frames_and_records_only_the_abandoned_ones(tmp_path: Path) -> None:
    """Where each booked frame goes when a site joins again (site/networked.py `_recover`)."""
    site = SiteAuditTrail(tmp_path / "site.jsonl", SITE_KEY, run_id=RUN, site_id=SITE, clock=fixed_clock())
    site.start(round=0)

    def ledger(*frames: tuple[str, str, int]) -> FrameLedger:
        led = FrameLedger()
        for i, (direction, kind, rnd) in enumerate(frames):
            led.record(direction, kind, rnd, i, bytes([i]) * 10)
        return led

    # the report of round 0 was sent and the server closed the round, then died before replying: round 0's
    # frames stay for the site's site_round 0 (as the server's round record has them); nothing is abandoned
    reported: dict[int, Any] = {}
    led = ledger(("up", "forward", 0), ("down", "features", 0), ("up", "round_end", 0))
    assert site.attempt_abandoned(0, 1, led, reported, cause="UNAVAILABLE") == {}
    assert reported[0]["up"]["frames"] == 2 and reported[0]["up"]["types"] == {"forward": 1, "round_end": 1}
    # ... and what came after the report (its reply, the sync request) is abandoned, booked under round 1
    led = ledger(("up", "round_end", 0), ("down", "round_end_reply", 1), ("up", "round_sync", 1))
    reported = {}
    assert list(site.attempt_abandoned(0, 1, led, reported, cause="UNAVAILABLE")) == [1] and list(reported) == [0]
    # the round is trained again (the server resumed at it): its reported summary is abandoned too
    reported = {2: {"up": {"frames": 1, "bytes": 3, "digest": H, "types": {"round_end": 1}},
                    "down": {"frames": 0, "bytes": 0, "digest": "0" * 64, "types": {}}}}
    led = ledger(("down", "round_end_reply", 3))
    assert sorted(site.attempt_abandoned(2, 2, led, reported, cause="UNAVAILABLE")) == [2, 3] and reported == {}
    # dropped mid-round without a report: nothing is kept for a site_round; the partial round is abandoned
    reported = {}
    assert list(site.attempt_abandoned(4, 5, ledger(("up", "forward", 4)), reported, cause="ABORTED")) == [4]
    assert reported == {}
    site.close()
    own = verify_log(tmp_path / "site.jsonl", _keys(SITE_KEY))
    got = [(e["body"]["round"], e["body"]["rejoined_round"], [x["round"] for x in e["body"]["ledgers"]])
           for e in own.records if e["kind"] == "site_round_interrupted"]
    assert got == [(0, 1, [1]), (2, 2, [2, 3]), (4, 5, [4])]


def test_new_record_kinds_refuse_bad_fields_and_the_fast_check_agrees() -> None:
    led = FrameLedger().summary(0)
    good = [R.round_interrupted(run_id=RUN, round=1, checkpoint_hash=H, backbone_hash=H, reason="resumed", step=4),
            R.site_round_interrupted(run_id=RUN, site_id=SITE, round=1, rejoined_round=2, ledgers={1: led, 2: led},
                                     reason="UNAVAILABLE")]
    for rec in good:
        assert R.conforms(R.KINDS[rec.kind], json.loads(canonical_json(rec.body)))
    with pytest.raises(AuditError, match="file path"):
        R.round_interrupted(run_id=RUN, round=1, checkpoint_hash=H, backbone_hash=H, reason="see /tmp/x")
    with pytest.raises(AuditError, match="SHA-256"):
        R.round_interrupted(run_id=RUN, round=1, checkpoint_hash="x", backbone_hash=H, reason="r")
    bad = {**good[1].body, "ledgers": [{"round": 1, "ledger": led, "extra": 1}]}
    assert not R.conforms(R.KINDS["site_round_interrupted"], bad)


# ---- end to end: a server killed mid-round and resumed (real processes) -----------------------------------------


def _signed_round(log: Path, rnd: int) -> bool:
    """The round's record is in the log and covered by a signed checkpoint."""
    try:
        envs = [json.loads(line) for line in _lines(log)]
    except (OSError, ValueError):
        return False
    at = next((i for i, e in enumerate(envs) if e["kind"] == "round" and e["body"]["round"] == rnd), None)
    return at is not None and any(e["kind"] == "log_checkpoint" for e in envs[at:])


@pytest.mark.slow
def test_a_server_killed_mid_round_resumes_and_every_site_log_shows_the_interrupted_attempt(tmp_path: Path) -> None:
    fed = Fed(tmp_path, experiment(tmp_path, rounds=2, steps=2))
    try:
        fed.start_server()
        for name in SITES:
            fed.start_site(name)
        log = tmp_path / "server" / "audit" / "server.jsonl"
        deadline = time.monotonic() + 300
        while not _signed_round(log, 0):  # round 0 recorded and signed: the server is in round 1 now
            assert time.monotonic() < deadline and fed.procs["server"].poll() is None, fed.logs()
            time.sleep(0.02)
        fed.procs["server"].send_signal(signal.SIGKILL)
        fed.procs["server"].wait()
        time.sleep(1.0)  # the sites notice and retry with backoff
        fed.start_server(resume=True)
        for name in ("server", *SITES):
            assert fed.wait(name) == 0, fed.logs()
    finally:
        fed.close()
    pem = tmp_path / "server" / "keys" / "server-audit-key.pub.pem"
    assert audit_cli.main(["verify", str(log), "--public-key", str(pem), "--require-ended"]) == 0
    server = verify_log(log, load_public_keys([pem]), require_ended=True)
    (resumed,) = [e["body"] for e in server.records if e["kind"] == "round_interrupted"]
    round0 = next(e["body"] for e in server.records if e["kind"] == "round" and e["body"]["round"] == 0)
    assert resumed["round"] == 1 and resumed["backbone_hash"] == round0["backbone_hash_after"]
    assert resumed["checkpoint_hash"] == round0["checkpoint_hash"]
    booked = 0
    for name in SITES:
        site_dir = tmp_path / "sites" / name
        site_log = site_dir / "audit" / "site.jsonl"
        site_key = site_dir / "keys" / f"site-{name}-audit-key.pub.pem"
        report = cross_check(log, site_log, server_keys=load_public_keys([pem]),
                             site_keys=load_public_keys([site_key]))
        assert report.agree, [c.line() for c in report.rounds]
        scope = report.scope()
        assert scope.startswith("2 round(s) and the exchange after the last round; round 1: an attempt interrupted "
                                "by a server restart: the site booked "), scope
        booked += sum(c.frames for c in report.rounds if c.status == "interrupted")
        assert audit_cli.main(["cross-check", str(log), str(site_log), "--server-key", str(pem),
                               "--site-key", str(site_key)]) == 0
    assert booked > 0  # the sites were mid-exchange when the server died: those frames are on their record
