"""Audit record kinds and their builders, validated at construction.

Protects against malformed or over-sharing records. The set of kinds is closed; each
kind's body has a fixed set of typed fields and anything else (an unknown field, a wrong
type, a NaN) is refused before it reaches the log. Records hold only identifiers, counts,
hashes and statistics -- never patient data, tensors, file names or DICOM header values.

As a *cheap guard* (not a guarantee) against leaking file names, every string is refused
if it is longer than 256 characters or looks like a file path (contains ``/`` or ``\\``,
starts with ``~``, a drive letter or ``.``, or ends in a common data/image file extension).
A determined caller can still put identifying text in a short string such as a site id;
choosing pseudonymous identifiers remains the operator's duty.

Server-log kinds: run_start, join, leave, dropout, round (per site: steps, samples, ε/δ, the
frame-ledger summary and, optionally, the site's self-reported training loss), round_backfill,
step_skipped, config_change, key_rotation, revocation, checkpoint_write, round_interrupted (a resume:
the checkpoint and backbone it starts from, and that the interrupted attempt's frames are not booked),
run_end (the run's last record: what each site exchanged after the last round closed). Site-log kinds:
site_run_start, site_round, site_round_backfill, site_round_interrupted (frames of an exchange the site
abandoned to join again), site_run_end (and leave). Both: log_checkpoint (signed; carries
the RFC 6962 merkle_root).

The same field table generates ``audit/schema.json`` (JSON Schema draft 2020-12), so the
schema and the code cannot drift apart (a test checks the committed file).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .errors import AuditError

MAX_STR = 256
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
SIG_RE = re.compile(r"^[A-Za-z0-9+/]{86}==$")  # base64 of a 64-byte Ed25519 signature
TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
_EXT = ("dcm|dicom|png|jpe?g|tiff?|bmp|gif|nii|gz|npy|npz|pt|pth|ckpt|json|jsonl|csv|tsv|txt|ya?ml|zip|tar|"
        "h5|hdf5|mat|img|pkl|pickle|e2e|fds|vol|pdf|xml")
_PATHLIKE = re.compile(rf"[/\\]|^~|^[A-Za-z]:|^\.|\.(?:{_EXT})$", re.IGNORECASE)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso_utc(moment: datetime) -> str:
    """ISO-8601 UTC with microseconds and a ``Z`` suffix; naive datetimes are refused."""
    if moment.tzinfo is None:
        raise AuditError("audit clock returned a naive datetime; it must be timezone-aware (UTC)")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Field types: "str", "str?", "int", "int?", "float", "float?", "bool", "hash", "hash?", "time", "sig",
# ("list", T), ("map", T) (str keys), ("opt", T) (a field that may be absent: added after v1 records
# were first written, so older lines without it still verify; writers omit it when its value is None),
# and dict = object with exactly these fields.
Spec = Any

# What one end of a site<->server connection exchanged in one direction during one round
# (see fedbone_med/audit/ledger.py for how ``digest`` is computed).
LEDGER_DIRECTION: dict[str, Spec] = {
    "frames": "int", "bytes": "int", "digest": "hash", "types": ("map", "int"),
}
LEDGER: dict[str, Spec] = {"up": LEDGER_DIRECTION, "down": LEDGER_DIRECTION}

# train_loss: the site's mean training loss over its steps of the round, as the site reported it
# (an aggregate, not patient data); optional, so round records written before it existed still verify.
SITE_ROUND: dict[str, Spec] = {
    "site_id": "str", "cert_fingerprint": "str?", "steps": "int", "samples": "int",
    "epsilon": "float?", "delta": "float?", "ledger": ("opt", LEDGER), "train_loss": ("opt", "float?"),
}
AGGREGATION: dict[str, Spec] = {
    "method": "str", "steps": "int", "conflicting_pairs_total": "int", "min_cosine": "float?",
    "mean_cosine": "float?", "mean_site_norms": ("map", "float"),
}
# run_end: per site, the frame-ledger summary of the exchange *after* the last round closed (the
# reply to the last report, the last sync, the last validation), booked under round = rounds.
RUN_END_SITE: dict[str, Spec] = {"site_id": "str", "ledger": LEDGER}
LOG_CHECKPOINT = "log_checkpoint"
SERVER_ROUND_KINDS = ("round", "round_backfill")  # one per round of a run, contiguous (checked by verify)
SITE_ROUND_KINDS = ("site_round", "site_round_backfill")
KINDS: dict[str, dict[str, Spec]] = {
    "run_start": {"run_id": "str", "config_hash": "hash", "software_version": "str", "backbone_hash": "hash",
                  "aggregation_method": "str", "sites": ("list", "str"), "seed": "int?"},
    "join": {"run_id": "str", "round": "int", "site_id": "str", "cert_fingerprint": "str?"},
    "leave": {"run_id": "str", "round": "int", "site_id": "str", "reason": "str"},
    "dropout": {"run_id": "str", "round": "int", "site_id": "str", "reason": "str"},
    "round": {"run_id": "str", "round": "int", "started_at": "time", "ended_at": "time",
              "sites": ("list", SITE_ROUND), "aggregation": AGGREGATION, "backbone_hash_before": "hash",
              "backbone_hash_after": "hash", "checkpoint_hash": "hash?", "config_hash": "hash",
              "software_version": "str"},
    "step_skipped": {"run_id": "str", "round": "int", "step": "int", "reason": "str", "sites": ("list", "str")},
    "config_change": {"run_id": "str", "round": "int", "config_hash_before": "hash", "config_hash_after": "hash",
                      "changed_keys": ("list", "str")},
    "key_rotation": {"run_id": "str", "old_key_id": "str", "new_key_id": "str"},
    "revocation": {"run_id": "str", "site_id": "str", "cert_fingerprint": "str?", "reason": "str"},
    "checkpoint_write": {"run_id": "str", "round": "int", "role": "str", "checkpoint_hash": "hash"},
    # Written by ServerAuditTrail.reconcile() when the server checkpoint holds a round the log lacks
    # (crash between the checkpoint write and the round record). Flagged as recovered: no per-site data.
    "round_backfill": {"run_id": "str", "round": "int", "checkpoint_hash": "hash?", "backbone_hash": "hash?",
                       "step": "int?", "log_last_round": "int?", "reason": "str"},
    # Written by ServerAuditTrail.resume() at every --resume, after the log was verified and the checkpoint
    # found to be the one it recorded: the attempt of `round` under way when the previous launch stopped is
    # not booked (its frame ledgers, for ledger rounds `round` and `round` + 1, were in memory only); the round
    # restarts from this checkpoint and backbone, which verify checks against the last round record.
    "round_interrupted": {"run_id": "str", "round": "int", "step": "int?", "checkpoint_hash": "hash",
                          "backbone_hash": "hash", "reason": "str"},
    # The run's closing record, once all of its rounds are complete: `rounds` rounds were trained
    # (ledger round `rounds` is the tail after the last round), the final backbone and checkpoint.
    "run_end": {"run_id": "str", "rounds": "int", "sites": ("list", RUN_END_SITE), "backbone_hash": "hash",
                "checkpoint_hash": "hash?"},
    # ---- site-side log (SiteAuditTrail) ----
    "site_run_start": {"run_id": "str", "site_id": "str", "round": "int", "software_version": "str",
                       "config_hash": "hash?", "cert_fingerprint": "str?", "server_fingerprint": "str?"},
    "site_round": {"run_id": "str", "site_id": "str", "round": "int", "steps": "int", "samples": "int",
                   "epsilon": "float?", "delta": "float?", "ledger": LEDGER, "checkpoint_hash": "hash?"},
    "site_round_backfill": {"run_id": "str", "site_id": "str", "round": "int", "checkpoint_hash": "hash?",
                            "log_last_round": "int?", "reason": "str"},
    # Written when the site abandons an exchange (the connection failed, e.g. the server restarted) and joins
    # again: `round` = the round it was in, `rejoined_round` = the round the server admitted it to, `ledgers` =
    # what it had booked and will not put in any site_round (per ledger round). cross-check shows them.
    "site_round_interrupted": {"run_id": "str", "site_id": "str", "round": "int", "rejoined_round": "int",
                               "ledgers": ("list", {"round": "int", "ledger": LEDGER}), "reason": "str"},
    # The site's closing record: its side of the run_end tail (compared by cross-check).
    "site_run_end": {"run_id": "str", "site_id": "str", "rounds": "int", "ledger": LEDGER},
    # merkle_root: RFC 6962 tree hash of the `count` lines before the checkpoint (see merkle.py); signed too.
    # signed_at: the checkpoint record's own time, signed too (so the last line's time cannot be edited).
    LOG_CHECKPOINT: {"count": "int", "head": "hash", "key_id": "str", "run_id": "str", "signature": "sig",
                     "merkle_root": ("opt", "hash"), "signed_at": ("opt", "str")},
}


@dataclass(frozen=True)
class Record:
    """A validated record body of one kind, ready to append to an :class:`AuditLog`."""

    kind: str
    body: dict[str, Any]


@dataclass(frozen=True)
class SiteRound:
    """One site's participation in a round (pseudonymous id; ε/δ as reported by the site)."""

    site_id: str
    steps: int
    samples: int
    epsilon: float | None = None
    delta: float | None = None
    cert_fingerprint: str | None = None
    ledger: Mapping[str, Any] | None = None  # FrameLedger summary {"up": {...}, "down": {...}} or None
    train_loss: float | None = None  # the site's mean training loss in the round, self-reported; None: omitted


