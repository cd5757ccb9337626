"""Cross-check a site's audit log against the server's: did both sides see the same exchange?

Protects against either party's log standing alone: the server's signed log says what the
server *says* happened, the site's signed log what the site says. Each records, per round,
the :mod:`~.ledger` summary of the frames exchanged between them (count, bytes, per-type
counts and a SHA-256 digest chain per direction), the steps and samples, and the ε/δ the
site reported. If both logs verify and agree round by round, neither party can later claim
a different exchange without the other's log contradicting it. If a frame was dropped,
altered, reordered or injected on the way, or either side miscounted, the first round and
field where they differ is named.

Compared per round (server ``round`` record's entry for the site vs the site's
``site_round``), in this order: ``cert_fingerprint`` (when both the server's entry and the
site's latest ``site_run_start`` name one), ``steps``, ``samples``, ``epsilon``, ``delta``, then for
``up`` and ``down``: ``frames``, ``bytes``, ``types.<msg_type>``, ``digest``. Rounds in one
log but not the other are differences too (field ``round`` / ``sites`` / ``site_round``); a
``round_backfill`` or ``site_round_backfill`` on either side cannot be compared (field
``backfilled``) and counts as a difference unless ``allow_backfilled=True``.

After the rounds, the run's tail: what was exchanged after the last round closed (the reply to
the last report, the last round sync, the last validation) is in the server's ``run_end``
record (one ledger per site) and the site's ``site_run_end``; they are compared the same way
(fields ``tail.ledger.*``). A tail on one side only is a difference (field ``run_end``), except
that a server ``run_end`` listing nothing for the site (it had stopped or left before the end)
needs no ``site_run_end``.

A server restart (``--resume``) loses the server's in-memory ledgers of the attempt under way;
the resumed server says so in a ``round_interrupted`` record (round ``c``), and a site that
abandoned booked frames to join again says what they were in a ``site_round_interrupted``
record. Each restart is listed as a check of status ``interrupted``: "an attempt interrupted by
a server restart: the site booked N frames the server could not". It is not a difference (the
round is then trained again and compared as usual) but it is not agreement either: those frames
are on the site's word alone, and :meth:`CrossCheckReport.scope` says so. Abandoned frames of
ledger round ``t`` are explained by a restart at ``c`` when ``c <= t <= c + 1`` (what the server
had open at round ``c``: that round, and the replies to its reports); abandoned frames no restart
explains are a difference (field ``interrupted``): the server did not restart, so its round
record holds what it saw of them.

What agreement does *not* prove: that the frames' contents were correct (only that both
ends saw the same bytes), nor anything about rounds that only one log covers, nor the frames
of an interrupted attempt (only the site booked them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import AuditError
from .ledger import DIRECTIONS, empty_summary
from .verify import VerifyReport, verify_log

SCALARS = ("steps", "samples", "epsilon", "delta")


@dataclass(frozen=True)
class Difference:
    run_id: str
    round: int
    field: str
    server: Any
    site: Any

    @property
    def tail(self) -> bool:
        """A difference in the exchange after the run's last round (run_end / site_run_end)."""
        return self.field == "run_end" or self.field.startswith("tail.")

    def describe(self) -> str:
        where = f"after its last round (round {self.round - 1})" if self.tail else f"round {self.round}"
        return f"run {self.run_id} {where}: {self.field} differs: server {self.server!r}, site {self.site!r}"


