"""Verify an audit log: canonical form, sequence, hash chain, signed checkpoints.

Protects the auditor against accepting an altered record. Every check that fails raises
:class:`AuditError` naming the 1-based line number and the check (``check`` attribute):

* ``empty`` -- the log has no records;
* ``torn-line`` -- the last line has no newline (crash mid-write, or cut mid-line);
* ``canonical-json`` -- a line is not the canonical JSON of its content (any edit, even of
  whitespace, key order or number formatting, counts as tampering);
* ``envelope`` -- a line is not a valid record (unknown kind, unknown or mistyped field);
* ``sequence`` -- ``seq`` is not the line's position (deletion, duplication, reordering);
* ``hash-chain`` -- ``prev`` is not the SHA-256 of the line before (a line was edited);
* ``checkpoint`` -- a checkpoint's count/head do not match the records before it;
* ``signature`` -- a checkpoint is signed by an unknown key or the signature is invalid;
* ``merkle`` -- a checkpoint's signed ``merkle_root`` is not the RFC 6962 tree hash of the
  lines before it;
* ``rounds`` -- within one run, a server ``round``/``round_backfill`` record does not follow
  the previous one's round + 1 (a round is missing -- e.g. a crash between the checkpoint
  and the round record that was never reconciled -- or recorded twice);
* ``run-end`` -- a run's closing ``run_end`` / ``site_run_end`` record does not close it: its
  ``rounds`` is not the number of rounds the log recorded for the run, a round record follows
  it, or the run is closed twice;
* ``unsigned-tail`` -- records follow the last signed checkpoint (truncation, an
  interrupted run, or a still-running one); raised only with ``require_complete=True``.

``signatures=False`` skips only the Ed25519 check (for ``cross-check`` without keys); every
other check, including each checkpoint's count and head, still runs.

Speed (``benchmarks/audit.py``: 30,000 lines, 10,000 signed checkpoints): each line is decoded
once and re-encoded once for the canonical-form check, its schema is checked by the generated,
copy-free :func:`~.records.conforms` (the full :func:`~.records.validate` runs only to name a
failure), and the cyclic garbage collector is paused while the records are built. About half
of what remains is the Ed25519 verification of every checkpoint.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gc
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .canonical import canonical_json, canonical_text, sha256_hex
from .errors import AuditError
from .log import VERSION, ZERO_HASH, checkpoint_payload
from .merkle import MerkleAccumulator
from .records import KINDS, LOG_CHECKPOINT, SERVER_ROUND_KINDS, SITE_ROUND_KINDS, conforms, validate

ENVELOPE_KEYS = {"v", "seq", "prev", "kind", "time", "body"}


@dataclass
class VerifyReport:
    """What a verified log contains. ``records`` holds the parsed envelopes in order."""

    path: str
    records: list[dict[str, Any]]
    signed_checkpoints: int
    unsigned_tail: int
    head: str
    key_ids: list[str]
    runs: list[str] = field(default_factory=list)
    rounds: dict[str, list[int]] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)
    epsilon: dict[str, list[tuple[str, int, float | None]]] = field(default_factory=dict)
    backfilled: dict[str, list[int]] = field(default_factory=dict)
    site_rounds: dict[str, list[int]] = field(default_factory=dict)  # site logs: run -> rounds with a site_round
    ended: dict[str, int] = field(default_factory=dict)  # run -> rounds, for runs closed by run_end / site_run_end
    interrupted: dict[str, list[int]] = field(default_factory=dict)  # run -> rounds a resumed server restarted
    signatures_checked: bool = True

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def open_runs(self) -> list[str]:
        """Runs without a closing record (still running, interrupted, or the log was cut at a checkpoint)."""
        return [run for run in self.runs if run not in self.ended]

    def summary(self) -> str:
        tail = f", unsigned tail: {self.unsigned_tail} records" if self.unsigned_tail else ""
        n_rounds = sum(len(r) for r in self.rounds.values())
        n_back = sum(len(r) for r in self.backfilled.values())
        back = f" ({n_back} back-filled after a crash)" if n_back else ""
        n_site = sum(len(r) for r in self.site_rounds.values())
        site = f", {n_site} site round(s)" if n_site else ""
        unsigned = "" if self.signatures_checked else " [signatures NOT checked: no public key given]"
        rounds = f", {n_rounds} round(s){back}" if n_rounds or not n_site else ""
        ended = f" ({len(self.ended)} closed by run_end)" if self.ended else ""
        n_int = sum(len(r) for r in self.interrupted.values())
        restarts = f", {n_int} round(s) restarted after an interruption" if n_int else ""
        return (f"{self.count} records, {self.signed_checkpoints} signed checkpoints, {len(self.runs)} run(s){ended}"
                f"{rounds}{restarts}{site}, {len(self.sites)} site(s){tail}; head {self.head}{unsigned}")


def _fail(path: Path, line: int, check: str, detail: str) -> AuditError:
    return AuditError(f"{path} line {line}: {check} check failed: {detail}", check=check, line=line)


def _no_constants(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)
# json.loads without its whitespace skipping (a canonical line has none); typeshed omits the attribute
_scan: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _parse(path: Path, raw: bytes, n: int) -> dict[str, Any]:
    """The envelope of line ``n``, checked for canonical form, envelope shape and record schema.

    The fast path decodes the line once, re-encodes it once (compared as text: equal text means
    equal UTF-8 bytes) and runs the copy-free schema check :func:`~.records.conforms`; anything
    it does not accept goes through :func:`_parse_strict`, which names the failure (or accepts a
    valid line the fast path is too strict for). The fast path never accepts more.
    """
    try:
        text = raw.decode("utf-8")
        env, end = _scan(text, 0)
        ok = end == len(text) and type(env) is dict and canonical_text(env) == text
    except (ValueError, StopIteration, RecursionError, AuditError):
        ok = False
    if (ok and env.keys() == ENVELOPE_KEYS and type(env["v"]) is int and env["v"] == VERSION
            and type(env["seq"]) is int and type(env["kind"]) is str):
        spec = KINDS.get(env["kind"])
        if spec is not None and conforms("time", env["time"]) and conforms(spec, env["body"]):
            result: dict[str, Any] = env
            return result
    return _parse_strict(path, raw, n)


def _parse_strict(path: Path, raw: bytes, n: int) -> dict[str, Any]:
    try:
        env = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
        canonical = canonical_json(env, parsed=True)
    except (ValueError, RecursionError, AuditError):
        raise _fail(path, n, "canonical-json", "line is not valid canonical JSON (edited or corrupted)") from None
    if canonical != raw:
        raise _fail(path, n, "canonical-json",
                    "line is not in canonical form (edited or re-formatted: whitespace, key order or number format)")
    if (not isinstance(env, dict) or set(env) != ENVELOPE_KEYS or type(env["v"]) is not int or env["v"] != VERSION
            or type(env["seq"]) is not int):
        raise _fail(path, n, "envelope", "not a version-1 audit envelope")
    if not isinstance(env["kind"], str) or env["kind"] not in KINDS:
        raise _fail(path, n, "envelope", f"unknown record kind {str(env['kind'])[:40]!r}")
    try:
        validate("time", env["time"], "time")
        validate(KINDS[env["kind"]], env["body"], env["kind"])
    except AuditError as exc:
        raise _fail(path, n, "envelope", str(exc)) from None
    return env


def check_checkpoint_signature(body: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> None:
    """Check one validated ``log_checkpoint`` body's signature; raise AuditError (check ``signature``)."""
    key = keys.get(body["key_id"])
    if key is None:
        raise AuditError(f"checkpoint signed by unknown key_id {body['key_id']}; "
                         f"public keys given: {', '.join(sorted(keys)) or 'none'}", check="signature")
    try:
        sig = base64.b64decode(body["signature"], validate=True)
        key.verify(sig, checkpoint_payload(body["count"], body["head"], body["key_id"], body["run_id"],
                                           body.get("merkle_root"), body.get("signed_at")))
    except (InvalidSignature, binascii.Error, ValueError):
        raise AuditError(f"invalid checkpoint signature for key_id {body['key_id']}", check="signature") from None