@dataclass(frozen=True)
class AggregationSummary:
    """Gradient-aggregation statistics of one round (no gradients, only summary numbers)."""

    method: str
    steps: int
    conflicting_pairs_total: int
    min_cosine: float | None
    mean_cosine: float | None
    mean_site_norms: Mapping[str, float]


def check_string(value: str, path: str) -> str:
    if len(value) > MAX_STR:
        raise AuditError(f"record field {path}: string longer than {MAX_STR} characters refused")
    if _PATHLIKE.search(value):
        raise AuditError(f"record field {path}: value looks like a file path or file name; "
                         "audit records must hold identifiers only")
    return value


def _scalar(spec: str, value: Any, path: str) -> Any:
    base, nullable = spec.rstrip("?"), spec.endswith("?")
    if value is None:
        if nullable:
            return None
        raise AuditError(f"record field {path}: null not allowed")
    if base in ("int", "float") and isinstance(value, bool):
        raise AuditError(f"record field {path}: expected {base}, got bool")
    if base == "int":
        if not isinstance(value, int) or value < 0:
            raise AuditError(f"record field {path}: expected a non-negative integer")
        return int(value)
    if base == "float":
        try:
            finite = isinstance(value, (int, float)) and math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise AuditError(f"record field {path}: expected a finite number")
        return float(value)
    if base == "bool":
        if not isinstance(value, bool):
            raise AuditError(f"record field {path}: expected a boolean")
        return value
    if not isinstance(value, str):
        raise AuditError(f"record field {path}: expected a string, got {type(value).__name__}")
    if base == "hash" and not HASH_RE.match(value):
        raise AuditError(f"record field {path}: expected 64 lowercase hex characters (SHA-256)")
    if base == "sig" and not SIG_RE.match(value):
        raise AuditError(f"record field {path}: expected a base64 Ed25519 signature (88 characters)")
    if base == "time" and not TIME_RE.match(value):
        raise AuditError(f"record field {path}: expected ISO-8601 UTC time like 2026-01-31T12:00:00.000000Z")
    return check_string(value, path) if base == "str" else value