@dataclass
class RoundCheck:
    run_id: str
    round: int
    status: str  # "agree" | "differ" | "backfilled" | "interrupted" (a server restart: up/down = the site's frames)
    differences: list[Difference] = field(default_factory=list)
    up: dict[str, Any] | None = None
    down: dict[str, Any] | None = None
    tail: bool = False  # the exchange after the run's last round (run_end / site_run_end), booked as round `round`

    def line(self) -> str:
        head = (f"run {self.run_id} after its last round (round {self.round - 1}): " if self.tail
                else f"run {self.run_id} round {self.round}: ")
        if self.status == "agree":
            assert self.up is not None and self.down is not None
            return (head + f"agree (up {self.up['frames']} frames / {self.up['bytes']} B, "
                    f"down {self.down['frames']} frames / {self.down['bytes']} B)")
        if self.status == "interrupted":
            return head + self.interruption()
        return head + ("; ".join(f"{d.field}: server {d.server!r}, site {d.site!r}" for d in self.differences)
                       if self.differences else self.status)

    @property
    def frames(self) -> int:
        """Frames in ``up`` and ``down`` (for an interrupted attempt: what the site booked in it)."""
        return sum(d["frames"] for d in (self.up, self.down) if d is not None)

    def interruption(self) -> str:
        text = "an attempt interrupted by a server restart"
        if not self.frames:
            return text + ": the site booked no frame in it"
        assert self.up is not None and self.down is not None
        return (text + f": the site booked {self.frames} frame(s) the server could not (up {self.up['frames']} "
                f"frames / {self.up['bytes']} B, down {self.down['frames']} frames / {self.down['bytes']} B)")


@dataclass
class CrossCheckReport:
    site_id: str
    server: VerifyReport
    site: VerifyReport
    rounds: list[RoundCheck]

    @property
    def differences(self) -> list[Difference]:
        return [d for r in self.rounds for d in r.differences]

    @property
    def first_difference(self) -> Difference | None:
        diffs = self.differences
        return diffs[0] if diffs else None

    @property
    def agree(self) -> bool:
        return self.first_difference is None

    @property
    def interrupted(self) -> list[RoundCheck]:
        """The server restarts in the compared runs (status ``interrupted``), with what the site booked in each."""
        return [c for c in self.rounds if c.status == "interrupted"]

    def scope(self) -> str:
        """What was compared: "N round(s)", plus "and the exchange after the last round" when a tail was,
        plus one "; round r: an attempt interrupted by a server restart, ..." per restart (not compared)."""
        n_rounds = sum(not c.tail and c.status != "interrupted" for c in self.rounds)
        tail = " and the exchange after the last round" if any(c.tail for c in self.rounds) else ""
        runs = {c.run_id for c in self.rounds}
        notes = "".join(f"; {'run ' + c.run_id + ' ' if len(runs) > 1 else ''}round {c.round}: {c.interruption()}"
                        for c in self.interrupted)
        return f"{n_rounds} round(s){tail}{notes}"


def _compare(run: str, rnd: int, server: Mapping[str, Any], site: Mapping[str, Any],
             site_fingerprint: str | None = None) -> list[Difference]:
    out = []
    server_fp = server.get("cert_fingerprint")
    if server_fp is not None and site_fingerprint is not None and server_fp != site_fingerprint:
        out.append(Difference(run, rnd, "cert_fingerprint", server_fp, site_fingerprint))
    out += [Difference(run, rnd, f, server.get(f), site.get(f)) for f in SCALARS if server.get(f) != site.get(f)]
    s_led, t_led = server.get("ledger"), site["ledger"]
    if s_led is None:
        return out + [Difference(run, rnd, "ledger", None, "present")]
    return out + _compare_ledgers(run, rnd, s_led, t_led)


def _compare_ledgers(run: str, rnd: int, s_led: Mapping[str, Any], t_led: Mapping[str, Any],
                     prefix: str = "") -> list[Difference]:
    out = []
    for d in DIRECTIONS:
        a, b = s_led[d], t_led[d]
        for f in ("frames", "bytes"):
            if a[f] != b[f]:
                out.append(Difference(run, rnd, f"{prefix}ledger.{d}.{f}", a[f], b[f]))
        for t in sorted(set(a["types"]) | set(b["types"])):
            if a["types"].get(t, 0) != b["types"].get(t, 0):
                out.append(Difference(run, rnd, f"{prefix}ledger.{d}.types.{t}", a["types"].get(t, 0),
                                      b["types"].get(t, 0)))
        if a["digest"] != b["digest"]:
            out.append(Difference(run, rnd, f"{prefix}ledger.{d}.digest", a["digest"], b["digest"]))
    return out