def _check_signature(path: Path, n: int, body: dict[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> None:
    try:
        check_checkpoint_signature(body, keys)
    except AuditError as exc:
        raise _fail(path, n, "signature", str(exc)) from None


def verify_log(path: str | Path, public_keys: Mapping[str, Ed25519PublicKey], *,
               require_complete: bool = True, signatures: bool = True, require_ended: bool = False) -> VerifyReport:
    """Check every line of the log at ``path``; raise AuditError on the first failure.

    ``require_ended``: also fail (check ``run-end``) when a run in the log has no closing
    ``run_end`` / ``site_run_end`` record. A log cut at a signed checkpoint is a valid log of a
    shorter run; only the closing record tells an auditor that the run reached its end, so use
    this for a run known to be finished.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read audit log {p}: {exc.strerror}", check="read") from None
    if not data:
        raise AuditError(f"{p}: empty check failed: the log has no records", check="empty", line=0)
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise _fail(p, len(lines), "torn-line", "last line has no newline (crash mid-write or cut mid-line)")
    lines.pop()
    with _gc_paused():
        report = _verify_lines(p, lines, public_keys, require_complete=require_complete, signatures=signatures)
    if require_ended and report.open_runs:
        raise _fail(p, len(lines), "run-end", f"run(s) {', '.join(report.open_runs)} have no run_end record: still "
                    "running, interrupted before the last round, or the log was cut at a signed checkpoint")
    return report


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a log is parsed.

    Verification allocates millions of small containers (the parsed records, kept for the
    report) and creates no reference cycles; left on, the collector re-scans the growing heap
    again and again, which costs a fifth to a third of the verification time. Reference
    counting still frees everything as usual. On the way out, ``freeze``/``unfreeze`` moves
    the tracked objects into the oldest generation without scanning them (where the collector
    would move these long-lived records anyway, after two more scans); cycles among them, if
    any, are still found by the next full collection. Skipped when the process keeps frozen
    objects of its own (``gc.freeze()`` before forking), which ``unfreeze`` would release.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
        if enabled:
            gc.enable()


def _verify_lines(p: Path, lines: list[bytes], public_keys: Mapping[str, Ed25519PublicKey], *,
                  require_complete: bool, signatures: bool) -> VerifyReport:
    records: list[dict[str, Any]] = []
    prev, last_signed, key_ids = ZERO_HASH, 0, set()
    n_checkpoints = 0
    last_round: dict[str, int] = {}
    ended: dict[tuple[str, str], int] = {}  # (run, "" for the server or site id) -> line of its closing record
    state: dict[str, _Boundary] = {}  # run -> the backbone and checkpoint at its last round boundary
    tree = MerkleAccumulator()
    for n, raw in enumerate(lines, start=1):
        env = _parse(p, raw, n)
        if env["seq"] != n - 1:
            raise _fail(p, n, "sequence", f"expected seq {n - 1}, found {env['seq']} "
                        "(a record was deleted, duplicated or reordered)")
        if env["prev"] != prev:
            raise _fail(p, n, "hash-chain", f"prev does not match the SHA-256 of line {n - 1} "
                        "(that line, or this one, was altered)" if n > 1 else "first record must have prev = 0*64")
        if env["kind"] == LOG_CHECKPOINT:
            body = env["body"]
            if body["count"] != env["seq"] or body["head"] != prev:
                raise _fail(p, n, "checkpoint", f"checkpoint covers count {body['count']} / head {body['head'][:16]}… "
                            f"but {env['seq']} records precede it with head {prev[:16]}…")
            if "signed_at" in body and body["signed_at"] != env["time"]:
                raise _fail(p, n, "checkpoint", "the checkpoint's time differs from the time it signed (altered)")
            if signatures:
                _check_signature(p, n, body, public_keys)
            if "merkle_root" in body and body["merkle_root"] != tree.root().hex():
                raise _fail(p, n, "merkle", f"signed merkle_root {body['merkle_root'][:16]}… is not the tree hash "
                            f"of the {body['count']} lines before the checkpoint")
            key_ids.add(body["key_id"])
            n_checkpoints += 1
            last_signed = n
        if env["kind"] in RUN_END_CHECKED:
            _check_run_end(p, n, env, last_round, ended)
        if env["kind"] in SERVER_ROUND_KINDS:
            run, rnd = env["body"]["run_id"], env["body"]["round"]
            before = last_round.get(run)
            if before is not None and rnd != before + 1:
                what = (f"round {rnd} is recorded again" if rnd <= before else
                        f"round(s) {before + 1}..{rnd - 1} have no record (never reconciled after a crash, or deleted "
                        "and re-chained)")
                raise _fail(p, n, "rounds", f"run {run}: round {rnd} follows round {before}: {what}")
            last_round[run] = rnd
        if env["kind"] in CONTINUITY_CHECKED:
            _check_continuity(p, n, env, last_round, state)
        records.append(env)
        prev = sha256_hex(raw)
        tree.add_line(raw)
    tail = len(lines) - last_signed
    if tail and require_complete:
        raise _fail(p, last_signed + 1, "unsigned-tail",
                    f"unsigned tail: {tail} records after the last signed checkpoint "
                    f"({'line ' + str(last_signed) if last_signed else 'none'}); the log was truncated or the run was "
                    "interrupted (use --allow-unsigned-tail to inspect it)")
    report = VerifyReport(str(p), records, n_checkpoints, tail, prev, sorted(key_ids), signatures_checked=signatures)
    _summarise(report)
    return report


RUN_END_CHECKED = frozenset(("run_end", "site_run_end", "round_interrupted", "site_round_interrupted",
                             *SERVER_ROUND_KINDS, *SITE_ROUND_KINDS))
CONTINUITY_CHECKED = frozenset(("run_start", "round", "round_backfill", "round_interrupted", "run_end"))


@dataclass
class _Boundary:
    """What a server log says about one run at its last round boundary (None: not recorded there)."""

    backbone: str | None
    checkpoint: str | None
    line: int
    what: str


def _check_continuity(p: Path, n: int, env: dict[str, Any], last_round: dict[str, int],
                      state: dict[str, _Boundary]) -> None:
    """Backbone (and checkpoint) continuity of one run across its round boundaries and resumes.

    Each round starts from the backbone the previous round (or run_start, or the resume record) ended
    with; a ``round_interrupted`` (written at a resume) names the checkpoint file and backbone the server
    restarted from, which must be those the last round record (or back-fill) recorded; ``run_end`` names
    the final ones. A back-filled round without a backbone hash leaves the backbone unknown until the next
    record that names one. A mismatch means the server resumed from another state than the one it
    recorded (e.g. a modified checkpoint), or records were altered by the key holder.
    """
    kind, body = env["kind"], env["body"]
    run = body["run_id"]
    prev = state.get(run)
    if kind == "run_start":
        state[run] = _Boundary(body["backbone_hash"], None, n, "run_start")
        return
    if kind == "round_interrupted":
        last = last_round.get(run)
        if last is not None and body["round"] != last + 1:
            raise _fail(p, n, "rounds", f"run {run}: the server resumed at round {body['round']} but the log's last "
                        f"round is {last} (it should resume at round {last + 1})")
    starts, what = {"round": (body.get("backbone_hash_before"), f"round {body.get('round')} starts from"),
                    "round_interrupted": (body.get("backbone_hash"), f"the resume at round {body.get('round')} loaded"),
                    "run_end": (body.get("backbone_hash"), "run_end names as the final")}.get(kind, (None, ""))
    if prev is not None and prev.backbone is not None and starts is not None and starts != prev.backbone:
        raise _fail(p, n, "backbone", f"run {run}: {what} backbone {starts[:16]}…, but {prev.what} on line "
                    f"{prev.line} ended with {prev.backbone[:16]}… (the server continued from another state than the "
                    "one it recorded, e.g. a modified checkpoint, or a record was altered)")
    ckpt = body.get("checkpoint_hash")
    if (kind in ("round_interrupted", "run_end") and prev is not None and prev.checkpoint is not None
            and ckpt is not None and ckpt != prev.checkpoint):
        what = "the server resumed from" if kind == "round_interrupted" else "run_end names"
        raise _fail(p, n, "checkpoint-hash", f"run {run}: {what} checkpoint {ckpt[:16]}…, but {prev.what} on line "
                    f"{prev.line} recorded checkpoint {prev.checkpoint[:16]}… (a modified or replaced checkpoint)")
    if kind == "round":
        state[run] = _Boundary(body["backbone_hash_after"], body["checkpoint_hash"], n, f"round {body['round']}")
    elif kind == "round_backfill":
        state[run] = _Boundary(body["backbone_hash"], body["checkpoint_hash"], n,
                               f"the back-filled round {body['round']}")
    elif kind == "round_interrupted":
        state[run] = _Boundary(body["backbone_hash"], body["checkpoint_hash"], n,
                               f"the resume at round {body['round']}")


def _check_run_end(p: Path, n: int, env: dict[str, Any], last_round: dict[str, int],
                   ended: dict[tuple[str, str], int]) -> None:
    """A run is closed once per party, after its last round, and nothing of that party's rounds follows."""
    kind, body = env["kind"], env["body"]
    run = body["run_id"]
    party = body["site_id"] if kind.startswith("site_") else ""
    closed = ended.get((run, party))
    if closed is not None:
        what = "closed again" if kind.endswith("run_end") else f"given a {kind} record"
        raise _fail(p, n, "run-end", f"run {run} was closed by the run_end record on line {closed} and is {what}")
    if kind == "run_end":
        done = last_round.get(run, -1) + 1
        if body["rounds"] != done:
            raise _fail(p, n, "run-end", f"run {run}: run_end says {body['rounds']} round(s), the log recorded {done}")
    if kind.endswith("run_end"):
        ended[(run, party)] = n


def _summarise(report: VerifyReport) -> None:
    sites: set[str] = set()
    for env in report.records:
        body = env["body"]
        run = body["run_id"]
        if run not in report.runs:
            report.runs.append(run)
        if "site_id" in body:
            sites.add(body["site_id"])
        if env["kind"] in SERVER_ROUND_KINDS:
            report.rounds.setdefault(run, []).append(body["round"])
        if env["kind"] == "round_backfill":
            report.backfilled.setdefault(run, []).append(body["round"])
        if env["kind"] == "round_interrupted":
            report.interrupted.setdefault(run, []).append(body["round"])
        if env["kind"] == "round":
            for s in body["sites"]:
                sites.add(s["site_id"])
                report.epsilon.setdefault(s["site_id"], []).append((run, body["round"], s["epsilon"]))
        if env["kind"] in ("run_end", "site_run_end"):
            report.ended[run] = body["rounds"]
        if env["kind"] == "site_round":
            report.site_rounds.setdefault(run, []).append(body["round"])
            report.epsilon.setdefault(body["site_id"], []).append((run, body["round"], body["epsilon"]))
    report.sites = sorted(sites)
