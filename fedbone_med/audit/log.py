"""Append-only, hash-chained, signed audit log (JSON Lines).

Protects against undetected edits, deletions, insertions, reordering and truncation of
the training record. Each line is the canonical JSON (see :mod:`.canonical`) of an envelope
``{"v": 1, "seq": n, "prev": h, "kind": k, "time": t, "body": {...}}`` where ``prev`` is the
SHA-256 (hex) of the previous line's bytes *without* its trailing newline, or 64 zeros for
the first line. Changing any byte of a line breaks the ``prev`` of the line after it;
removing or moving a line breaks ``seq``. Periodically :meth:`AuditLog.checkpoint` appends a
``log_checkpoint`` record whose Ed25519 signature binds the record count and the head hash,
so that rewriting the whole chain also requires the server's private key.

Durability: the file is opened with ``O_APPEND``; each record is a single ``write`` of one
complete line followed by ``fsync``. A crash can at worst leave a torn last line, which is
refused on reopen (never silently truncated: the operator decides, and the incident stays
visible). An exclusive ``flock`` stops two processes from appending to one log.

What it does not protect against: a server that logs false values, or an attacker with the
private key. Truncation back to an earlier signed checkpoint is only detectable by comparing
with an independently kept copy of a later checkpoint (count and head), e.g. one sent to
the sites or to the auditor.

Merkle tree (RFC 6962, see :mod:`.merkle`). Every ``log_checkpoint`` also carries and signs
``merkle_root``, the Merkle tree hash over the ``count`` lines before it (leaf =
``SHA-256(0x00 || line bytes)``). An auditor can then check an inclusion proof for one
record, or a consistency proof that a later signed log extends an earlier signed
checkpoint, without the whole log (``fedbone-audit prove`` / ``check-proof``). The field is
optional in the schema, so checkpoints written before it existed still verify; their
signature payload is unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import errno
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .canonical import canonical_json, sha256_hex
from .errors import AuditError
from .keys import key_id as compute_key_id
from .merkle import MerkleAccumulator
from .records import KINDS, LOG_CHECKPOINT, Clock, Record, iso_utc, utc_now, validate

VERSION = 1
ZERO_HASH = "0" * 64


def checkpoint_payload(count: int, head: str, key_id: str, run_id: str, merkle_root: str | None = None,
                       signed_at: str | None = None) -> bytes:
    """The exact bytes a ``log_checkpoint`` signature covers (``merkle_root`` and ``signed_at`` when present)."""
    fields = {"count": count, "head": head, "key_id": key_id, "run_id": run_id}
    if merkle_root is not None:
        fields["merkle_root"] = merkle_root
    if signed_at is not None:
        fields["signed_at"] = signed_at
    return canonical_json(fields)


def recovery_hint(path: Path, complete_lines: int) -> str:
    return (f"keep {path} unchanged as evidence; write its first {complete_lines} complete line(s) to a new file "
            f"(`head -n {complete_lines} {path} > {path}.recovered`), check it with "
            f"`fedbone-audit verify {path}.recovered --public-key PEM --allow-unsigned-tail`, "
            "then move the recovered file into place and record the incident")


def run_records(path: str | Path, run_id: str, kinds: tuple[str, ...],
                site_id: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, body) of each complete line of ``path`` of ``kinds`` for ``run_id`` (and ``site_id``).

    Does not verify signatures (use :func:`~.verify.verify_log` for that); meant for a writer
    reconciling its own log with its checkpoint. A missing file has no records.
    """
    p = Path(path)
    if not p.exists():
        return
    for raw in p.read_bytes().split(b"\n")[:-1]:
        try:
            env = json.loads(raw)
        except (ValueError, RecursionError):
            raise AuditError(f"audit log {p}: a line is not JSON; run `fedbone-audit verify` on it",
                             check="canonical-json") from None
        body = env.get("body") if isinstance(env, dict) else None
        if not isinstance(body, dict) or env.get("kind") not in kinds or body.get("run_id") != run_id:
            continue
        if site_id is not None and body.get("site_id") != site_id:
            continue
        yield str(env["kind"]), body


def last_round(path: str | Path, run_id: str, kinds: tuple[str, ...], site_id: str | None = None) -> int | None:
    """The highest ``round`` among records of ``kinds`` for ``run_id`` (and ``site_id``) in ``path``, or None
    (see :func:`run_records`)."""
    rounds = [body["round"] for _, body in run_records(path, run_id, kinds, site_id)
              if isinstance(body.get("round"), int)]
    return max(rounds) if rounds else None


def rounds_to_backfill(last: int | None, next_round: int, path: Path) -> list[int]:
    """Rounds in ``(last, next_round)`` to back-fill; AuditError when the log is ahead of the checkpoint."""
    if isinstance(next_round, bool) or not isinstance(next_round, int) or next_round < 0:
        raise AuditError("reconcile: next_round must be a non-negative integer")
    if last is not None and last >= next_round:
        raise AuditError(f"audit log {path} already records round {last} but the checkpoint has completed only "
                         f"rounds < {next_round}: the checkpoint is older than the log (restored from a backup?). "
                         "Resuming would record rounds twice; resume from the latest checkpoint or start a new run",
                         check="reconcile")
    return list(range(0 if last is None else last + 1, next_round))


