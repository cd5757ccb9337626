"""Membership events of a federation: what the audit log records and the results list.

The coordinator appends them as they happen; the owner (``fedbone-server serve`` or ``fedbone run``)
takes them at each round boundary, writes each into the audit log (``site_joined``, ``site_left``,
``site_dropped``, ``step_skipped``) and into the results as ``to_dict()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = ""
    round: int

    def to_dict(self) -> dict[str, Any]:
        """The results-file form: ``{"event": kind, **fields}`` (lists for tuples)."""
        out: dict[str, Any] = {"event": self.kind}
        for k, v in asdict(self).items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class Joined(Event):
    """A site's join was accepted; it takes part from ``round``."""

    kind: ClassVar[str] = "join"
    site: str


@dataclass(frozen=True)
class Left(Event):
    """A site left on its own (Ctrl-C, a spent privacy budget, the end of the run)."""

    kind: ClassVar[str] = "leave"
    site: str
    reason: str = "left"


@dataclass(frozen=True)
class Dropped(Event):
    """The server removed a member (a missed deadline, a join while it was a member)."""

    kind: ClassVar[str] = "dropout"
    site: str
    step: int
    reason: str


@dataclass(frozen=True)
class StepSkipped(Event):
    """A step (or, in the round cadence, a round's update) aggregated nothing: too few sites delivered."""

    kind: ClassVar[str] = "step_skipped"
    step: int
    sites: tuple[str, ...]
    reason: str