_PLAIN = (dict, list, str, int, float, bool, type(None))


def _optional(spec: Spec) -> bool:
    return isinstance(spec, tuple) and spec[0] == "opt"


Validator = Callable[[Any, str], Any]
_COMPILED: dict[int, tuple[Spec, Validator]] = {}


def validate(spec: Spec, value: Any, path: str) -> Any:
    """Return a normalised copy of ``value`` checked against ``spec`` or raise AuditError.

    Each spec is compiled once into nested closures (verification checks every line of
    logs with 10^4-10^5 records); the cache holds the spec itself, so its id stays unique.
    """
    entry = _COMPILED.get(id(spec))
    if entry is None or entry[0] is not spec:
        entry = _COMPILED[id(spec)] = (spec, _compile(spec))
    return entry[1](value, path)


def _plain(value: Any) -> Any:
    if not isinstance(value, _PLAIN) and dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _compile(spec: Spec) -> Validator:
    if isinstance(spec, dict):
        return _compile_object(spec)
    if isinstance(spec, tuple):
        container, inner = spec
        check = _compile(inner)
        if container == "list":
            def check_list(value: Any, path: str) -> Any:
                value = _plain(value)
                if not isinstance(value, (list, tuple)):
                    raise AuditError(f"record field {path}: expected a list")
                return [check(v, f"{path}[{i}]") for i, v in enumerate(value)]
            return check_list

        def check_map(value: Any, path: str) -> Any:
            value = _plain(value)
            if not isinstance(value, Mapping):
                raise AuditError(f"record field {path}: expected an object")
            out: dict[str, Any] = {}
            for k, v in sorted(value.items(), key=lambda kv: str(kv[0])):
                if not isinstance(k, str):
                    raise AuditError(f"record field {path}: object keys must be strings")
                out[check_string(k, f"{path} key")] = check(v, f"{path}.{k}")
            return out
        return check_map
    base = spec.rstrip("?")
    if base == "int":
        def check_int(value: Any, path: str) -> Any:
            return value if type(value) is int and value >= 0 else _scalar(spec, value, path)
        return check_int
    if base == "float":
        def check_float(value: Any, path: str) -> Any:
            return value if type(value) is float and math.isfinite(value) else _scalar(spec, value, path)
        return check_float
    if base == "hash":
        def check_hash(value: Any, path: str) -> Any:
            return value if type(value) is str and HASH_RE.match(value) else _scalar(spec, value, path)
        return check_hash
    return lambda value, path: _scalar(spec, value, path)


