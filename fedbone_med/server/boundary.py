"""The server's round boundary, written once for ``fedbone-server serve`` and for ``fedbone run``.

At the end of every round the owner of the backbone writes: the server checkpoint, the results
file, the membership events and the signed round record, plus (in process) every site's checkpoint.
:meth:`RoundBoundary.write` writes them all or none, in two phases:

1. stage: the server checkpoint as ``server.pt.next`` (flushed), then the other checkpoints
   (``site-NAME.pt.next``, in process) and the results file (``NAME.json.next``); the log's
   position is marked (:meth:`AuditLog.mark`);
2. the events and the round record naming the staged server checkpoint's SHA-256, signed: the
   **commit point** for every file of the round;
3. commit: the staged results and site checkpoints are renamed into place, the server checkpoint last.

A failure before the commit point (ENOSPC, EROFS, EACCES, EFBIG, a short write, an AuditError,
Ctrl-C) removes the staged files and cuts the log back to the mark, so the previous checkpoints,
results and log stay as they were; an ``OSError`` becomes :class:`RoundNotRecorded` (exit code 7,
naming the file, the errno and what to do). A crash after the commit point leaves staged files that
:meth:`RoundBoundary.complete` (on ``--resume``, before loading anything) puts in place: the server's
if the log records its hash, and then every other staged file of the round with it (the server
checkpoint is renamed last, so a staged other file without a staged server checkpoint is from a round
that never committed, and is removed). Without an audit log nothing is the commit point: a staged
file is discarded on resume and the round trains again.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import (
    StagedCheckpoint,
    complete_staged,
    file_sha256,
    fsync_dir,
    stage_checkpoint,
    stage_json,
    staged_path,
)
from ..errors import CheckpointError
from .audit_trail import ServerAuditTrail
from .events import Dropped, Event, Joined, Left, StepSkipped


class RoundNotRecorded(CheckpointError):
    """A round boundary could not be written (checkpoint, results or audit record); nothing of it was kept."""


_HINTS = {
    errno.ENOSPC: "free disk space on that file system",
    errno.EDQUOT: "raise the disk quota or free space",
    errno.EROFS: "the file system is read-only: remount it read-write or use another --out",
    errno.EACCES: "make the directory writable by the process's user",
    errno.EPERM: "make the directory writable by the process's user",
    errno.EFBIG: "raise the file-size limit (ulimit -f) of the process's user",
}


def write_failure(rnd: int, where: Path, exc: OSError, state: str, resume: str) -> str:
    """What failed, where, and what to do: for the operator (never patient data: paths and errno only)."""
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    hint = _HINTS.get(exc.errno or 0, "fix the cause above")
    return (f"round {rnd} could not be recorded: writing {where} failed with {code} ({exc.strerror or exc}). "
            f"{state}. To continue: {hint}, then run {resume}")


def record_events(audit: ServerAuditTrail, events: Sequence[Event], *, fingerprints: Mapping[str, str] | None = None,
                  reasons: Mapping[str, str] | None = None) -> None:
    """Membership events from the coordinator into the audit log (``reasons``: site -> why it left, overriding
    the event's own)."""
    fingerprints, reasons = fingerprints or {}, reasons or {}
    for e in events:
        if isinstance(e, Joined):
            audit.site_joined(e.site, e.round, fingerprints.get(e.site))
        elif isinstance(e, Left):
            audit.site_left(e.site, e.round, reasons.get(e.site, e.reason))
        elif isinstance(e, Dropped):
            audit.site_dropped(e.site, e.round, e.reason)
        elif isinstance(e, StepSkipped):
            audit.step_skipped(e.round, e.step, e.reason, list(e.sites))


@dataclass
class RoundEnd:
    """What one round boundary records."""

    round: int
    state: dict[str, Any]  # the coordinator's state_dict() after the round
    results: dict[str, Any]  # the whole results file, with this round in it
    backbone: nn.Module
    method: str  # the aggregation method
    usage: dict[str, tuple[int, int]]  # site -> (steps, samples) of the round
    steps: list[dict[str, Any]]  # the aggregation statistics of the round's steps
    events: Sequence[Event] = ()
    privacy: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    ledgers: Mapping[str, Mapping[str, Any]] | None = None
    checkpoints: Mapping[Path, dict[str, Any]] = field(default_factory=dict)  # other checkpoints (in-process sites)
    left_reasons: Mapping[str, str] = field(default_factory=dict)


class RoundBoundary:
    """The server's round boundary: ``checkpoint`` (the server's), ``results`` (the results file), and
    ``others``: the other checkpoints committed with it (the in-process sites'), for :meth:`complete`.

    ``audit`` is set once the log is open (None: no audit log); ``fingerprints`` names the sites'
    certificates for their join records; ``resume`` is the command that continues the run;
    ``retry_note``: what the sites do meanwhile (networked).
    """

    def __init__(self, checkpoint: Path, results: Path, log: Path, *, resume: str, others: Sequence[Path] = (),
                 fingerprints: Mapping[str, str] | None = None, retry_note: str = "",
                 warn: Callable[[str], None] | None = None) -> None:
        self.checkpoint, self.results, self.log = checkpoint, results, log
        self.others = tuple(others)
        self.resume = resume
        self.fingerprints = fingerprints if fingerprints is not None else {}
        self.retry_note = retry_note
        self.audit: ServerAuditTrail | None = None
        self._warn = warn or (lambda msg: print(msg, file=sys.stderr))

    # -- the round's end ------------------------------------------------------------------------
    def write(self, end: RoundEnd) -> dict[Path, str]:
        """Write the round boundary, all of it or none; return the SHA-256 of every checkpoint committed.

        Raises :class:`RoundNotRecorded` when a write fails (nothing of the round kept, or, after the
        commit point, the staged files left for :meth:`complete`); any other exception (an AuditError,
        Ctrl-C) propagates after the same undo.
        """
        where = self.checkpoint
        staged: list[StagedCheckpoint] = []  # the server's first
        mark = self.audit.log.mark() if self.audit is not None else None
        committed = False
        try:
            staged.append(stage_checkpoint(end.state, self.checkpoint))
            for path, state in end.checkpoints.items():
                where = path
                staged.append(stage_checkpoint(state, path))
            where = self.results
            staged.append(stage_json(end.results, self.results))  # a resume drops rounds its checkpoint lacks
            if self.audit is not None:
                where = self.audit.log.path
                record_events(self.audit, end.events, fingerprints=self.fingerprints, reasons=end.left_reasons)
                # the commit point: once this record is signed, the staged files are the round's
                self.audit.round_finished(end.round, end.backbone, end.usage, end.steps, end.method, staged[0].digest,
                                          end.privacy, ledgers=end.ledgers, losses=end.losses)
            committed = True
            for s in [*staged[1:], staged[0]]:  # the server's checkpoint last: see complete()
                where = s.path
                s.commit()
        except OSError as exc:
            self._undo(staged, mark, committed)
            if committed:  # the record is signed; only a rename of a staged file failed
                what = (f"Round {end.round} is recorded in the audit log and its checkpoints are staged beside "
                         f"{self.checkpoint} (*.next); --resume puts them in place")
            else:
                what = (f"The round is not complete: the previous checkpoints ({self.checkpoint.parent}), "
                         f"{self.results.name} and the audit log are as they were before it{self.retry_note}")
            raise RoundNotRecorded(write_failure(end.round, where, exc, what, self.resume)) from None
        except BaseException:  # an AuditError, or Ctrl-C in the middle: nothing of the round stays
            self._undo(staged, mark, committed)
            raise
        return {s.path: s.digest for s in staged[:-1]}  # the checkpoints (the results file is last)

    def _undo(self, staged: list[StagedCheckpoint], mark: tuple[Any, ...] | None, committed: bool) -> None:
        """Back to the previous round boundary on disk, unless the round's record is already signed (then the
        staged files stay for :meth:`complete`). The server's staged checkpoint is removed last."""
        if committed:
            return
        for s in reversed(staged):
            try:
                s.discard()
            except OSError as exc:
                self._warn(f"warning: could not remove {s.staged} ({exc}); --resume removes it")
        if mark is not None and self.audit is not None:
            try:
                self.audit.log.roll_back(mark)
            except OSError as exc:
                self._warn(f"error: could not remove the incomplete round's lines from {self.audit.log.path} "
                           f"({exc}); `fedbone-audit verify` it before resuming")

    # -- resume -----------------------------------------------------------------------------------
    def complete(self) -> str | None:
        """On ``--resume``, before anything is loaded: finish a round boundary a crash interrupted after its
        commit point, or remove what a round that never committed staged. Returns "committed", "discarded"
        or None (nothing staged)."""
        recorded: set[str] = set()
        if self.log.exists():
            for raw in self.log.read_bytes().split(b"\n"):
                if b'"kind":"round"' not in raw:
                    continue
                try:
                    body = json.loads(raw)["body"]
                except (ValueError, KeyError, TypeError):
                    continue  # verified with the rest of the log when it is opened
                if isinstance(body, dict) and isinstance(body.get("checkpoint_hash"), str):
                    recorded.add(body["checkpoint_hash"])
        server = staged_path(self.checkpoint)
        commit = server.exists() and file_sha256(server) in recorded
        for path in (self.results, *self.others):  # before the server's: it marks the round as staged
            nxt = staged_path(path)
            if nxt.exists():
                if commit:
                    os.replace(nxt, path)
                    fsync_dir(path.parent)
                else:
                    nxt.unlink()
        return complete_staged(self.checkpoint, recorded.__contains__)
