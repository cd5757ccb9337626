"""Frame ledgers, site audit trail, server events, cross-check, CSV export and crash back-fill."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedbone_med.audit import records as R
from fedbone_med.audit.crosscheck import cross_check
from fedbone_med.audit.errors import AuditError
from fedbone_med.audit.export import to_csv
from fedbone_med.audit.keys import key_from_seed, key_id, save_private_key, save_public_key
from fedbone_med.audit.ledger import FrameLedger, LedgerBook, empty_summary
from fedbone_med.audit.samples import (
    EXPECTED_CROSS_CHECK,
    EXPECTED_SITE_FAILURES,
    fixed_clock,
    sample_key,
    site_sample_key,
)
from fedbone_med.audit.site_trail import SiteAuditTrail, ensure_site_key
from fedbone_med.audit.verify import verify_log
from fedbone_med.cli.audit import main
from fedbone_med.server.audit_trail import ServerAuditTrail, module_hash

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "audit" / "samples"
SERVER_KEY = key_from_seed(bytes(range(32)))
SITE_KEY = key_from_seed(bytes(range(100, 132)))
RUN = "run-x"
SITE = "site-a"
H = "cd" * 32
Frame = tuple[str, str, int, bytes]  # direction, msg_type, step, bytes


def _keys(*keys: Any) -> dict[str, Any]:
    return {key_id(k.public_key()): k.public_key() for k in keys}


def _frames(r: int, steps: int = 3, site: str = SITE) -> list[Frame]:
    out: list[Frame] = []
    for i in range(steps):
        step = r * steps + i
        z = hashlib.sha256(f"{site}{step}z".encode()).digest() * 4
        f = hashlib.sha256(f"{site}{step}F".encode()).digest() * 6
        out += [("up", "forward", step, z), ("down", "features", step, f), ("up", "backward", step, f[::-1]),
                ("down", "grad_input", step, z[::-1])]
    return out + [("up", "round_end", r * steps + steps - 1, b"end" + bytes([r]))]


def _spec_digest(frames: list[Frame], direction: str, r: int) -> str:
    """The documented digest chain, recomputed independently of the implementation."""
    d = "0" * 64
    for dr, kind, step, frame in frames:
        if dr == direction:
            entry = f"fedbone-ledger-v1|{dr}|{kind}|{r}|{step}|{hashlib.sha256(frame).hexdigest()}"
            d = hashlib.sha256(bytes.fromhex(d) + entry.encode()).hexdigest()
    return d


def _feed(ledger: FrameLedger, r: int, frames: list[Frame]) -> None:
    for direction, kind, step, frame in frames:
        ledger.record(direction, kind, r, step, frame)


# ---- ledger ----

def test_ledgers_at_both_ends_fed_the_same_frames_agree_and_follow_the_spec() -> None:
    book, site = LedgerBook(), FrameLedger()
    for r in range(2):
        frames = _frames(r)
        for direction, kind, step, frame in frames:
            site.record(direction, kind, r, step, frame)  # site: after sealing / after receiving
            book.record(SITE, direction, kind, r, step, bytes(frame))  # server: its own copy of the bytes
        book.record("site-b", "up", "forward", r, 0, b"other site")
        a, b = book.take_round(r)[SITE], site.take(r)
        assert a == b
        ups = [f for f in frames if f[0] == "up"]
        assert a["up"]["frames"] == len(ups) == 7 and a["up"]["bytes"] == sum(len(f[3]) for f in ups)
        assert a["up"]["types"] == {"backward": 3, "forward": 3, "round_end": 1}
        assert a["down"]["types"] == {"features": 3, "grad_input": 3}
        assert a["up"]["digest"] == _spec_digest(frames, "up", r)
        assert a["down"]["digest"] == _spec_digest(frames, "down", r)
    assert book.sites() == [SITE, "site-b"]
    empty = FrameLedger().take(0)
    assert empty["up"] == {"frames": 0, "bytes": 0, "digest": "0" * 64, "types": {}}


def _drop(fr: list[Frame]) -> list[Frame]:
    return fr[:4] + fr[5:]  # the second forward (up) frame never arrived


def _alter(fr: list[Frame]) -> list[Frame]:
    d, k, s, b = fr[2]
    return fr[:2] + [(d, k, s, bytes([b[0] ^ 1]) + b[1:])] + fr[3:]  # one bit flipped, same length


def _reorder(fr: list[Frame]) -> list[Frame]:
    return [fr[2], fr[1], fr[0]] + fr[3:]  # two up frames swapped


def _extra(fr: list[Frame]) -> list[Frame]:
    return fr + [("down", "features", fr[-1][2], b"injected")]


def _resize(fr: list[Frame]) -> list[Frame]:
    d, k, s, b = fr[1]
    return [fr[0], (d, k, s, b + b"\0")] + fr[2:]


MUTATIONS: list[tuple[str, Callable[[list[Frame]], list[Frame]], str]] = [
    ("dropped", _drop, "ledger.up.frames"),
    ("altered", _alter, "ledger.up.digest"),
    ("reordered", _reorder, "ledger.up.digest"),
    ("extra", _extra, "ledger.down.frames"),
    ("resized", _resize, "ledger.down.bytes"),
]


@pytest.mark.parametrize("name, mutate, field", MUTATIONS)
def test_ledger_summary_changes_for_each_frame_mutation(name: str, mutate: Any, field: str) -> None:
    a, b = FrameLedger(), FrameLedger()
    _feed(a, 0, _frames(0))
    _feed(b, 0, mutate(_frames(0)))
    sa, sb = a.take(0), b.take(0)
    _, direction, key = field.split(".")
    assert sa[direction][key] != sb[direction][key], name
    other = "down" if direction == "up" else "up"
    if name != "extra" and name != "resized":
        assert sa[other] == sb[other]


def test_ledger_refuses_bad_calls_and_late_frames() -> None:
    led = FrameLedger()
    for args in [("sideways", "forward", 0, 0, b"x"), ("up", "Forward", 0, 0, b"x"), ("up", "a|b", 0, 0, b"x"),
                 ("up", "forward", -1, 0, b"x"), ("up", "forward", 0, True, b"x"), ("up", "forward", 0, 0, "x")]:
        with pytest.raises(AuditError, match="frame ledger"):
            led.record(*args)  # type: ignore[arg-type]
    led.record("up", "forward", 1, 3, memoryview(b"abc"))
    led.record("up", "forward", 2, 6, bytearray(b"abc"))
    assert led.summary(1)["up"]["bytes"] == 3 and led.open_rounds() == [1, 2]
    assert led.take(1)["up"]["frames"] == 1
    with pytest.raises(AuditError, match="after that round was summarised"):
        led.record("down", "features", 1, 3, b"late")
    with pytest.raises(AuditError, match="after that round was summarised"):
        led.record("down", "features", 0, 0, b"even later")
    led.record("down", "features", 2, 6, b"ok")
    assert led.take(2)["down"]["frames"] == 1


def test_plaintext_frame_is_canonical_and_unambiguous() -> None:
    from fedbone_med.audit.ledger import plaintext_frame

    a = plaintext_frame({"step": 1, "round": 0}, b"ab", b"c")
    assert a == plaintext_frame({"round": 0, "step": 1}, bytearray(b"ab"), memoryview(b"c"))  # key order irrelevant
    assert a != plaintext_frame({"round": 0, "step": 1}, b"a", b"bc")  # payload boundaries are bound
    assert a != plaintext_frame({"round": 0, "step": 2}, b"ab", b"c")
    assert a.startswith((20).to_bytes(8, "big") + b"{\"round\":0,\"step\":1}" + (2).to_bytes(8, "big") + b"ab")


def test_ledger_is_thread_safe() -> None:
    led = FrameLedger()
    n_threads, per = 8, 300

    def work(t: int) -> None:
        for i in range(per):
            led.record("up" if i % 2 else "down", "forward", 0, i, bytes([t]) * (i % 7 + 1))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = led.take(0)
    assert s["up"]["frames"] + s["down"]["frames"] == n_threads * per
    assert s["up"]["bytes"] + s["down"]["bytes"] == n_threads * sum(i % 7 + 1 for i in range(per))
    assert s["up"]["types"]["forward"] == s["up"]["frames"]


# ---- server and site trails ----

@pytest.fixture()
def server_key_path(tmp_path: Path) -> Path:
    path = tmp_path / "server-key.pem"
    save_private_key(SERVER_KEY, path)
    return path


def _server(tmp_path: Path, key_path: Path) -> ServerAuditTrail:
    return ServerAuditTrail(tmp_path / "server.jsonl", key_path, run_id=RUN, config_hash=H, clock=fixed_clock())


def _site(tmp_path: Path) -> SiteAuditTrail:
    return SiteAuditTrail(tmp_path / "site.jsonl", SITE_KEY, run_id=RUN, site_id=SITE, clock=fixed_clock())


def _run(tmp_path: Path, key_path: Path, rounds: int = 3,
         site_frames: Callable[[int, list[Frame]], list[Frame]] = lambda r, f: f,
         site_counts: Callable[[int], tuple[int, int, float]] = lambda r: (3, 24, 0.5 * (r + 1)),
         ledgers: bool = True, end: str = "none",
         site_tail: Callable[[list[Frame]], list[Frame]] = lambda f: f) -> tuple[Path, Path]:
    """A server and a site that exchange ``_frames(r)`` each round; the site may see other frames.

    ``end``: which ends close the run with run_end / site_run_end ("none", "both", "server", "site"),
    after a tail exchange (the last sync and a validation forward) the site may see as ``site_tail``.
    """
    torch.manual_seed(0)
    backbone = nn.Linear(4, 4)
    book, site_ledger = LedgerBook(), FrameLedger()
    server, site = _server(tmp_path, key_path), _site(tmp_path)
    server.start(backbone, "projection", [SITE, "site-b"], seed=0, round=0)
    server.site_joined(SITE, 0, cert_fingerprint="sha256:" + "ab" * 8)
    site.start(round=0, config_hash=H)
    for r in range(rounds):
        server.round_started(backbone)
        frames = _frames(r)
        _feed(book.ledger(SITE), r, frames)
        _feed(book.ledger("site-b"), r, _frames(r, site="site-b"))
        _feed(site_ledger, r, site_frames(r, frames))
        with torch.no_grad():
            backbone.weight.add_(0.1)
        steps = [{"min_cosine": -0.1, "mean_cosine": 0.2, "conflicting_pairs": 1, "site_names": [SITE, "site-b"],
                  "site_norms": [1.0, 2.0]} for _ in range(3)]
        eps = 0.5 * (r + 1)
        server.round_finished(r, backbone, {SITE: (3, 24), "site-b": (3, 16)}, steps, "projection", H,
                              {SITE: (eps, 1e-5), "site-b": (None, None)},
                              **({"ledgers": book.take_round(r)} if ledgers else {}))
        n_steps, n_samples, site_eps = site_counts(r)
        site.round_finished(r, steps=n_steps, samples=n_samples, ledger=site_ledger.take(r), epsilon=site_eps,
                            delta=1e-5, checkpoint_hash=H)
    tail: list[Frame] = [("down", "round_end_reply", rounds * 3 - 1, b"ok"), ("up", "round_sync", rounds * 3 - 1, b"s"),
                         ("down", "round_sync_reply", rounds * 3 - 1, b"sync" * 8),
                         ("up", "forward", rounds * 3 - 1, b"val" * 5), ("down", "features", rounds * 3 - 1, b"f" * 40)]
    _feed(book.ledger(SITE), rounds, tail)
    _feed(site_ledger, rounds, site_tail(tail))
    if end in ("both", "server"):
        server.run_finished(rounds, backbone, H, book.take_round(rounds))
    if end in ("both", "site"):
        site.run_finished(rounds, ledger=site_ledger.take(rounds))
    server.close()
    site.close()
    return tmp_path / "server.jsonl", tmp_path / "site.jsonl"


def _cc(server: Path, site: Path, **kw: Any) -> Any:
    return cross_check(server, site, server_keys=_keys(SERVER_KEY), site_keys=_keys(SITE_KEY), **kw)


def _pems(tmp_path: Path) -> list[str]:
    out = []
    for name, key in (("server.pub.pem", SERVER_KEY), ("site.pub.pem", SITE_KEY)):
        if not (tmp_path / name).exists():
            save_public_key(key.public_key(), tmp_path / name)
        out.append(str(tmp_path / name))
    return out


def test_server_and_site_logs_agree_and_cross_check_exits_0(tmp_path: Path, server_key_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    server, site = _run(tmp_path, server_key_path)
    rep = verify_log(site, _keys(SITE_KEY))
    assert rep.site_rounds[RUN] == [0, 1, 2] and rep.unsigned_tail == 0
    srv = verify_log(server, _keys(SERVER_KEY))
    rounds = [e["body"] for e in srv.records if e["kind"] == "round"]
    entry = next(s for s in rounds[0]["sites"] if s["site_id"] == SITE)
    assert entry["cert_fingerprint"] == "sha256:" + "ab" * 8 and entry["ledger"]["up"]["frames"] == 7
    report = _cc(server, site)
    assert report.agree and [c.status for c in report.rounds] == ["agree"] * 3 and report.site_id == SITE
    spem, tpem = _pems(tmp_path)
    assert main(["cross-check", str(server), str(site), "--server-key", spem, "--site-key", tpem]) == 0
    out = capsys.readouterr().out
    assert "round 2: agree (up 7 frames" in out and "OK: server and site site-a agree on 3 round(s)" in out
    # without keys: structure is checked, signatures are not, and the output says so
    assert main(["cross-check", str(server), str(site)]) == 0
    assert "signatures NOT checked" in capsys.readouterr().err
    # a wrong key is refused
    assert main(["cross-check", str(server), str(site), "--server-key", tpem]) == 8
    assert "signature check failed" in capsys.readouterr().err


@pytest.mark.parametrize("name, mutate, field", MUTATIONS)
def test_cross_check_names_round_and_field_of_a_frame_mutation(tmp_path: Path, server_key_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               name: str, mutate: Any, field: str) -> None:
    server, site = _run(tmp_path, server_key_path, site_frames=lambda r, f: mutate(f) if r == 1 else f)
    report = _cc(server, site)
    assert not report.agree
    first = report.first_difference
    assert (first.round, first.field) == (1, field), name
    assert [c.status for c in report.rounds] == ["agree", "differ", "agree"]
    spem, tpem = _pems(tmp_path)
    assert main(["cross-check", str(server), str(site), "--server-key", spem, "--site-key", tpem]) == 8
    err = capsys.readouterr().err
    assert f"round 1: {field} differs" in err


@pytest.mark.parametrize("counts, field", [
    (lambda r: (2 if r == 2 else 3, 24, 0.5 * (r + 1)), "steps"),
    (lambda r: (3, 25 if r == 0 else 24, 0.5 * (r + 1)), "samples"),
    (lambda r: (3, 24, 0.5 * (r + 1) + (0.01 if r == 1 else 0)), "epsilon"),
])
def test_cross_check_names_count_and_privacy_differences(tmp_path: Path, server_key_path: Path, counts: Any,
                                                         field: str) -> None:
    server, site = _run(tmp_path, server_key_path, site_counts=counts)
    first = _cc(server, site).first_difference
    expected_round = {"steps": 2, "samples": 0, "epsilon": 1}[field]
    assert first is not None and (first.round, first.field) == (expected_round, field)


def test_cross_check_names_a_certificate_mismatch(tmp_path: Path, server_key_path: Path) -> None:
    server, site = _run(tmp_path, server_key_path, rounds=1)
    # the site's log says it ran under another certificate than the one the server admitted
    other = SiteAuditTrail(tmp_path / "fp.jsonl", SITE_KEY, run_id=RUN, site_id=SITE, clock=fixed_clock())
    other.start(round=0, cert_fingerprint="sha256:" + "ff" * 8)
    other.round_finished(0, steps=3, samples=24, ledger=_site_ledger(0), epsilon=0.5, delta=1e-5, checkpoint_hash=H)
    other.close()
    first = _cc(server, tmp_path / "fp.jsonl").first_difference
    assert first is not None and (first.round, first.field) == (0, "cert_fingerprint")
    assert first.server == "sha256:" + "ab" * 8
    # the same log with the admitted fingerprint agrees
    same = SiteAuditTrail(tmp_path / "ok.jsonl", SITE_KEY, run_id=RUN, site_id=SITE, clock=fixed_clock())
    same.start(round=0, cert_fingerprint="sha256:" + "ab" * 8)
    same.round_finished(0, steps=3, samples=24, ledger=_site_ledger(0), epsilon=0.5, delta=1e-5, checkpoint_hash=H)
    same.close()
    assert _cc(server, tmp_path / "ok.jsonl").agree


def _site_ledger(r: int) -> dict[str, Any]:
    led = FrameLedger()
    _feed(led, r, _frames(r))
    return led.take(r)


def test_cross_check_missing_rounds_and_sites(tmp_path: Path, server_key_path: Path) -> None:
    server, site = _run(tmp_path, server_key_path)
    # the site's log ends after round 1 (its last record + checkpoint cut): round 2 has no site record
    lines = site.read_bytes().split(b"\n")[:-1]
    short = tmp_path / "short.jsonl"
    short.write_bytes(b"".join(line + b"\n" for line in lines[:-2]))
    first = _cc(server, short).first_difference
    assert first is not None and (first.round, first.field) == (2, "site_round")
    # a site log from another site: that site does not appear in any server round
    other = SiteAuditTrail(tmp_path / "c.jsonl", SITE_KEY, run_id=RUN, site_id="site-c", clock=fixed_clock())
    other.start(round=0)
    other.round_finished(0, steps=1, samples=1, ledger=FrameLedger().take(0))
    other.close()
    first = _cc(server, tmp_path / "c.jsonl").first_difference
    assert first is not None and (first.round, first.field) == (0, "sites")
    # a site log of another run
    alien = SiteAuditTrail(tmp_path / "d.jsonl", SITE_KEY, run_id="run-y", site_id=SITE, clock=fixed_clock())
    alien.start(round=0)
    alien.round_finished(0, steps=1, samples=1, ledger=FrameLedger().take(0))
    alien.close()
    first = _cc(server, tmp_path / "d.jsonl").first_difference
    assert first is not None and first.field == "run_id"
    # a server log whose round records carry no ledger (older server): named, not silently accepted
    (tmp_path / "old").mkdir()
    server_old, site_old = _run(tmp_path / "old", server_key_path, ledgers=False)
    first = _cc(server_old, site_old).first_difference
    assert first is not None and (first.round, first.field) == (0, "ledger")
    # the server log without the ledger keeps the pre-ledger byte format (no "ledger" key at all)
    assert b'"ledger"' not in server_old.read_bytes()
    # a log with no site records cannot be cross-checked as a site log
    with pytest.raises(AuditError, match="one site"):
        cross_check(server, server, server_keys=_keys(SERVER_KEY), site_keys=_keys(SERVER_KEY))


def test_tampered_site_log_fails_verify_and_cross_check(tmp_path: Path, server_key_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    server, site = _run(tmp_path, server_key_path)
    lines = site.read_bytes().split(b"\n")[:-1]
    i = next(n for n, line in enumerate(lines) if b'"kind":"site_round"' in line)
    env = json.loads(lines[i])
    env["body"]["ledger"]["up"]["frames"] += 1
    from fedbone_med.audit.canonical import canonical_json

    lines[i] = canonical_json(env)
    site.write_bytes(b"".join(line + b"\n" for line in lines))
    with pytest.raises(AuditError) as info:
        verify_log(site, _keys(SITE_KEY))
    assert info.value.check == "hash-chain" and info.value.line == i + 2
    spem, tpem = _pems(tmp_path)
    assert main(["cross-check", str(server), str(site), "--server-key", spem, "--site-key", tpem]) == 8
    assert "hash-chain check failed" in capsys.readouterr().err


def test_committed_site_samples_verify_and_cross_check_as_documented(capsys: pytest.CaptureFixture[str]) -> None:
    site_keys = _keys(site_sample_key())
    server_keys = _keys(sample_key())
    assert verify_log(SAMPLES / "site-01.jsonl", site_keys).site_rounds
    for name, check in EXPECTED_SITE_FAILURES.items():
        with pytest.raises(AuditError) as info:
            verify_log(SAMPLES / name, site_keys)
        assert info.value.check == check, name
    good = cross_check(SAMPLES / "good.jsonl", SAMPLES / "site-01.jsonl", server_keys=server_keys,
                       site_keys=site_keys)
    assert good.agree and [c.tail for c in good.rounds] == [False, False, False, True]
    assert verify_log(SAMPLES / "good.jsonl", server_keys, require_ended=True).ended == {"run-2026-01-05-a": 3}
    for name, (rnd, field) in EXPECTED_CROSS_CHECK.items():
        bad = cross_check(SAMPLES / "good.jsonl", SAMPLES / name, server_keys=server_keys, site_keys=site_keys)
        assert bad.first_difference is not None
        assert (bad.first_difference.round, bad.first_difference.field) == (rnd, field)
    pems = ["--server-key", str(SAMPLES / "samples-public-key.pem"), "--site-key",
            str(SAMPLES / "site-01-public-key.pem")]
    assert main(["cross-check", str(SAMPLES / "good.jsonl"), str(SAMPLES / "site-01.jsonl"), *pems]) == 0
    assert main(["cross-check", str(SAMPLES / "good.jsonl"), str(SAMPLES / "site-01-dropped-frame.jsonl"),
                 *pems]) == 8
    assert "round 1: ledger.up.frames differs: server 9, site 10" in capsys.readouterr().err


# ---- the run's end: the exchange after the last round ----

def test_run_end_tail_is_recorded_at_both_ends_and_cross_checked(tmp_path: Path, server_key_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    server, site = _run(tmp_path, server_key_path, end="both")
    report = _cc(server, site)
    assert report.agree and [(c.round, c.tail) for c in report.rounds] == [(0, False), (1, False), (2, False),
                                                                            (3, True)]
    assert report.rounds[-1].up["frames"] == 2 and report.rounds[-1].down["frames"] == 3
    end = [e["body"] for e in verify_log(server, _keys(SERVER_KEY)).records if e["kind"] == "run_end"]
    assert [(b["rounds"], [s["site_id"] for s in b["sites"]]) for b in end] == [(3, [SITE])]
    assert main(["cross-check", str(server), str(site), "--server-key", _pems(tmp_path)[0],
                 "--site-key", _pems(tmp_path)[1]]) == 0
    out = capsys.readouterr().out
    assert "run run-x after its last round (round 2): agree (up 2 frames" in out
    assert "agree on 3 round(s) and the exchange after the last round" in out


@pytest.mark.parametrize("end, site_tail, field, server_says, site_says", [
    ("both", lambda f: f[:-1], "tail.ledger.down.frames", 3, 2),  # the last validation reply never arrived
    ("both", lambda f: [*f[:3], (*f[3][:3], b"other"), f[4]], "tail.ledger.up.bytes", 16, 6),  # altered in transit
    ("server", lambda f: f, "run_end", "tail recorded", "no site_run_end record"),
    ("site", lambda f: f, "run_end", "no run_end record", "tail recorded"),
])
def test_cross_check_names_a_tail_difference(tmp_path: Path, server_key_path: Path, end: str, site_tail: Any,
                                             field: str, server_says: Any, site_says: Any) -> None:
    server, site = _run(tmp_path, server_key_path, end=end, site_tail=site_tail)
    report = _cc(server, site)
    first = report.first_difference
    assert first is not None and (first.round, first.field) == (3, field)
    assert (first.server, first.site) == (server_says, site_says)
    assert first.describe().startswith("run run-x after its last round (round 2): ")
    assert [c.status for c in report.rounds[:3]] == ["agree"] * 3


def test_verify_checks_the_run_end_and_can_require_it(tmp_path: Path, server_key_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    server, site = _run(tmp_path, server_key_path, end="both")
    assert verify_log(server, _keys(SERVER_KEY), require_ended=True).ended == {RUN: 3}
    assert verify_log(site, _keys(SITE_KEY), require_ended=True).ended == {RUN: 3}
    # Cut at the signed checkpoint before run_end: a valid log of a shorter run, unless the end is required.
    lines = server.read_bytes().splitlines(keepends=True)
    assert b'"kind":"run_end"' in lines[-2]
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:-2]))
    assert verify_log(cut, _keys(SERVER_KEY)).open_runs == [RUN]
    with pytest.raises(AuditError) as info:
        verify_log(cut, _keys(SERVER_KEY), require_ended=True)
    assert info.value.check == "run-end" and "no run_end record" in str(info.value)
    pem = _pems(tmp_path)[0]
    assert main(["verify", str(cut), "--public-key", pem]) == 0
    assert "note: run run-x has no run_end record" in capsys.readouterr().err
    assert main(["verify", str(cut), "--public-key", pem, "--require-ended"]) == 8
    assert main(["verify", str(server), "--public-key", pem, "--require-ended"]) == 0


def test_verify_refuses_a_run_end_that_does_not_close_the_run(tmp_path: Path, server_key_path: Path) -> None:
    backbone = nn.Linear(2, 2)

    def fails(path: Path, key: Any) -> str:
        with pytest.raises(AuditError) as info:
            verify_log(path, _keys(key))
        assert info.value.check == "run-end"
        return str(info.value)

    for d in "abc":
        (tmp_path / d).mkdir()
    wrong = _server(tmp_path / "a", server_key_path)
    wrong.start(backbone, "mean", [SITE], seed=0, round=0)
    wrong.round_finished(0, backbone, {SITE: (1, 1)}, [], "mean", H)
    wrong.run_finished(2, backbone, H)  # says 2 rounds; the log has 1
    wrong.close()
    assert "run_end says 2 round(s), the log recorded 1" in fails(tmp_path / "a" / "server.jsonl", SERVER_KEY)
    after = _server(tmp_path / "b", server_key_path)
    after.start(backbone, "mean", [SITE], seed=0, round=0)
    after.round_finished(0, backbone, {SITE: (1, 1)}, [], "mean", H)
    after.run_finished(1, backbone, H)
    after.round_finished(1, backbone, {SITE: (1, 1)}, [], "mean", H)  # a round after the end
    after.close()
    assert "was closed by the run_end record on line" in fails(tmp_path / "b" / "server.jsonl", SERVER_KEY)
    site = _site(tmp_path / "c")
    site.start(round=0)
    site.round_finished(0, steps=1, samples=1, ledger=empty_summary())
    site.run_finished(1, ledger=empty_summary())
    site.run_finished(1, ledger=empty_summary())  # closed twice
    site.close()
    assert "closed again" in fails(tmp_path / "c" / "site.jsonl", SITE_KEY)


# ---- CSV export ----

def test_export_csv_round_trips_counts(tmp_path: Path, server_key_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    server, site = _run(tmp_path, server_key_path)
    spem, tpem = _pems(tmp_path)
    out = tmp_path / "server.csv"
    assert main(["export", str(server), "--public-key", spem, "--csv", str(out)]) == 0
    report = verify_log(server, _keys(SERVER_KEY))
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert len(rows) == report.count
    assert [int(r["seq"]) for r in rows] == list(range(report.count))
    assert [r["kind"] for r in rows] == [e["kind"] for e in report.records]
    rounds = [e["body"] for e in report.records if e["kind"] == "round"]
    csv_rounds = [r for r in rows if r["kind"] == "round"]
    for body, row in zip(rounds, csv_rounds, strict=True):
        assert int(row["round"]) == body["round"]
        for s in body["sites"]:
            p = f"sites.{s['site_id']}."
            assert int(row[p + "samples"]) == s["samples"] and int(row[p + "steps"]) == s["steps"]
            for d in ("up", "down"):
                assert int(row[f"{p}ledger.{d}.frames"]) == s["ledger"][d]["frames"]
                assert int(row[f"{p}ledger.{d}.bytes"]) == s["ledger"][d]["bytes"]
                assert row[f"{p}ledger.{d}.digest"] == s["ledger"][d]["digest"]
        assert float(row["aggregation.min_cosine"]) == body["aggregation"]["min_cosine"]
    joins = [r for r in rows if r["kind"] == "join"]
    assert joins[0]["cert_fingerprint"] == "null" and joins[-1]["cert_fingerprint"].startswith("sha256:")
    assert rows[0]["sites"] == f"{SITE};site-b"
    # the site log exports too
    assert main(["export", str(site), "--public-key", tpem, "--csv", str(tmp_path / "site.csv")]) == 0
    site_rows = [r for r in csv.DictReader(open(tmp_path / "site.csv", encoding="utf-8")) if r["kind"] == "site_round"]
    assert [int(r["ledger.up.frames"]) for r in site_rows] == [7, 7, 7]
    # a tampered log is not exported
    data = server.read_bytes().replace(b'"samples":24', b'"samples":25', 1)
    server.write_bytes(data)
    assert main(["export", str(server), "--public-key", spem, "--csv", str(tmp_path / "x.csv")]) == 8
    assert not (tmp_path / "x.csv").exists()


def test_export_neutralises_spreadsheet_formulas(tmp_path: Path) -> None:
    from fedbone_med.audit.log import AuditLog

    with AuditLog(tmp_path / "a.jsonl", SERVER_KEY, clock=fixed_clock()) as log:
        log.append(R.leave(run_id=RUN, round=0, site_id="=HYPERLINK(1)", reason="+cmd"))
        log.checkpoint()
    rows = list(csv.DictReader(io.StringIO(to_csv(verify_log(tmp_path / "a.jsonl", _keys(SERVER_KEY))))))
    assert rows[0]["site_id"] == "'=HYPERLINK(1)" and rows[0]["reason"] == "'+cmd"
    assert rows[1]["kind"] == "log_checkpoint" and rows[1]["count"] == "1"


# ---- crash window: back-fill ----

def _crash_after_checkpoint(tmp_path: Path, key_path: Path, completed: int) -> Path:
    """Rounds 0..completed-1 finish; then the checkpoint of round ``completed`` is written but not its record."""
    backbone = nn.Linear(2, 2)
    trail = _server(tmp_path, key_path)
    trail.start(backbone, "mean", [SITE], seed=0, round=0)
    for r in range(completed):
        trail.round_started(backbone)
        trail.round_finished(r, backbone, {SITE: (1, 8)}, [], "mean", H)
    trail.close()  # the process dies here: the checkpoint says round `completed` is done
    return tmp_path / "server.jsonl"


def test_reconcile_backfills_a_verifiable_record_without_rewriting_lines(tmp_path: Path,
                                                                         server_key_path: Path) -> None:
    log = _crash_after_checkpoint(tmp_path, server_key_path, completed=2)
    before = log.read_bytes()
    ckpt = "ef" * 32
    backbone = nn.Linear(2, 2)
    trail = _server(tmp_path, server_key_path)
    assert trail.reconcile(3, ckpt, backbone_hash=module_hash(backbone), step=3) == [2]
    # resumed run continues with round 3
    trail.round_started(backbone)
    trail.round_finished(3, backbone, {SITE: (1, 8)}, [], "mean", H)
    trail.close()
    after = log.read_bytes()
    assert after.startswith(before), "existing lines must never be rewritten"
    report = verify_log(log, _keys(SERVER_KEY))
    assert report.rounds[RUN] == [0, 1, 2, 3] and report.backfilled[RUN] == [2] and report.unsigned_tail == 0
    back = next(e["body"] for e in report.records if e["kind"] == "round_backfill")
    assert back == {"run_id": RUN, "round": 2, "checkpoint_hash": ckpt, "backbone_hash": module_hash(backbone),
                    "step": 3, "log_last_round": 1, "reason": back["reason"]}
    assert "recovered" in back["reason"] and "back-filled" in report.summary()
    # nothing to do a second time (idempotent: no new lines)
    trail = _server(tmp_path, server_key_path)
    assert trail.reconcile(4, H) == []
    trail.close()
    assert log.read_bytes() == after


def test_unreconciled_crash_window_fails_verify(tmp_path: Path, server_key_path: Path) -> None:
    log = _crash_after_checkpoint(tmp_path, server_key_path, completed=2)
    backbone = nn.Linear(2, 2)
    trail = _server(tmp_path, server_key_path)  # resumed WITHOUT reconcile: round 2 is skipped
    trail.round_finished(3, backbone, {SITE: (1, 8)}, [], "mean", H)
    trail.close()
    with pytest.raises(AuditError) as info:
        verify_log(log, _keys(SERVER_KEY))
    assert info.value.check == "rounds" and "round(s) 2..2 have no record" in str(info.value)


def test_reconcile_signs_an_unsigned_tail_and_refuses_a_log_ahead_of_the_checkpoint(tmp_path: Path,
                                                                                    server_key_path: Path) -> None:
    from fedbone_med.audit.log import AuditLog

    log = _crash_after_checkpoint(tmp_path, server_key_path, completed=2)
    # crash after the round record of round 2 but before its signed checkpoint
    with AuditLog(log, SERVER_KEY, clock=fixed_clock()) as raw:
        raw.append(R.round_record(**{**json.loads(log.read_bytes().split(b"\n")[-3])["body"], "round": 2}))
    assert verify_log(log, _keys(SERVER_KEY), require_complete=False).unsigned_tail == 1
    trail = _server(tmp_path, server_key_path)
    assert trail.reconcile(3, H) == []
    with pytest.raises(AuditError) as info:
        trail.reconcile(2, H)  # checkpoint older than the log
    assert info.value.check == "reconcile"
    trail.close()
    assert verify_log(log, _keys(SERVER_KEY)).unsigned_tail == 0


def test_site_reconcile_and_cross_check_of_backfilled_round(tmp_path: Path, server_key_path: Path) -> None:
    server, site = _run(tmp_path, server_key_path, rounds=2)
    before = site.read_bytes()
    trail = _site(tmp_path)
    assert trail.reconcile(3, checkpoint_hash=H) == [2]
    trail.close()
    assert site.read_bytes().startswith(before)
    report = verify_log(site, _keys(SITE_KEY))
    assert report.site_rounds[RUN] == [0, 1] and report.records[-2]["kind"] == "site_round_backfill"
    # the server never recorded round 2 either: back-filled on the server too
    srv = _server(tmp_path, server_key_path)
    assert srv.reconcile(3, H) == [2]
    srv.close()
    result = _cc(server, site)
    assert result.first_difference is not None and result.first_difference.field == "backfilled"
    assert _cc(server, site, allow_backfilled=True).agree


# ---- server events ----

def test_server_event_methods_write_verifiable_records(tmp_path: Path, server_key_path: Path) -> None:
    backbone = nn.Linear(2, 2)
    trail = _server(tmp_path, server_key_path)
    trail.start(backbone, "projection", [SITE], seed=1, round=0)
    trail.site_joined("site-b", 0, cert_fingerprint="sha256:0011")
    trail.step_skipped(0, 2, "deadline passed with fewer than min_sites", ["site-b", SITE])
    trail.site_dropped("site-b", 0, "timeout")
    trail.config_changed(0, H, "ef" * 32, ["server.optimizer.lr"])
    trail.checkpoint_written(0, "site-b", H)
    trail.site_left(SITE, 1, "finished")
    trail.site_revoked("site-b", "certificate revoked", cert_fingerprint="sha256:0011")
    new_key = tmp_path / "new.pem"
    new = key_from_seed(bytes(range(50, 82)))
    save_private_key(new, new_key)
    assert trail.rotate_key(new_key) == key_id(new.public_key())
    trail.site_joined("site-b", 1)
    trail.sign()
    trail.close()
    report = verify_log(tmp_path / "server.jsonl", _keys(SERVER_KEY, new))
    kinds = [e["kind"] for e in report.records if e["kind"] != "log_checkpoint"]
    assert kinds == ["run_start", "join", "join", "step_skipped", "dropout", "config_change", "checkpoint_write",
                     "leave", "revocation", "key_rotation", "join"]
    skipped = next(e["body"] for e in report.records if e["kind"] == "step_skipped")
    assert skipped["sites"] == [SITE, "site-b"] and skipped["step"] == 2
    assert report.unsigned_tail == 0 and len(report.key_ids) == 2
    with pytest.raises(AuditError, match="signature"):
        verify_log(tmp_path / "server.jsonl", _keys(SERVER_KEY))


def test_site_key_and_trail_refuse_pathlike_ids(tmp_path: Path) -> None:
    key = ensure_site_key(tmp_path / "keys", SITE)
    assert key.stat().st_mode & 0o077 == 0 and (tmp_path / "keys" / f"site-{SITE}-audit-key.pub.pem").exists()
    assert ensure_site_key(tmp_path / "keys", SITE) == key  # kept, not regenerated
    with pytest.raises(AuditError, match="file path"):
        ensure_site_key(tmp_path / "keys", "../x")
    trail = SiteAuditTrail(tmp_path / "s.jsonl", key, run_id=RUN, site_id=SITE)
    trail.left(0, "privacy budget spent")
    trail.close()
    assert verify_log(tmp_path / "s.jsonl", {}, signatures=False).records[0]["kind"] == "leave"


def test_report_of_a_site_log_shows_its_rounds() -> None:
    from fedbone_med.audit.report import render_report

    md = render_report(verify_log(SAMPLES / "site-01.jsonl", _keys(site_sample_key())))
    assert "### Site rounds" in md and "| site-01 | 1 | 4 | 32 | 1 | 1e-05 | 9 | 1056 | 9 | 1056 |" in md
    assert "### Rounds" not in md
    server_md = render_report(verify_log(SAMPLES / "good.jsonl", _keys(sample_key())))
    assert "### Rounds" in server_md and "### Site rounds" not in server_md


def test_server_trail_is_thread_safe_and_accounts_for_sites_without_steps(tmp_path: Path,
                                                                           server_key_path: Path) -> None:
    backbone = nn.Linear(2, 2)
    trail = _server(tmp_path, server_key_path)
    trail.start(backbone, "mean", [SITE], seed=0, round=0)

    def joins(t: int) -> None:
        for i in range(25):
            trail.site_joined(f"t{t}-{i}", 0)

    threads = [threading.Thread(target=joins, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    trail.round_started(backbone)
    trail.round_finished(0, backbone, {SITE: (1, 8)}, [], "mean", H,
                         ledgers={"late-site": {"up": FrameLedger().take(0)["up"],
                                                "down": {"frames": 1, "bytes": 5, "digest": H, "types": {"x": 1}}}})
    for t in threads:
        t.join()
    trail.sign()
    trail.close()
    report = verify_log(tmp_path / "server.jsonl", _keys(SERVER_KEY))
    assert sum(e["kind"] == "join" for e in report.records) == 1 + 100
    entry = {s["site_id"]: s for s in next(e["body"] for e in report.records if e["kind"] == "round")["sites"]}
    assert (entry["late-site"]["steps"], entry["late-site"]["samples"]) == (0, 0)
    assert "ledger" not in entry[SITE] and entry["late-site"]["ledger"]["down"]["frames"] == 1


def test_round_finished_records_self_reported_losses(tmp_path: Path, server_key_path: Path) -> None:
    backbone = nn.Linear(2, 2)
    trail = _server(tmp_path, server_key_path)
    trail.start(backbone, "mean", [SITE, "site-b"], seed=0, round=0)
    usage = {SITE: (1, 8), "site-b": (1, 8)}
    trail.round_started(backbone)
    trail.round_finished(0, backbone, usage, [], "mean", H)  # the call without losses is unchanged
    trail.round_started(backbone)
    trail.round_finished(1, backbone, usage, [], "mean", H,
                         losses={SITE: torch.tensor(0.5), "site-b": float("nan"), "not-in-round": 1.0})
    trail.round_started(backbone)
    trail.round_finished(2, backbone, usage, [], "mean", H, losses={SITE: 0.25, "site-b": 2})
    trail.close()
    report = verify_log(tmp_path / "server.jsonl", _keys(SERVER_KEY))
    rounds = [{s["site_id"]: s for s in e["body"]["sites"]} for e in report.records if e["kind"] == "round"]
    assert all("train_loss" not in s for s in rounds[0].values())
    first = next(e["seq"] for e in report.records if e["kind"] == "round")
    assert b"train_loss" not in (tmp_path / "server.jsonl").read_bytes().split(b"\n")[first]  # omitted, not null
    assert rounds[1][SITE]["train_loss"] == 0.5 and "train_loss" not in rounds[1]["site-b"]  # NaN left out
    assert set(rounds[1]) == {SITE, "site-b"}
    assert rounds[2][SITE]["train_loss"] == 0.25 and rounds[2]["site-b"]["train_loss"] == 2.0