def _compile_object(spec: dict[str, Spec]) -> Validator:
    keys = spec.keys()
    fields = [(k, _compile(s[1] if _optional(s) else s), _optional(s)) for k, s in spec.items()]

    def check_object(value: Any, path: str) -> Any:
        value = _plain(value)
        if not isinstance(value, Mapping):
            raise AuditError(f"record field {path}: expected an object")
        if value.keys() - keys:
            unknown = sorted(map(str, value.keys() - keys))
            raise AuditError(f"record field {path}: unknown field(s) {', '.join(unknown)}")
        out: dict[str, Any] = {}
        for k, check, optional in fields:
            if optional:
                if value.get(k) is None:  # absent and None are the same: omitted
                    continue
            elif k not in value:
                missing = sorted(k for k, s in spec.items() if k not in value and not _optional(s))
                raise AuditError(f"record field {path}: missing field(s) {', '.join(missing)}")
            out[k] = check(value[k], f"{path}.{k}")
        return out
    return check_object


# ---- fast conformance check (verification) ----
#
# ``validate`` builds a normalised copy and formats a field path for every value: what a record
# builder needs, but most of the cost of verifying a long log. ``conforms`` answers only "would
# ``validate`` accept this value as it is?" for values made of plain JSON types (what
# ``json.loads`` returns), with no copies, paths or sorting. It is conservative: True only when
# ``validate`` accepts the value; False means "call ``validate``", which then raises the precise
# error (or accepts an unusual but valid value, e.g. an integer in a float field).
#
# Each spec is turned once into the source of one flat Python function (like ``dataclasses``
# does for ``__init__``): one ``if`` per field, no call per value. The generated code uses only
# the spec's field names (fixed identifiers from KINDS, written with ``repr``) and the checks
# below; tests compare it with ``validate`` on valid and broken records.

Check = Callable[[Any], bool]
_FAST: dict[int, tuple[Spec, Check]] = {}
_GOOD_STRINGS: set[str] = set()  # strings that passed check_string (ids, versions, methods repeat a lot)
_GOOD_STRINGS_MAX = 4096


def _str_ok(value: str) -> bool:
    """check_string as a predicate, remembering accepted strings (a pure function of the string)."""
    if len(value) > MAX_STR or _PATHLIKE.search(value):
        return False
    if len(_GOOD_STRINGS) < _GOOD_STRINGS_MAX:
        _GOOD_STRINGS.add(value)
    return True


