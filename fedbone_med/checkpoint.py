"""Atomic checkpoints, loaded without unpickling code.

``save_checkpoint`` writes to a temporary file beside the target, flushes it to disk and
renames it over the target, so a crash leaves either the old checkpoint or the new one,
never a torn file. ``load_checkpoint`` uses ``torch.load(weights_only=True)``: a
checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def _interrupted(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in ``exc``'s context chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _os_error(exc: BaseException) -> OSError | None:
    """The first OSError in ``exc``'s context chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename in it) to disk."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_temp(path: Path, write) -> str:
    """Write a temporary file beside ``path`` and flush it to disk; return its name.

    On any failure (a full disk, a read-only directory, Ctrl-C) the temporary file is removed and
    ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(exc, KeyboardInterrupt) and _interrupted(exc):
            # Ctrl-C inside the writer, then a second error while it unwound (torch.save's zip writer
            # raises "unexpected pos" when interrupted mid-record): it is still an interruption, and the
            # old file is intact.
            raise KeyboardInterrupt(f"interrupted while writing {path.name}") from exc
        cause = _os_error(exc)
        if not isinstance(exc, OSError) and cause is not None:
            # the file system refused (ENOSPC mid-record) and torch.save's zip writer then failed to close
            # ("unexpected pos"): what went wrong is the OSError, for the operator's message and exit code
            raise OSError(cause.errno, cause.strerror, str(path)) from exc
        raise
    return tmp


def _atomic_write(path: Path, write) -> None:
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


class StagedCheckpoint:
    """A checkpoint (or results file) written and flushed to ``NAME.next`` beside its target, not yet in place.

    The two-phase write of the server's round boundary (:mod:`fedbone_med.server.boundary`): the
    checkpoint is staged (the write that needs disk space), the round's audit record names its
    SHA-256 (the commit point), then :meth:`commit` renames it into place. A failure before the
    record leaves the previous checkpoint and the log as they were (:meth:`discard`); a crash
    between the record and the rename is completed on restart by :func:`complete_staged` (the
    staged file is the one the log names). Either way the checkpoint and the log describe the same round.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.staged = staged_path(path)
        self.digest = file_sha256(self.staged)

    def commit(self) -> None:
        os.replace(self.staged, self.path)
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        self.staged.unlink(missing_ok=True)


def staged_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".next")


def stage_checkpoint(state: dict[str, Any], path: str | Path) -> StagedCheckpoint:
    """Write ``state`` to ``PATH.next`` and flush it; :meth:`StagedCheckpoint.commit` puts it in place."""
    p = Path(path)
    _atomic_write(staged_path(p), lambda fh: torch.save(state, fh))
    return StagedCheckpoint(p)


def stage_json(data: Any, path: str | Path) -> StagedCheckpoint:
    """Write ``data`` as JSON to ``PATH.next`` and flush it (a results file staged with a round's checkpoints)."""
    p = Path(path)
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n"
    _atomic_write(staged_path(p), lambda fh: fh.write(text.encode("utf-8")))
    return StagedCheckpoint(p)


def complete_staged(path: str | Path, recorded: Callable[[str], bool]) -> str | None:
    """Finish a two-phase write interrupted by a crash: put ``PATH.next`` in place if ``recorded(its
    SHA-256)`` (the log holds the record that commits it), else remove it. Returns what was done."""
    staged = staged_path(path)
    if not staged.exists():
        return None
    if recorded(file_sha256(staged)):
        os.replace(staged, path)
        fsync_dir(staged.parent)
        return "committed"
    staged.unlink()
    return "discarded"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> str:
    """Write ``state`` atomically; return the SHA-256 of the file written."""
    p = Path(path)
    _atomic_write(p, lambda fh: torch.save(state, fh))
    return file_sha256(p)


def write_json_atomic(data: Any, path: str | Path) -> None:
    """Write JSON atomically (results files that a crash must not truncate)."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n"
    _atomic_write(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    """Load a ``kind`` ("server" or "site") checkpoint, or raise CheckpointError saying why."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no {kind} checkpoint at {p}; run without --resume to start afresh")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(
            f"{kind} checkpoint {p} could not be loaded safely ({type(exc).__name__}); "
            "it is corrupt or was not written by fedbone-med"
        ) from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise CheckpointError(f"{p} is not a {kind} checkpoint")
    return state
