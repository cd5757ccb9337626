"""Who takes part in a federation's round, and the deadlines that decide when to stop waiting.

:class:`Membership` holds the members of the current round, the sites admitted from the next one
(joined mid-round), the sites that were dropped and why, the privacy a leaving site reported, and
the :mod:`.events` the audit log records. :class:`Deadlines` measures the step and round deadlines
on an injected clock (``time.monotonic`` by default; tests pass their own). Neither is
thread-safe by itself: the :class:`~.coordinator.Coordinator` calls both with its lock held.

- ``expected_sites``: training waits until every expected site has joined, or until
  :meth:`Membership.start` (the server calls it after its join timeout, with at least ``min_sites``).
- A site that joins once a round has begun (a new site, or one that dropped and came back) is
  admitted from the next round; the join reply names that round.
- ``step_deadline``: once the first gradient of a step has arrived, the others have this many
  seconds; ``round_deadline`` the same for end-of-round reports from the first one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..errors import ProtocolError, SiteDropped
from ..transport.messages import JoinRequest, StepHeader
from .events import Dropped, Event, Joined, Left

Clock = Callable[[], float]


@dataclass
class SiteSession:
    request: JoinRequest
    last_sequence: int = -1
    pending: tuple[int, Tensor, list[Tensor]] | None = None  # (step, z leaf, features) awaiting backward


class Membership:
    def __init__(self, expected_sites: Sequence[str] | None, min_sites: int) -> None:
        self.expected_sites = tuple(sorted(expected_sites)) if expected_sites is not None else None
        self.min_sites = min_sites
        self.started = expected_sites is None
        self.sites: dict[str, SiteSession] = {}  # members of the current round
        self.pending: dict[str, SiteSession] = {}  # joined mid-round: members from the next round
        self.dropped: dict[str, str] = {}  # site -> why it is no longer a member (until it joins again)
        # site -> (epsilon, delta) reported when it left mid-round; taken by the round's audit record
        self.departed_privacy: dict[str, tuple[float | None, float | None]] = {}
        self.events: list[Event] = []  # joins, leaves, dropouts, skipped steps (for the audit log)

    def names(self) -> list[str]:
        return sorted(self.sites)

    def admit(self, request: JoinRequest, *, now: bool, round: int) -> int:
        """A joining site (a member that came back must be dropped first): a member now if ``now``
        (training has not started, or no step of the round has), else from round + 1. Returns its round."""
        name = request.site
        self.dropped.pop(name, None)
        self.pending.pop(name, None)
        session = SiteSession(request)
        if not self.started or now:
            self.sites[name] = session
            rnd = round
        else:
            self.pending[name] = session
            rnd = round + 1
        self.events.append(Joined(round=rnd, site=name))
        if not self.started and self.expected_sites is not None and set(self.expected_sites) <= set(self.sites):
            self.started = True
        return rnd

    def start(self) -> int:
        if len(self.sites) < self.min_sites:
            raise ProtocolError(f"only {len(self.sites)} site(s) joined, fewer than min_sites={self.min_sites}")
        self.started = True
        return len(self.sites)

    def promote_pending(self) -> None:
        """At a round boundary: the sites admitted from the next round become members."""
        self.sites.update(self.pending)
        self.pending.clear()

    def leave(self, site: str, round: int, privacy: tuple[float | None, float | None] | None) -> bool:
        """A site leaves on its own; returns whether it was a member."""
        was_member = self.sites.pop(site, None) is not None
        self.pending.pop(site, None)
        if was_member:
            self.events.append(Left(round=round, site=site))
            if privacy is not None:
                self.departed_privacy[site] = privacy
        return was_member

    def drop(self, site: str, reason: str, round: int, step: int) -> bool:
        """Remove a member that failed; it may join again. Returns whether it was a member."""
        if self.sites.pop(site, None) is None:
            return False
        self.dropped[site] = reason
        self.events.append(Dropped(round=round, site=site, step=step, reason=reason))
        return True

    def not_member(self, site: str) -> SiteDropped:
        return SiteDropped(f"site '{site}' was dropped ({self.dropped.get(site, 'left')})")

    def session(self, header: StepHeader, run_id: str, round: int) -> SiteSession:
        """The member session a message belongs to; its sequence number must be above the last one's."""
        if header.run_id != run_id:
            raise ProtocolError(f"site '{header.site}': message for run {header.run_id!r}, this server runs "
                                f"{run_id!r}")
        session = self.sites.get(header.site)
        if session is None:
            if header.site in self.dropped:
                raise SiteDropped(f"site '{header.site}' was dropped ({self.dropped[header.site]}); join again")
            if header.site in self.pending:
                raise SiteDropped(f"site '{header.site}' is admitted from round {round + 1}; wait for it")
            raise ProtocolError(f"site '{header.site}' has not joined this federation")
        if header.sequence <= session.last_sequence:
            raise ProtocolError(f"site '{header.site}': sequence number {header.sequence} is not above "
                                f"{session.last_sequence} (replayed or reordered message)")
        session.last_sequence = header.sequence
        return session


class Deadlines:
    """The step deadline (from a step's first gradient) and the round deadline (from its first report)."""

    TICK = 0.25  # how often waiting threads look at the clock when a deadline is set

    def __init__(self, step: float | None, round: float | None, clock: Clock = time.monotonic) -> None:
        self.step, self.round, self.clock = step, round, clock
        self.step_started_at: float | None = None

    def step_started(self) -> None:
        if self.step_started_at is None:
            self.step_started_at = self.clock()

    def step_closed(self) -> None:
        self.step_started_at = None

    def step_expired(self) -> bool:
        return (self.step is not None and self.step_started_at is not None
                and self.clock() - self.step_started_at > self.step)

    def round_expired(self, first_report_at: float | None) -> bool:
        return self.round is not None and first_report_at is not None and self.clock() - first_report_at > self.round

    def tick(self, left: float) -> float:
        """How long a waiting thread sleeps before it looks at the deadlines again."""
        return left if self.step is None and self.round is None else min(left, self.TICK)