_SCALAR_TEST = {  # failure condition of each scalar type for a value named {v} (None handled by the caller)
    "int": "type({v}) is not int or {v} < 0",
    "float": "type({v}) is not float or {v} - {v} != 0.0",  # x - x is NaN for NaN and +-inf
    "bool": "type({v}) is not bool",
    "str": "type({v}) is not str or ({v} not in _good and not _str_ok({v}))",
    "hash": "type({v}) is not str or _hash({v}) is None",
    "time": "type({v}) is not str or _time({v}) is None",
    "sig": "type({v}) is not str or _sig({v}) is None",
}


def conforms(spec: Spec, value: Any) -> bool:
    """True when :func:`validate` would accept ``value`` (plain JSON types) unchanged; see the comment above."""
    entry = _FAST.get(id(spec))
    if entry is None or entry[0] is not spec:
        entry = _FAST[id(spec)] = (spec, _compile_fast(spec))
    return entry[1](value)


def _compile_fast(spec: Spec) -> Check:
    names: dict[str, Any] = {"_good": _GOOD_STRINGS, "_str_ok": _str_ok, "_hash": HASH_RE.match,
                             "_time": TIME_RE.match, "_sig": SIG_RE.match}
    lines = ["def conforms(v0):"]
    counter = iter(range(1, 10**6))

    def emit(spec: Spec, var: str, indent: str) -> None:
        if isinstance(spec, str):
            test = _SCALAR_TEST[spec.rstrip("?")].format(v=var)
            if spec.endswith("?"):
                lines.append(f"{indent}if {var} is not None and ({test}): return False")
            else:
                lines.append(f"{indent}if {test}: return False")
        elif isinstance(spec, dict):
            n = next(counter)
            names[f"K{n}"] = frozenset(spec)
            names[f"R{n}"] = frozenset(k for k, s in spec.items() if not _optional(s))
            lines.append(f"{indent}if type({var}) is not dict: return False")
            if any(_optional(s) for s in spec.values()):
                lines.append(f"{indent}if not ({var}.keys() <= K{n} and R{n} <= {var}.keys()): return False")
            else:
                lines.append(f"{indent}if {var}.keys() != K{n}: return False")
            for k, s in spec.items():
                field = f"v{next(counter)}"
                if _optional(s):  # absent and None are the same: omitted
                    lines.append(f"{indent}{field} = {var}.get({k!r})")
                    lines.append(f"{indent}if {field} is not None:")
                    emit(s[1], field, indent + "    ")
                else:
                    lines.append(f"{indent}{field} = {var}[{k!r}]")
                    emit(s, field, indent)
        else:
            container, inner = spec
            item = f"v{next(counter)}"
            if container == "list":
                lines.append(f"{indent}if type({var}) is not list: return False")
                lines.append(f"{indent}for {item} in {var}:")
            else:
                key = f"v{next(counter)}"
                lines.append(f"{indent}if type({var}) is not dict: return False")
                lines.append(f"{indent}for {key}, {item} in {var}.items():")
                lines.append(f"{indent}    if {_SCALAR_TEST['str'].format(v=key)}: return False")
            emit(inner, item, indent + "    ")

    emit(spec, "v0", "    ")
    lines.append("    return True")
    exec(compile("\n".join(lines), f"<audit record check {_spec_name(spec)}>", "exec"), names)
    check: Check = names["conforms"]
    check.__doc__ = "\n".join(lines)  # the generated source, for reading and debugging
    return check


def _spec_name(spec: Spec) -> str:
    for kind, s in KINDS.items():
        if s is spec:
            return kind
    return spec if isinstance(spec, str) else type(spec).__name__


def make(kind: str, **fields: Any) -> Record:
    """Build a record of ``kind`` from keyword fields (unknown or missing fields refused)."""
    if kind not in KINDS:
        raise AuditError(f"unknown audit record kind {kind!r}; known: {', '.join(KINDS)}")
    return Record(kind, validate(KINDS[kind], fields, kind))


def _time(value: str | datetime) -> str:
    return iso_utc(value) if isinstance(value, datetime) else value


