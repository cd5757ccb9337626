"""Deterministic sample logs for auditors to practise on (``audit/samples/``).

``good.jsonl`` is a server log whose round records carry frame-ledger summaries and per-site
training losses;
``site-01.jsonl`` is site-01's own log of the same run (it cross-checks clean against
``good.jsonl``); ``site-01-dropped-frame.jsonl`` is a validly signed site log of a run in
which one frame sent by the site in round 1 never reached the server (cross-check names
round 1, ``ledger.up.frames``); ``site-01-tail-mismatch.jsonl`` the same for the exchange after
the last round (cross-check names the run's tail, ``tail.ledger.up.frames``); both logs end with
their ``run_end`` / ``site_run_end`` record; the ``tampered-*`` and ``truncated`` files are byte-level
tamperings that verification must refuse.

The keys are derived from fixed, *public* seeds: anyone can forge these samples. They are
for samples and tests only and must never sign a real log. The clock is fixed too, so
:func:`write_samples` produces identical bytes every time (Ed25519 signatures are
deterministic). Regenerate with ``python -m fedbone_med.audit.samples audit/samples``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import records as R
from .canonical import canonical_json, sha256_hex
from .keys import key_from_seed, public_pem
from .ledger import FrameLedger
from .log import AuditLog
from .records import Clock
from .site_trail import SiteAuditTrail

SAMPLE_SEED = hashlib.sha256(b"fedbone-med audit SAMPLE key -- public, NOT for production").digest()
SITE_SAMPLE_SEED = hashlib.sha256(b"fedbone-med audit SAMPLE site-01 key -- public, NOT for production").digest()
RUN = "run-2026-01-05-a"
SITES = ("site-01", "site-02", "site-03")
STEPS = 4
SAMPLE_SITE = SITES[0]
# Which check each tampered sample must fail (asserted by tests/test_audit.py).
EXPECTED_FAILURES = {
    "tampered-edit.jsonl": "hash-chain",
    "tampered-reformatted.jsonl": "canonical-json",
    "tampered-deleted-line.jsonl": "sequence",
    "tampered-reordered.jsonl": "sequence",
    "truncated.jsonl": "unsigned-tail",
}
# Tampered site-01 logs (verified with site-01-public-key.pem).
EXPECTED_SITE_FAILURES = {
    "site-01-tampered-edit.jsonl": "hash-chain",
    "site-01-tampered-deleted-line.jsonl": "sequence",
}
# Validly signed site logs that disagree with good.jsonl: (round, field) cross-check must name.
EXPECTED_CROSS_CHECK = {
    "site-01-dropped-frame.jsonl": (1, "ledger.up.frames"),
    "site-01-tail-mismatch.jsonl": (3, "tail.ledger.up.frames"),
}
ROUNDS = 3


def sample_key() -> Ed25519PrivateKey:
    return key_from_seed(SAMPLE_SEED)


def site_sample_key() -> Ed25519PrivateKey:
    return key_from_seed(SITE_SAMPLE_SEED)


def _frames(site: str, r: int) -> list[tuple[str, str, int, bytes]]:
    """The frames one site exchanged in round ``r`` of the sample run: (direction, type, step, bytes)."""
    out = []
    for i in range(STEPS):
        step = r * STEPS + i
        for direction, kind, size in (("up", "forward", 96), ("down", "features", 160), ("up", "backward", 160),
                                      ("down", "grad_input", 96)):
            seed = hashlib.sha256(f"{site}|{kind}|{step}".encode()).digest()
            out.append((direction, kind, step, (seed * (size // 32 + 1))[:size]))
    last = (r + 1) * STEPS - 1
    out += [("up", "round_end", last, hashlib.sha256(f"{site}|end|{r}".encode()).digest()),
            ("down", "round_sync", last, hashlib.sha256(f"{site}|sync|{r}".encode()).digest())]
    return out


def _tail_frames(site: str, rounds: int) -> list[tuple[str, str, int, bytes]]:
    """After the last round: the site validates through the backbone (one forward, its features back)."""
    last = rounds * STEPS - 1
    return [(direction, kind, last, hashlib.sha256(f"{site}|{kind}|tail".encode()).digest() * size)
            for direction, kind, size in (("up", "forward", 3), ("down", "features", 5))]


def _ledger(site: str, r: int, extra_up: bool = False, rounds: int = ROUNDS) -> dict[str, object]:
    """Ledger summary of ``site`` in round ``r`` (``r == rounds``: the run's tail); ``extra_up`` adds one
    up frame that never reached the server."""
    led = FrameLedger()
    frames = _frames(site, r) if r < rounds else _tail_frames(site, rounds)
    if extra_up:
        frames.insert(2, ("up", "backward", r * STEPS, b"a backward frame lost in transit"))
    for direction, kind, step, frame in frames:
        led.record(direction, kind, r, step, frame)
    return led.take(r)


def fixed_clock(start: datetime | None = None, step_s: int = 60) -> Clock:
    """A clock that advances ``step_s`` seconds per call, from a fixed start."""
    moments: Iterator[datetime] = (
        (start or datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)) + timedelta(seconds=step_s * i)
        for i in range(10**9))
    return lambda: next(moments)


def _h(label: str) -> str:
    return sha256_hex(label.encode())


def write_good_log(path: Path, key: Ed25519PrivateKey, rounds: int = ROUNDS) -> None:
    clock = fixed_clock()
    with AuditLog(path, key, clock=clock) as log:
        log.append(R.run_start(run_id=RUN, config_hash=_h("config"), software_version="0.1.0",
                               backbone_hash=_h("backbone-0"), aggregation_method="projection", sites=SITES, seed=0))
        for s in SITES:
            log.append(R.join(run_id=RUN, round=0, site_id=s))
        log.checkpoint()
        for r in range(rounds):
            started = R.iso_utc(clock())
            active = SITES if r != 1 else SITES[:2]
            if r == 1:
                log.append(R.dropout(run_id=RUN, round=r, site_id=SITES[2], reason="timeout"))
            sites = [R.SiteRound(site_id=s, steps=STEPS, samples=32 + 8 * i,
                                 epsilon=round(0.5 * (r + 1) + 0.1 * i, 6), delta=1e-5, ledger=_ledger(s, r),
                                 train_loss=round(1.25 - 0.3 * r + 0.1 * i, 6))
                     for i, s in enumerate(active)]
            agg = R.AggregationSummary(method="projection", steps=4, conflicting_pairs_total=r + 1,
                                       min_cosine=-0.25 + 0.05 * r, mean_cosine=0.125,
                                       mean_site_norms={s: 1.5 + 0.25 * i for i, s in enumerate(active)})
            ckpt = _h(f"checkpoint-{r}")
            log.append(R.checkpoint_write(run_id=RUN, round=r, role="server", checkpoint_hash=ckpt))
            log.append(R.round_record(run_id=RUN, round=r, started_at=started, ended_at=clock(), sites=sites,
                                      aggregation=agg, backbone_hash_before=_h(f"backbone-{r}"),
                                      backbone_hash_after=_h(f"backbone-{r + 1}"), checkpoint_hash=ckpt,
                                      config_hash=_h("config"), software_version="0.1.0"))
            log.checkpoint()
        log.append(R.run_end(run_id=RUN, rounds=rounds, sites={s: _ledger(s, rounds, rounds=rounds) for s in SITES},
                             backbone_hash=_h(f"backbone-{rounds}"), checkpoint_hash=_h(f"checkpoint-{rounds - 1}")))
        log.checkpoint()


def write_site_log(path: Path, key: Ed25519PrivateKey, rounds: int = ROUNDS,
                   extra_up_in_round: int | None = None) -> None:
    """site-01's own log of the sample run; ``extra_up_in_round``: the site sent one more frame than arrived."""
    clock = fixed_clock(datetime(2026, 1, 5, 9, 0, 30, tzinfo=timezone.utc))
    with SiteAuditTrail(path, key, run_id=RUN, site_id=SAMPLE_SITE, clock=clock) as trail:
        trail.start(round=0, config_hash=_h("site-01-config"))
        for r in range(rounds):
            ledger = _ledger(SAMPLE_SITE, r, extra_up=r == extra_up_in_round)
            trail.round_finished(r, steps=STEPS, samples=32, ledger=ledger, epsilon=round(0.5 * (r + 1), 6),
                                 delta=1e-5, checkpoint_hash=_h(f"site-01-checkpoint-{r}"))
        trail.run_finished(rounds, ledger=_ledger(SAMPLE_SITE, rounds, extra_up=rounds == extra_up_in_round,
                                                  rounds=rounds))


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")[:-1]


def _join(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def tampered_variants(good: bytes) -> dict[str, bytes]:
    """Byte-level tamperings of a good log (see :data:`EXPECTED_FAILURES`)."""
    lines = _lines(good)
    i = next(n for n, line in enumerate(lines) if b'"kind":"round"' in line)
    edited = json.loads(lines[i])
    edited["body"]["sites"][0]["samples"] += 1000
    reformatted = json.dumps(json.loads(lines[i]), sort_keys=True, ensure_ascii=False).encode()
    last_ckpt = max(n for n, line in enumerate(lines) if b'"kind":"log_checkpoint"' in line)
    return {
        "tampered-edit.jsonl": _join(lines[:i] + [canonical_json(edited)] + lines[i + 1:]),
        "tampered-reformatted.jsonl": _join(lines[:i] + [reformatted] + lines[i + 1:]),
        "tampered-deleted-line.jsonl": _join(lines[:i] + lines[i + 1:]),
        "tampered-reordered.jsonl": _join(lines[:i - 1] + [lines[i], lines[i - 1]] + lines[i + 1:]),
        "truncated.jsonl": _join(lines[:last_ckpt]),  # the last signed checkpoint cut off
    }


def site_tampered_variants(good: bytes) -> dict[str, bytes]:
    """Byte-level tamperings of the good site log (see :data:`EXPECTED_SITE_FAILURES`)."""
    lines = _lines(good)
    i = next(n for n, line in enumerate(lines) if b'"kind":"site_round"' in line)
    edited = json.loads(lines[i])
    edited["body"]["ledger"]["up"]["frames"] -= 1
    return {
        "site-01-tampered-edit.jsonl": _join(lines[:i] + [canonical_json(edited)] + lines[i + 1:]),
        "site-01-tampered-deleted-line.jsonl": _join(lines[:i] + lines[i + 1:]),
    }


def write_samples(out_dir: str | Path) -> list[Path]:
    """(Re)write every sample file into ``out_dir``; return the paths written."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    key = sample_key()
    good = d / "good.jsonl"
    good.unlink(missing_ok=True)
    write_good_log(good, key)
    written = [good]
    for name, data in tampered_variants(good.read_bytes()).items():
        (d / name).write_bytes(data)
        written.append(d / name)
    pem = d / "samples-public-key.pem"
    pem.write_bytes(public_pem(key.public_key()))
    written.append(pem)
    site_key = site_sample_key()
    site = d / f"{SAMPLE_SITE}.jsonl"
    site.unlink(missing_ok=True)
    write_site_log(site, site_key)
    written.append(site)
    for name, data in site_tampered_variants(site.read_bytes()).items():
        (d / name).write_bytes(data)
        written.append(d / name)
    for name, (rnd, _field) in EXPECTED_CROSS_CHECK.items():
        (d / name).unlink(missing_ok=True)
        write_site_log(d / name, site_key, extra_up_in_round=rnd)
        written.append(d / name)
    site_pem = d / f"{SAMPLE_SITE}-public-key.pem"
    site_pem.write_bytes(public_pem(site_key.public_key()))
    return written + [site_pem]


if __name__ == "__main__":
    for p in write_samples(sys.argv[1] if len(sys.argv) > 1 else "audit/samples"):
        print(p)