def cross_check(server_log: str | Path, site_log: str | Path, *,
                server_keys: Mapping[str, Ed25519PublicKey] | None = None,
                site_keys: Mapping[str, Ed25519PublicKey] | None = None,
                require_complete: bool = True, allow_backfilled: bool = False) -> CrossCheckReport:
    """Verify both logs (signatures only when keys are given), then compare them round by round.

    Returns the report (``report.agree`` tells the outcome); raises AuditError when either
    log fails verification or the site log is not a single site's log.
    """
    server = verify_log(server_log, server_keys or {}, require_complete=require_complete,
                        signatures=server_keys is not None)
    site = verify_log(site_log, site_keys or {}, require_complete=require_complete, signatures=site_keys is not None)
    site_ids = {e["body"]["site_id"] for e in site.records if e["kind"].startswith("site_")}
    if len(site_ids) != 1:
        raise AuditError(f"{site_log}: expected the log of one site (site_run_start/site_round records), "
                         f"found site ids {sorted(site_ids) or 'none'}", check="cross-check")
    (site_id,) = site_ids

    srv: dict[tuple[str, int], dict[str, Any] | None] = {}  # None: round back-filled on the server
    srv_end: dict[str, dict[str, Any]] = {}  # run -> run_end body
    loc_end: dict[str, dict[str, Any]] = {}  # run -> site_run_end body
    restarts: dict[str, list[int]] = {}  # run -> rounds the server resumed at
    abandoned: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # run -> (ledger round, ledger) the site abandoned
    for e in server.records:
        b = e["body"]
        if e["kind"] == "run_end":
            srv_end[b["run_id"]] = b
        if e["kind"] == "round_interrupted":
            restarts.setdefault(b["run_id"], []).append(b["round"])
        if e["kind"] == "round":
            srv[(b["run_id"], b["round"])] = next((s for s in b["sites"] if s["site_id"] == site_id), {})
        elif e["kind"] == "round_backfill":
            srv[(b["run_id"], b["round"])] = None
    loc: dict[tuple[str, int], dict[str, Any] | None] = {}
    starts: dict[str, list[tuple[int, str | None]]] = {}  # run -> (first round, site's certificate fingerprint)
    for e in site.records:
        b = e["body"]
        if e["kind"] == "site_run_start":
            starts.setdefault(b["run_id"], []).append((b["round"], b["cert_fingerprint"]))
        if e["kind"] == "site_run_end":
            loc_end[b["run_id"]] = b
        if e["kind"] == "site_round_interrupted":
            abandoned.setdefault(b["run_id"], []).extend((x["round"], x["ledger"]) for x in b["ledgers"])
        if e["kind"] == "site_round":
            loc[(b["run_id"], b["round"])] = b
        elif e["kind"] == "site_round_backfill":
            loc[(b["run_id"], b["round"])] = None
    runs = {run for run, _ in loc}
    if not runs:
        runs = {e["body"]["run_id"] for e in site.records if e["kind"] == "site_run_start"}
    missing_runs = sorted(runs - set(server.runs))
    checks: list[RoundCheck] = []
    for run in missing_runs:
        first = min((r for (rr, r) in loc if rr == run), default=0)
        checks.append(RoundCheck(run, first, "differ", [Difference(run, first, "run_id", None, run)]))
    keys = sorted(k for k in set(srv) | set(loc) if k[0] in runs and k[0] not in missing_runs
                  and (k in loc or srv[k] != {}))  # server rounds without this site: nothing to compare
    for run, rnd in keys:
        a, b = srv.get((run, rnd), "absent"), loc.get((run, rnd), "absent")
        if a is None or b is None:
            diffs = [] if allow_backfilled else [Difference(run, rnd, "backfilled",
                                                            "back-filled" if a is None else "recorded",
                                                            "back-filled" if b is None else "recorded")]
            checks.append(RoundCheck(run, rnd, "backfilled", diffs))
        elif a == "absent":
            checks.append(RoundCheck(run, rnd, "differ",
                                     [Difference(run, rnd, "round", "no round record", "recorded")]))
        elif b == "absent":
            checks.append(RoundCheck(run, rnd, "differ",
                                     [Difference(run, rnd, "site_round", "site took part", "no site_round record")]))
        elif a == {}:
            checks.append(RoundCheck(run, rnd, "differ",
                                     [Difference(run, rnd, "sites", "site not listed", "site took part")]))
        else:
            assert isinstance(a, dict) and isinstance(b, dict)
            fp = next((f for r0, f in reversed(starts.get(run, [])) if r0 <= rnd), None)
            diffs = _compare(run, rnd, a, b, fp)
            checks.append(RoundCheck(run, rnd, "differ" if diffs else "agree", diffs,
                                     up=b["ledger"]["up"], down=b["ledger"]["down"]))
    for run in sorted(runs - set(missing_runs)):
        tail = _compare_tails(run, site_id, srv_end.get(run), loc_end.get(run))
        if tail is not None:
            checks.append(tail)
        checks += _interruptions(run, restarts.get(run, []), abandoned.get(run, []))
    if not checks:
        raise AuditError(f"{site_log}: no round of site {site_id} to compare with {server_log} "
                         "(no site_round records, or none for a run in the server log)", check="cross-check")
    checks.sort(key=lambda c: (server.runs.index(c.run_id) if c.run_id in server.runs else -1, c.round,
                               c.status != "interrupted"))
    return CrossCheckReport(site_id, server, site, checks)