def run_start(*, run_id: str, config_hash: str, software_version: str, backbone_hash: str,
              aggregation_method: str, sites: Sequence[str], seed: int | None = None) -> Record:
    return make("run_start", run_id=run_id, config_hash=config_hash, software_version=software_version,
                backbone_hash=backbone_hash, aggregation_method=aggregation_method, sites=list(sites), seed=seed)


def join(*, run_id: str, round: int, site_id: str, cert_fingerprint: str | None = None) -> Record:
    return make("join", run_id=run_id, round=round, site_id=site_id, cert_fingerprint=cert_fingerprint)


def leave(*, run_id: str, round: int, site_id: str, reason: str) -> Record:
    return make("leave", run_id=run_id, round=round, site_id=site_id, reason=reason)


def dropout(*, run_id: str, round: int, site_id: str, reason: str) -> Record:
    return make("dropout", run_id=run_id, round=round, site_id=site_id, reason=reason)


def round_record(*, run_id: str, round: int, started_at: str | datetime, ended_at: str | datetime,
                 sites: Sequence[SiteRound | Mapping[str, Any]], aggregation: AggregationSummary | Mapping[str, Any],
                 backbone_hash_before: str, backbone_hash_after: str, checkpoint_hash: str | None,
                 config_hash: str, software_version: str) -> Record:
    return make("round", run_id=run_id, round=round, started_at=_time(started_at), ended_at=_time(ended_at),
                sites=list(sites), aggregation=aggregation, backbone_hash_before=backbone_hash_before,
                backbone_hash_after=backbone_hash_after, checkpoint_hash=checkpoint_hash, config_hash=config_hash,
                software_version=software_version)


def step_skipped(*, run_id: str, round: int, step: int, reason: str, sites: Sequence[str]) -> Record:
    return make("step_skipped", run_id=run_id, round=round, step=step, reason=reason, sites=list(sites))


def config_change(*, run_id: str, round: int, config_hash_before: str, config_hash_after: str,
                  changed_keys: Sequence[str]) -> Record:
    return make("config_change", run_id=run_id, round=round, config_hash_before=config_hash_before,
                config_hash_after=config_hash_after, changed_keys=list(changed_keys))


def key_rotation(*, run_id: str, old_key_id: str, new_key_id: str) -> Record:
    return make("key_rotation", run_id=run_id, old_key_id=old_key_id, new_key_id=new_key_id)


def revocation(*, run_id: str, site_id: str, reason: str, cert_fingerprint: str | None = None) -> Record:
    return make("revocation", run_id=run_id, site_id=site_id, cert_fingerprint=cert_fingerprint, reason=reason)


def checkpoint_write(*, run_id: str, round: int, role: str, checkpoint_hash: str) -> Record:
    return make("checkpoint_write", run_id=run_id, round=round, role=role, checkpoint_hash=checkpoint_hash)


def round_backfill(*, run_id: str, round: int, reason: str, checkpoint_hash: str | None = None,
                   backbone_hash: str | None = None, step: int | None = None,
                   log_last_round: int | None = None) -> Record:
    return make("round_backfill", run_id=run_id, round=round, checkpoint_hash=checkpoint_hash,
                backbone_hash=backbone_hash, step=step, log_last_round=log_last_round, reason=reason)


def round_interrupted(*, run_id: str, round: int, checkpoint_hash: str, backbone_hash: str, reason: str,
                      step: int | None = None) -> Record:
    return make("round_interrupted", run_id=run_id, round=round, step=step, checkpoint_hash=checkpoint_hash,
                backbone_hash=backbone_hash, reason=reason)


def site_round_interrupted(*, run_id: str, site_id: str, round: int, rejoined_round: int,
                           ledgers: Mapping[int, Mapping[str, Any]], reason: str) -> Record:
    """``ledgers``: ledger round -> frame-ledger summary of what the site booked in the abandoned exchange."""
    return make("site_round_interrupted", run_id=run_id, site_id=site_id, round=round, rejoined_round=rejoined_round,
                ledgers=[{"round": r, "ledger": led} for r, led in sorted(ledgers.items())], reason=reason)


