"""Frame ledgers: what one end of a site<->server connection sent and received, per round.

Protects against a silent disagreement between the server's and a site's account of a
round: both ends feed every message they exchange into a :class:`FrameLedger`, each end
writes the per-round summary into its own signed audit log, and ``fedbone-audit
cross-check`` compares the two. A frame that one end sent but the other never received
(dropped), received altered, received in another order, or received without it having
been sent (injected) changes the summary of that round on one side only.

The ledger never stores frame contents: only counts, byte totals, per-type counts and one
SHA-256 digest chain per (round, direction). Cost: one SHA-256 over each frame plus one over
a ~120-byte entry; a lock guards the (tiny) state update, so it is safe to call from
transport threads.

**What ``frame`` must be.** The exact bytes exchanged, identical at both ends: over gRPC the
sealed envelope bytes (header + ciphertext + tag) as sent/received; in process, a canonical
plaintext encoding of the message. Direction is from the *site's* point of view and means
the same on both ends: ``"up"`` = site -> server, ``"down"`` = server -> site.

For the in-process transport, :func:`plaintext_frame` gives both ends the same bytes:
``plaintext_frame({"round": r, "step": s, ...header}, tensor.numpy().tobytes(), ...)``.

**Round tagging contract (for the wiring).** Both ends must tag each frame with the same
``(round, step)`` and must record frames in the order they were exchanged (call
:meth:`FrameLedger.record` at the point where the frame's sequence position is fixed, e.g.
right after sealing on send / right after the replay check on receive). A round is summarised
with :meth:`FrameLedger.take` only after the last frame tagged with that round has been
recorded *on that end*; recording a frame for a round already taken raises
:class:`AuditError` (tag such late frames, e.g. a round-sync reply sent after the server
closed the round, with the next round on both ends).

**Digest chain** (so an auditor can recompute it from independently kept frames)::

    d_0 = "0" * 64                                         (no frames)
    e_i = "fedbone-ledger-v1|" + direction + "|" + msg_type + "|" + str(round) + "|"
          + str(step) + "|" + sha256(frame_i).hexdigest()  (ASCII)
    d_i = sha256(bytes.fromhex(d_{i-1}) + e_i).hexdigest()

over the frames of one round and one direction in exchange order; the summary's ``digest``
is the last ``d``. ``msg_type`` matches ``[a-z][a-z0-9_]{0,31}``, so the entry is unambiguous.

Summary format (the ``ledger`` field of ``site_round`` records and of each site entry of the
server's ``round`` record)::

    {"up":   {"frames": int, "bytes": int, "digest": hex64, "types": {msg_type: int}},
     "down": {"frames": int, "bytes": int, "digest": hex64, "types": {msg_type: int}}}

Server side: :class:`LedgerBook` keeps one ledger per site;
``book.take_round(r)`` gives ``{site: summary}`` for ``ServerAuditTrail.round_finished(...,
ledgers=...)``. Site side: pass ``ledger.take(r)`` to ``SiteAuditTrail.round_finished``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .canonical import canonical_json
from .errors import AuditError

DIRECTIONS = ("up", "down")
EMPTY_DIGEST = "0" * 64
DOMAIN = "fedbone-ledger-v1"
MSG_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def chain_step(digest: str, direction: str, msg_type: str, round: int, step: int, frame_sha256: str) -> str:
    """One link of the digest chain (see the module docstring); exposed for auditors and tests."""
    entry = f"{DOMAIN}|{direction}|{msg_type}|{round}|{step}|{frame_sha256}".encode("ascii")
    return hashlib.sha256(bytes.fromhex(digest) + entry).hexdigest()


@dataclass
class _Tally:
    frames: int = 0
    bytes: int = 0
    digest: str = EMPTY_DIGEST
    types: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "bytes": self.bytes, "digest": self.digest,
                "types": dict(sorted(self.types.items()))}


def plaintext_frame(header: Mapping[str, Any], *payloads: bytes | bytearray | memoryview) -> bytes:
    """A canonical byte encoding of an unsealed message: canonical-JSON header, then length-prefixed payloads.

    ``len(header) (8 bytes, big-endian) || header || for each payload: len (8 bytes) || payload``.
    Only for transports without a sealed envelope (in process); over gRPC record the sealed bytes.
    """
    head = canonical_json(dict(header))
    parts = [len(head).to_bytes(8, "big"), head]
    for p in payloads:
        view = memoryview(p)
        parts += [view.nbytes.to_bytes(8, "big"), view.tobytes()]
    return b"".join(parts)


def empty_summary() -> dict[str, Any]:
    """The summary of a round in which nothing was exchanged."""
    return {d: _Tally().as_dict() for d in DIRECTIONS}


class FrameLedger:
    """Per-round, per-direction frame counts, byte counts and digest chains of one connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rounds: dict[int, dict[str, _Tally]] = {}
        self._max_taken = -1  # rounds <= this are closed

    def record(self, direction: str, msg_type: str, round: int, step: int, frame: bytes | bytearray | memoryview
               ) -> None:
        """Account for one frame exchanged (see the module docstring for what ``frame`` must be)."""
        if direction not in DIRECTIONS:
            raise AuditError(f"frame ledger: direction must be 'up' or 'down', not {direction!r}")
        if not isinstance(msg_type, str) or not MSG_TYPE_RE.match(msg_type):
            raise AuditError(f"frame ledger: message type {msg_type!r} must match {MSG_TYPE_RE.pattern}")
        for name, value in (("round", round), ("step", step)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AuditError(f"frame ledger: {name} must be a non-negative integer")
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise AuditError(f"frame ledger: frame must be bytes, not {type(frame).__name__}")
        view = memoryview(frame)
        frame_hash = hashlib.sha256(view).hexdigest()  # outside the lock: the only costly part
        size = view.nbytes
        with self._lock:
            if round <= self._max_taken:
                raise AuditError(f"frame ledger: a {direction} {msg_type} frame for round {round} was recorded after "
                                 f"that round was summarised; tag it with a later round on both ends")
            tally = self._rounds.setdefault(round, {d: _Tally() for d in DIRECTIONS})[direction]
            tally.frames += 1
            tally.bytes += size
            tally.types[msg_type] = tally.types.get(msg_type, 0) + 1
            tally.digest = chain_step(tally.digest, direction, msg_type, round, step, frame_hash)

    def summary(self, round: int) -> dict[str, Any]:
        """The round's summary so far (the round stays open)."""
        with self._lock:
            tallies = self._rounds.get(round)
            return {d: tallies[d].as_dict() for d in DIRECTIONS} if tallies else empty_summary()

    def take(self, round: int) -> dict[str, Any]:
        """Close ``round`` (and every earlier round) and return its summary; later frames for it are refused.

        Closing earlier rounds too keeps memory bounded and makes a late frame for any
        already-summarised round an error rather than a silent disagreement.
        """
        with self._lock:
            tallies = self._rounds.pop(round, None)
            out = {d: tallies[d].as_dict() for d in DIRECTIONS} if tallies else empty_summary()
            self._max_taken = max(self._max_taken, round)
            for r in [r for r in self._rounds if r < round]:  # never summarised: dropped with the close
                del self._rounds[r]
            return out

    def open_rounds(self) -> list[int]:
        with self._lock:
            return sorted(self._rounds)


class LedgerBook:
    """The server's ledgers, one per site (created on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ledgers: dict[str, FrameLedger] = {}

    def ledger(self, site: str) -> FrameLedger:
        with self._lock:
            led = self._ledgers.get(site)
            if led is None:
                led = self._ledgers[site] = FrameLedger()
            return led

    def record(self, site: str, direction: str, msg_type: str, round: int, step: int,
               frame: bytes | bytearray | memoryview) -> None:
        """Shorthand for ``book.ledger(site).record(...)``."""
        self.ledger(site).record(direction, msg_type, round, step, frame)

    def sites(self) -> list[str]:
        with self._lock:
            return sorted(self._ledgers)

    def take_round(self, round: int) -> dict[str, dict[str, Any]]:
        """Close ``round`` on every site's ledger; ``{site: summary}`` for sites that exchanged frames in it."""
        out = {}
        for site in self.sites():
            summary = self.ledger(site).take(round)
            if summary["up"]["frames"] or summary["down"]["frames"]:
                out[site] = summary
        return out