def _interruptions(run: str, restarts: list[int], abandoned: list[tuple[int, dict[str, Any]]]) -> list[RoundCheck]:
    """One ``interrupted`` check per server restart, with the site's abandoned frames it explains; a difference
    for abandoned frames no restart explains (ledger round ``t`` is explained by a restart at ``c <= t <= c + 1``)."""
    booked: dict[int, list[dict[str, Any]]] = {c: [] for c in restarts}
    unexplained: dict[int, list[dict[str, Any]]] = {}
    for t, led in abandoned:
        c = max((c for c in restarts if c <= t <= c + 1), default=None)
        (booked[c] if c is not None else unexplained.setdefault(t, [])).append(led)
    out = []
    for c, ledgers in sorted(booked.items()):
        up, down = _total(ledgers, "up"), _total(ledgers, "down")
        out.append(RoundCheck(run, c, "interrupted", up=up, down=down))
    for t, ledgers in sorted(unexplained.items()):
        n = sum(_total(ledgers, d)["frames"] for d in DIRECTIONS)
        out.append(RoundCheck(run, t, "differ", [Difference(run, t, "interrupted", "no server restart at this round",
                                                            f"abandoned an exchange of {n} frame(s)")]))
    return out


def _total(ledgers: list[dict[str, Any]], direction: str) -> dict[str, Any]:
    return {"frames": sum(led[direction]["frames"] for led in ledgers),
            "bytes": sum(led[direction]["bytes"] for led in ledgers)}


def _compare_tails(run: str, site_id: str, server_end: Mapping[str, Any] | None,
                   site_end: Mapping[str, Any] | None) -> RoundCheck | None:
    """The run_end tail of one site on both sides (None when neither side has one for this site)."""
    entry = None
    if server_end is not None:
        entry = next((s["ledger"] for s in server_end["sites"] if s["site_id"] == site_id), None)
    if site_end is None:
        if entry is None:
            return None  # the site was gone before the end, or the run never finished: nothing to compare
        assert server_end is not None
        rnd = server_end["rounds"]
        return RoundCheck(run, rnd, "differ", [Difference(run, rnd, "run_end", "tail recorded",
                                                          "no site_run_end record")], tail=True)
    rnd = site_end["rounds"]
    if server_end is None:
        return RoundCheck(run, rnd, "differ", [Difference(run, rnd, "run_end", "no run_end record",
                                                          "tail recorded")], tail=True)
    diffs = []
    if server_end["rounds"] != rnd:
        diffs.append(Difference(run, rnd, "tail.rounds", server_end["rounds"], rnd))
    diffs += _compare_ledgers(run, rnd, entry if entry is not None else empty_summary(), site_end["ledger"], "tail.")
    return RoundCheck(run, rnd, "differ" if diffs else "agree", diffs, up=site_end["ledger"]["up"],
                      down=site_end["ledger"]["down"], tail=True)