def backfill_reason(r: int, next_round: int) -> str:
    if r == next_round - 1:
        return "recovered from checkpoint: the process stopped after writing the checkpoint, before the round record"
    return "recovered: round completed but its record and checkpoint are lost (a later checkpoint replaced it)"


class AuditLog:
    """Append records to ``path``; create it or continue an existing, intact log.

    ``signing_key`` signs checkpoints; ``clock`` returns timezone-aware datetimes (inject a
    fixed clock in tests). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path, signing_key: Ed25519PrivateKey, clock: Clock = utc_now) -> None:
        self.path = Path(path)
        self._key = signing_key
        self.key_id = compute_key_id(signing_key.public_key())
        self._clock = clock
        self._lock = threading.RLock()
        self._seq = 0
        self._head = ZERO_HASH
        self._run_id: str | None = None
        self._last_kind: str | None = None
        self._tree = MerkleAccumulator()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise AuditError(f"audit log {self.path} is open for writing by another process") from None
        try:
            if created:
                self._fsync_dir()
            else:
                self._load_tail()
            self._size = os.fstat(self._fd).st_size  # bytes accounted for in seq, head and the tree
        except BaseException:
            self.close()
            raise

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public key of the signing key (what verifies this writer's checkpoints)."""
        return self._key.public_key()

    # -- opening an existing log --
    def _load_tail(self) -> None:
        data = self.path.read_bytes()
        if not data:
            return
        lines = data.split(b"\n")
        if lines[-1] != b"":
            raise AuditError(f"audit log {self.path} ends with an incomplete line {len(lines)} (torn write, e.g. a "
                             f"crash mid-append); refusing to append. To recover: "
                             + recovery_hint(self.path, len(lines) - 1), check="torn-line", line=len(lines))
        lines.pop()
        last = self._parse(lines[-1], len(lines))
        if len(lines) >= 2:
            before = self._parse(lines[-2], len(lines) - 1)
            expected_prev = sha256_hex(lines[-2])
            if last["seq"] != before["seq"] + 1 or last["prev"] != expected_prev:
                raise AuditError(f"audit log {self.path} line {len(lines)}: tail does not chain to the line before; "
                                 "run `fedbone-audit verify` on it", check="hash-chain", line=len(lines))
        elif last["seq"] != 0 or last["prev"] != ZERO_HASH:
            raise AuditError(f"audit log {self.path} line 1: first record does not start the chain",
                             check="sequence", line=1)
        if last["seq"] != len(lines) - 1:
            raise AuditError(f"audit log {self.path}: {len(lines)} lines but last seq is {last['seq']}; "
                             "run `fedbone-audit verify` on it", check="sequence", line=len(lines))
        self._seq = last["seq"] + 1
        self._head = sha256_hex(lines[-1])
        self._run_id = last["body"].get("run_id")
        self._last_kind = last.get("kind")
        for line in lines:
            self._tree.add_line(line)

    def _parse(self, line: bytes, number: int) -> dict[str, Any]:
        env: Any = None
        try:
            env = json.loads(line)
            ok = isinstance(env, dict) and canonical_json(env) == line
        except (ValueError, RecursionError, AuditError):
            ok = False
        if (not ok or not isinstance(env.get("seq"), int) or not isinstance(env.get("body"), dict)
                or not isinstance(env.get("prev"), str)):
            raise AuditError(f"audit log {self.path} line {number}: not a canonical audit record; "
                             "run `fedbone-audit verify` on it", check="canonical-json", line=number)
        result: dict[str, Any] = env
        return result

    def _fsync_dir(self) -> None:
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- appending --
    @property
    def seq(self) -> int:
        """The sequence number the next record will get (= records written so far)."""
        with self._lock:
            self._catch_up()
            return self._seq

    @property
    def head(self) -> str:
        """SHA-256 of the last line written (64 zeros for an empty log)."""
        with self._lock:
            self._catch_up()
            return self._head

    @property
    def signed(self) -> bool:
        """True when every record written so far is covered by a signed checkpoint (or there are none)."""
        with self._lock:
            self._catch_up()
            return self._seq == 0 or self._last_kind == LOG_CHECKPOINT

    def _account(self, line: bytes, kind: str, body: dict[str, Any]) -> None:
        """Take a line that is in the file into seq, head, size and the tree.

        Idempotent up to the final assignment: the tree takes the line only if it does not hold
        it yet, and the rest changes in one statement, so an exception anywhere in between
        (KeyboardInterrupt from Ctrl-C, a failed fsync) leaves a state that :meth:`_catch_up`
        completes from the file.
        """
        if self._tree.size == self._seq:
            self._tree.add_line(line)
        head = sha256_hex(line)
        run_id = body.get("run_id", self._run_id)
        self._seq, self._head, self._size, self._run_id, self._last_kind = (
            self._seq + 1, head, self._size + len(line) + 1, run_id, kind)

    def _catch_up(self) -> None:
        """Account for lines this writer put in the file but did not finish recording.

        The log is locked for this process alone, so any bytes past the accounted size are ours:
        an append interrupted after its write (Ctrl-C between the write and the bookkeeping, an
        fsync that raised). Without this, the next record would reuse a sequence number. A torn
        last line (the write itself was cut) is refused, with the recovery steps.
        """
        if self._fd < 0:
            return
        size = os.fstat(self._fd).st_size
        if size == self._size:
            return
        if size < self._size:
            raise AuditError(f"audit log {self.path} is shorter than what was written to it ({size} < {self._size} "
                             "bytes): it was truncated while open; run `fedbone-audit verify` on it",
                             check="sequence", line=self._seq)
        with open(self.path, "rb") as f:
            f.seek(self._size)
            extra = f.read(size - self._size)
        if not extra.endswith(b"\n"):
            raise AuditError(f"audit log {self.path} ends with an incomplete line {self._seq + 1} (torn write); "
                             "refusing to append. To recover: " + recovery_hint(self.path, self._seq),
                             check="torn-line", line=self._seq + 1)
        for raw in extra[:-1].split(b"\n"):
            env = self._parse(raw, self._seq + 1)
            if env["seq"] != self._seq or env.get("prev") != self._head:
                raise AuditError(f"audit log {self.path} line {self._seq + 1}: a line this writer did not account "
                                 "for does not chain to the one before; run `fedbone-audit verify` on it",
                                 check="hash-chain", line=self._seq + 1)
            self._account(raw, str(env.get("kind")), env["body"])

    def append(self, record: Record) -> str:
        """Append one validated record; return the SHA-256 of the written line."""
        if record.kind == LOG_CHECKPOINT:
            raise AuditError("log_checkpoint records are written by AuditLog.checkpoint(), not append()")
        return self._write(record.kind, record.body)

    def _write(self, kind: str, body: dict[str, Any], time: str | None = None) -> str:
        if kind not in KINDS:
            raise AuditError(f"unknown audit record kind {kind!r}")
        body = validate(KINDS[kind], body, kind)
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"audit log {self.path} is closed")
            self._catch_up()
            env = {"v": VERSION, "seq": self._seq, "prev": self._head, "kind": kind,
                   "time": time if time is not None else iso_utc(self._clock()), "body": body}
            line = canonical_json(env)
            try:
                written = os.write(self._fd, line + b"\n")
                if written != len(line) + 1:  # a full disk mid-line
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(line) + 1} bytes)")
                os.fsync(self._fd)
            except OSError:
                self._cut_back(self._size)  # the record is not in the log: nothing torn, nothing half-written
                raise
            self._account(line, kind, body)
            return self._head

    # -- all or nothing --
    def mark(self) -> tuple[Any, ...]:
        """The log's state now, for :meth:`roll_back` (a group of records written all or nothing)."""
        with self._lock:
            self._catch_up()
            return (self._size, self._seq, self._head, self._run_id, self._last_kind, copy.deepcopy(self._tree))

    def roll_back(self, mark: tuple[Any, ...]) -> None:
        """Remove every line written after ``mark`` (this writer's own, unsigned by anyone else).

        Used when a group of records cannot be completed (the disk filled up between them): the log
        ends where it ended before the group, so it never holds half of a round's records.
        """
        with self._lock:
            self._cut_back(mark[0])
            self._size, self._seq, self._head, self._run_id, self._last_kind, self._tree = mark

    def _cut_back(self, size: int) -> None:
        if self._fd < 0 or os.fstat(self._fd).st_size <= size:
            return
        os.ftruncate(self._fd, size)  # shrinking needs no free space
        with contextlib.suppress(OSError):
            os.fsync(self._fd)

    def checkpoint(self, run_id: str | None = None) -> str:
        """Append a signed ``log_checkpoint`` covering every record so far; return its line hash.

        ``run_id`` defaults to the run of the last record written.
        """
        with self._lock:  # re-entrant: no record can slip in between signing and writing
            self._catch_up()
            run = run_id or self._run_id
            if self._seq == 0 or run is None:
                raise AuditError("nothing to checkpoint: the audit log has no records yet")
            count, head, root = self._seq, self._head, self._tree.root().hex()
            now = iso_utc(self._clock())  # the record's time, signed: no later line chains over the last one
            signature = self._key.sign(checkpoint_payload(count, head, self.key_id, run, root, now))
            body = {"count": count, "head": head, "key_id": self.key_id, "run_id": run, "merkle_root": root,
                    "signed_at": now, "signature": base64.b64encode(signature).decode("ascii")}
            return self._write(LOG_CHECKPOINT, body, time=now)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