def site_run_start(*, run_id: str, site_id: str, round: int, software_version: str, config_hash: str | None = None,
                   cert_fingerprint: str | None = None, server_fingerprint: str | None = None) -> Record:
    return make("site_run_start", run_id=run_id, site_id=site_id, round=round, software_version=software_version,
                config_hash=config_hash, cert_fingerprint=cert_fingerprint, server_fingerprint=server_fingerprint)


def site_round(*, run_id: str, site_id: str, round: int, steps: int, samples: int, ledger: Mapping[str, Any],
               epsilon: float | None = None, delta: float | None = None,
               checkpoint_hash: str | None = None) -> Record:
    return make("site_round", run_id=run_id, site_id=site_id, round=round, steps=steps, samples=samples,
                epsilon=epsilon, delta=delta, ledger=ledger, checkpoint_hash=checkpoint_hash)


def site_round_backfill(*, run_id: str, site_id: str, round: int, reason: str, checkpoint_hash: str | None = None,
                        log_last_round: int | None = None) -> Record:
    return make("site_round_backfill", run_id=run_id, site_id=site_id, round=round,
                checkpoint_hash=checkpoint_hash, log_last_round=log_last_round, reason=reason)


def run_end(*, run_id: str, rounds: int, sites: Mapping[str, Mapping[str, Any]], backbone_hash: str,
            checkpoint_hash: str | None = None) -> Record:
    """``sites``: site -> frame-ledger summary of its exchange after the last round (sorted by site)."""
    return make("run_end", run_id=run_id, rounds=rounds, backbone_hash=backbone_hash, checkpoint_hash=checkpoint_hash,
                sites=[{"site_id": name, "ledger": led} for name, led in sorted(sites.items())])


def site_run_end(*, run_id: str, site_id: str, rounds: int, ledger: Mapping[str, Any]) -> Record:
    return make("site_run_end", run_id=run_id, site_id=site_id, rounds=rounds, ledger=ledger)


# ---- JSON Schema generation (audit/schema.json) ----

def _schema(spec: Spec) -> dict[str, Any]:
    if isinstance(spec, dict):
        return {"type": "object", "additionalProperties": False,
                "required": sorted(k for k, s in spec.items() if not _optional(s)),
                "properties": {k: _schema(s[1] if _optional(s) else s) for k, s in sorted(spec.items())}}
    if isinstance(spec, tuple):
        key = "items" if spec[0] == "list" else "additionalProperties"
        return {"type": "array" if spec[0] == "list" else "object", key: _schema(spec[1])}
    base, nullable = spec.rstrip("?"), spec.endswith("?")
    out: dict[str, Any] = {"type": {"int": "integer", "float": "number", "bool": "boolean"}.get(base, "string")}
    if base == "int":
        out["minimum"] = 0
    if base == "str":
        out["maxLength"] = MAX_STR
    if base == "hash":
        out["pattern"] = HASH_RE.pattern
    if base == "time":
        out["pattern"] = TIME_RE.pattern
    if base == "sig":
        out["pattern"] = SIG_RE.pattern
    if nullable:
        out["type"] = [out["type"], "null"]
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one audit log line, generated from :data:`KINDS`."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:fedbone-med:audit:schema:v1",
        "title": "fedbone-med audit log line (canonical JSON, one per line)",
        "type": "object", "additionalProperties": False, "required": ["body", "kind", "prev", "seq", "time", "v"],
        "properties": {
            "v": {"const": 1}, "seq": {"type": "integer", "minimum": 0},
            "prev": {"type": "string", "pattern": HASH_RE.pattern}, "kind": {"enum": sorted(KINDS)},
            "time": {"type": "string", "pattern": TIME_RE.pattern}, "body": {"type": "object"},
        },
        "allOf": [{"if": {"properties": {"kind": {"const": k}}},
                   "then": {"properties": {"body": {"$ref": f"#/$defs/{k}"}}}} for k in sorted(KINDS)],
        "$defs": {k: _schema(spec) for k, spec in sorted(KINDS.items())},
    }


def schema_text() -> str:
    """The exact text of ``audit/schema.json`` (a test checks the committed file matches)."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
