"""The server coordinator: runs the shared backbone for every site and trains it.

Per training step it keeps one gradient slot per site. ``forward`` runs the backbone on
a site's z and keeps the graph; ``backward`` back-propagates that site's dF into its own
slot g_k = d loss_k / d theta and returns dz. When every site's slot for the step is in,
the aggregator (conflicting-gradient projection by default) combines the slots and the
backbone optimizer steps. Slots are ordered by site name, never by arrival, so a run
is reproducible whichever transport delivered the messages.

Thread-safe: gRPC calls arrive on several threads; a condition variable holds a site's
next-step forward until the current step has been aggregated.

Membership and failures (used by the networked server; the in-process runner needs none of it):

- ``expected_sites``: training forwards wait until every expected site has joined, or until
  :meth:`start` is called (the server does so after its join timeout, with at least ``min_sites``).
- A site that joins once training has started (a new site, or one that dropped and came back)
  is admitted at the start of the next round; its join reply names that round and step.
- ``step_deadline``: once the first gradient of a step has arrived, the others have this many
  seconds. Then the step aggregates over the sites that delivered if at least ``min_sites`` did,
  and is skipped otherwise; either way the sites that missed it are dropped (they rejoin at the
  next round). ``round_deadline`` does the same for end-of-round reports. Deadlines are checked by
  the threads waiting at the barrier, so no extra thread is needed.
- Every join, leave, dropout and skipped step is appended to ``events`` for the audit log.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..aggregation import average_state_dicts, build_aggregator
from ..config import ServerConfig
from ..device import resolve_device
from ..errors import ProtocolError, ServerHalted, SiteDropped
from ..models import CutSpec, build_backbone, refuse_batchnorm
from ..optim import build_optimizer
from ..transport.messages import JoinReply, JoinRequest, RoundReport, RoundSync, Schedule, StepHeader
from ..transport.validate import check_activation, check_feature_grads
from .events import Event, StepSkipped
from .membership import Clock, Deadlines, Membership, SiteSession
from .replicas import ReplicaSet
from .slots import SlotMatrix


@dataclass
class _RoundState:
    reports: dict[str, RoundReport] = field(default_factory=dict)
    synced: dict[str, RoundSync] | None = None
    first_report_at: float | None = None
    members: tuple[str, ...] = ()  # the sites whose reports completed the round


class Coordinator:
    """Server side of the FedBone step protocol (transport-independent)."""

    def __init__(
        self,
        cfg: ServerConfig,
        *,
        run_id: str,
        seed: int,
        config_hash: str = "",
        embedding_fedavg: bool = True,
        wait_timeout: float = 600.0,
        steps_per_round: int | None = None,
        expected_sites: Sequence[str] | None = None,
        min_sites: int = 1,
        step_deadline: float | None = None,
        round_deadline: float | None = None,
        rounds: int | None = None,
        wire_dtype: str = "float32",
        clock: Clock = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.config_hash = config_hash
        # The owner's configuration as canonical JSON, kept in checkpoints so a resume can say what changed.
        self.config_json = ""
        self.embedding_fedavg = embedding_fedavg
        self.wait_timeout = wait_timeout
        self.steps_per_round = steps_per_round
        self.schedule = (Schedule(rounds, steps_per_round, seed, embedding_fedavg, wire_dtype)
                         if rounds is not None and steps_per_round is not None else None)
        self.members = Membership(expected_sites, min_sites)
        self.deadlines = Deadlines(step_deadline, round_deadline, clock)
        self.halted: ServerHalted | None = None  # set when a round boundary could not be recorded
        self.device = resolve_device(cfg.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.backbone = build_backbone(cfg.backbone).to(self.device)
        self.seed = seed
        # Stochastic depth draws random masks in every training forward; they come from a generator
        # seeded by (run seed, step, site), not the process-wide one, so they do not depend on the
        # order in which sites' forwards arrive (networked) or on anything else the process drew.
        self._stochastic = cfg.backbone.drop_path_rate > 0
        refuse_batchnorm(self.backbone)
        self.params = [p for p in self.backbone.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)
        o = cfg.optimizer
        self.cadence = cfg.aggregation.cadence
        self.replicas: ReplicaSet | None = None
        if self.cadence == "round":
            # [server.optimizer] steps each site's replica; the global backbone moves once per round by
            # server_lr times the aggregated update (SGD on the pseudo-gradient -u: FedOpt with SGD)
            self.replicas = ReplicaSet(self.backbone, o)
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(self.params, lr=cfg.aggregation.server_lr)
        else:
            self.optimizer = build_optimizer(o.name, self.params, o.lr, o.weight_decay, o.momentum)
        self._rng_lock = threading.Lock()  # stochastic depth draws from the process RNG: one forward at a time
        self.aggregator = build_aggregator(cfg.aggregation, seed=seed, num_params=self.num_params)
        self.cut = CutSpec.of(self.backbone, cfg.max_batch, cfg.max_z_side)
        self.step = 0  # the training step being collected
        self.round = 0
        self.slots = SlotMatrix(self.num_params, self.device)  # the step cadence's per-site gradients
        self.step_log: list[dict[str, Any]] = []
        self.usage: dict[str, list[int]] = {}  # site -> [training steps, samples] since the last take_usage()
        self.rounds: dict[int, _RoundState] = {}
        # Called with the lock held when a round completes (round, its reports): the networked server
        # writes its checkpoint and audit record there, so both describe exactly the round boundary.
        self.on_round_finished: Callable[[int, dict[str, RoundReport]], None] | None = None
        # Re-entrant: the round-finished callback runs with the lock held and may call take_usage/take_events.
        self._cv = threading.Condition(threading.RLock())

    # -- membership (server/membership.py holds it; these are views) -------------------
    @property
    def sites(self) -> dict[str, SiteSession]:
        return self.members.sites

    @property
    def pending(self) -> dict[str, SiteSession]:
        return self.members.pending

    @property
    def dropped(self) -> dict[str, str]:
        return self.members.dropped

    @property
    def started(self) -> bool:
        return self.members.started

    @property
    def min_sites(self) -> int:
        return self.members.min_sites

    @property
    def events(self) -> list[Event]:
        return self.members.events

    @property
    def departed_privacy(self) -> dict[str, tuple[float | None, float | None]]:
        return self.members.departed_privacy

    @departed_privacy.setter
    def departed_privacy(self, value: dict[str, tuple[float | None, float | None]]) -> None:
        self.members.departed_privacy = value

    def _round_untouched(self) -> bool:
        """No step of the current round has started: a joining site can take part in it."""
        busy = bool(self.slots) or any(s.pending is not None for s in self.sites.values())
        if self.replicas is not None:
            return not busy and not self.replicas.stepped()
        if self.steps_per_round is None:
            return True
        return not busy and self.step == self.round * self.steps_per_round

    def join(self, request: JoinRequest) -> JoinReply:
        with self._cv:
            self._check_halted()
            name = request.site
            if name in self.sites and self.started:  # a member came back (restarted): its round is lost
                self._drop(name, "re-joined mid-round (restarted?)")
                self._membership_changed()
            rnd = self.members.admit(request, now=self._round_untouched(), round=self.round)
            if rnd == self.round:
                step = self.step
            else:
                step = rnd * self.steps_per_round if self.steps_per_round is not None else self.step
            self._cv.notify_all()
            return JoinReply(self.run_id, self.cut, rnd, step, self.config_hash, self.schedule)

    def start(self) -> int:
        """Start training with the sites that have joined (after the join timeout); returns how many."""
        with self._cv:
            n = self.members.start()
            self._cv.notify_all()
            return n

    def leave(self, site: str, privacy: tuple[float | None, float | None] | None = None) -> None:
        """A site leaves; ``privacy``: its (epsilon, delta) spent so far, kept in ``departed_privacy``
        for the audit record of the round it leaves in (a leaving site sends no end-of-round report)."""
        with self._cv:
            was_member = self.members.leave(site, self.round, privacy)
            self.slots.discard(site)
            if self.replicas is not None and was_member:
                self.replicas.discard(site)
            self._membership_changed()
            self._cv.notify_all()

    def _membership_changed(self) -> None:
        """A member left or was dropped (lock held): the barriers it held may now be complete."""
        if self.replicas is None:
            self._maybe_aggregate()
        state = self.rounds.get(self.round)
        if state is not None and state.synced is None and state.reports and set(state.reports) >= set(self.sites):
            self._finish_round(state)

    def _drop(self, site: str, reason: str) -> None:
        """Remove a member that failed (lock held); it may join again and is admitted next round."""
        if not self.members.drop(site, reason, self.round, self.step):
            return
        self.slots.discard(site)
        if self.replicas is not None:
            self.replicas.discard(site)
        self._cv.notify_all()

    def _check_deadlines(self) -> None:
        """Apply the step and round deadlines (lock held); called by threads waiting at a barrier."""
        if self.deadlines.step_expired():
            self._maybe_aggregate(deadline_passed=True)
        state = self.rounds.get(self.round)
        if state is not None and state.synced is None and self.deadlines.round_expired(state.first_report_at):
            for name in sorted(set(self.sites) - set(state.reports)):
                self._drop(name, f"no end-of-round report for round {self.round} before the deadline")
            self._finish_round(state)

    def _wait(self, left: float) -> bool:
        """Wait on the barrier (lock held) for at most ``left`` seconds, checking deadlines."""
        if left <= 0:
            return False
        self._cv.wait(timeout=self.deadlines.tick(left))
        self._check_halted()
        self._check_deadlines()
        return True
    def _session(self, header: StepHeader) -> SiteSession:
        return self.members.session(header, self.run_id, self.round)

    # -- the step protocol --------------------------------------------------------
    def forward(self, header: StepHeader, z: Tensor) -> list[Tensor]:
        """Backbone features for z; in training mode the graph is kept for ``backward``."""
        with self._cv:
            self._check_halted()
            self._wait_until_admitted(header)
            session = self._session(header)
            z = check_activation(z, self.cut, header.site).to(self.device, torch.float32)
            if header.mode == "eval":
                self.backbone.eval()
                with torch.no_grad():
                    feats = self.backbone(z)
                return [f.detach() for f in feats]
            if self.replicas is not None:
                self._wait_for_round(header)
                if session.pending is not None:
                    raise ProtocolError(f"site '{header.site}': a training forward for step {header.step} before "
                                        f"the backward of step {session.pending[0]}")
                session.pending = (header.step, z, [])  # reserved: this site's replica is computing
            else:
                return self._slot_forward(header, session, z)
        return self._replica_forward(header, session, z)

    def _slot_forward(self, header: StepHeader, session: SiteSession, z: Tensor) -> list[Tensor]:
        """Step cadence (lock held): the global backbone, once every site's step before has been aggregated."""
        with self._cv:
            self._wait_for_step(header)
            if header.site in self.slots:
                raise ProtocolError(f"site '{header.site}': a second training forward for step {header.step}")
            self.backbone.train()
            z_leaf = z.requires_grad_(True)
            if self._stochastic:
                with self._step_rng(header):
                    feats = self.backbone(z_leaf)
            else:
                feats = self.backbone(z_leaf)
            session.pending = (header.step, z_leaf, feats)
            return [f.detach() for f in feats]

    def _replica_forward(self, header: StepHeader, session: SiteSession, z: Tensor) -> list[Tensor]:
        """Round cadence: the site's replica computes outside the coordinator's lock."""
        assert self.replicas is not None
        z_leaf = z.requires_grad_(True)
        rng = (lambda: self._locked_step_rng(header)) if self._stochastic else contextlib.nullcontext
        try:
            feats = self.replicas.forward(header.site, z_leaf, rng)
        except BaseException:
            with self._cv:
                session.pending = None
            raise
        with self._cv:
            if self.sites.get(header.site) is not session:
                raise SiteDropped(f"site '{header.site}' was dropped ({self.dropped.get(header.site, 'left')})")
            session.pending = (header.step, z_leaf, feats)
        return [f.detach() for f in feats]

    @contextlib.contextmanager
    def _locked_step_rng(self, header: StepHeader) -> Iterator[None]:
        with self._rng_lock, self._step_rng(header):
            yield

    def _wait_for_round(self, header: StepHeader) -> None:
        """Round cadence (lock held): a site trains its steps of the current round at its own pace."""
        if header.round < self.round:
            raise SiteDropped(f"site '{header.site}': round {header.round} is over; the server is in round "
                              f"{self.round}")
        if self.steps_per_round is not None and header.step // self.steps_per_round != header.round:
            raise ProtocolError(f"site '{header.site}': step {header.step} is not in round {header.round}")
        deadline = time.monotonic() + self.wait_timeout
        while header.round > self.round or not self.started:
            if not self._wait(deadline - time.monotonic()):
                raise ProtocolError(f"site '{header.site}': timed out waiting for round {header.round} to start")
            if header.site not in self.sites:
                raise SiteDropped(f"site '{header.site}' was dropped ({self.dropped.get(header.site, 'left')})")

    @contextlib.contextmanager
    def _step_rng(self, header: StepHeader) -> Iterator[None]:
        """The global RNG (CPU and this device's), seeded from (run seed, step, site), restored after."""
        digest = hashlib.sha256(f"{self.seed}:{header.step}:{header.site}".encode()).digest()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
            yield

    def _wait_until_admitted(self, header: StepHeader) -> None:
        """A site that joined mid-round (pending) and already asks for its first step waits for the round
        it was admitted to, instead of being bounced (it would join again and be dropped as restarted)."""
        if header.site not in self.pending or header.site in self.sites or header.run_id != self.run_id:
            return
        deadline = time.monotonic() + self.wait_timeout
        while header.site in self.pending:
            if not self._wait(deadline - time.monotonic()):
                raise SiteDropped(f"site '{header.site}' is admitted from round {self.round + 1}; it timed out "
                                  "waiting for the current round to finish")

    def _wait_for_step(self, header: StepHeader) -> None:
        if header.step < self.step:
            raise ProtocolError(f"site '{header.site}': step {header.step} is over; the server is at step {self.step}")
        deadline = time.monotonic() + self.wait_timeout
        while header.step > self.step or not self.started:
            if not self._wait(deadline - time.monotonic()):
                raise ProtocolError(
                    f"site '{header.site}': timed out waiting for the other sites to finish step {self.step}"
                    if self.started else f"site '{header.site}': timed out waiting for the federation to start"
                )
            if header.site not in self.sites:
                raise SiteDropped(f"site '{header.site}' was dropped ({self.dropped.get(header.site, 'left')})")
        if header.step < self.step:  # the step was closed by its deadline while this site waited
            raise SiteDropped(f"site '{header.site}': step {header.step} is over; the server is at step {self.step}")

    def backward(self, header: StepHeader, grads: list[Tensor]) -> Tensor:
        """Back-propagate a site's dF into its gradient slot; return dz."""
        with self._cv:
            self._check_halted()
            session = self._session(header)
            if (header.mode != "train" or session.pending is None or session.pending[0] != header.step
                    or not session.pending[2]):  # (a round-cadence forward still computing has no features yet)
                raise ProtocolError(f"site '{header.site}': backward for step {header.step} without its forward")
            _, z_leaf, feats = session.pending
            session.pending = None
            used = self.usage.setdefault(header.site, [0, 0])
            used[0] += 1
            used[1] += int(z_leaf.shape[0])
            grads = check_feature_grads(grads, feats, header.site)
            grads = [g.to(self.device) for g in grads]
            if self.replicas is None:
                return self._slot_backward(header.site, feats, grads, z_leaf)
        # round cadence: the site's replica steps at once, outside the coordinator's lock
        dz = self.replicas.backward(header.site, feats, grads, z_leaf)
        with self._cv:
            self._cv.notify_all()
        return dz

    def _slot_backward(self, site: str, feats: list[Tensor], grads: list[Tensor], z_leaf: Tensor) -> Tensor:
        """Step cadence (lock held): the site's backbone gradient into its slot; aggregate when all are in."""
        with self._cv:
            out = torch.autograd.grad(feats, [*self.params, z_leaf], grad_outputs=grads)
            self.slots.put(site, self.sites, out[:-1])
            self.deadlines.step_started()
            self._maybe_aggregate()
            self._cv.notify_all()
            return out[-1].detach()

    def _maybe_aggregate(self, deadline_passed: bool = False) -> None:
        expected = sorted(self.sites)
        if not expected and not self.slots:
            return
        if any(s not in self.slots for s in expected):
            if not deadline_passed:
                return
            missing = [s for s in expected if s not in self.slots]
            for name in missing:
                self._drop(name, f"missed the deadline of step {self.step}")
            expected = sorted(self.sites)
            if len(expected) < self.min_sites:
                self.events.append(StepSkipped(round=self.round, step=self.step, sites=tuple(expected),
                                               reason=f"{len(expected)} site(s) delivered, fewer than "
                                                      f"min_sites={self.min_sites}"))
                for s in list(self.sites.values()):
                    s.pending = None
                self.slots.clear()
                self.deadlines.step_closed()
                self.step += 1
                self._cv.notify_all()
                return
        stacked = self.slots.stacked(expected)  # (K, P), rows in site-name order
        combined, stats = self.aggregator(stacked, site_names=tuple(expected))
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = combined[offset : offset + n].view_as(p)  # views of the fresh combined vector
            offset += n
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_log.append({"step": self.step, "round": self.round, **stats.to_dict()})
        self.slots.clear()
        self.deadlines.step_closed()
        self.step += 1
        self._cv.notify_all()

    def _aggregate_replicas(self, reported: list[str]) -> None:
        """Round cadence, at the round's end (lock held): aggregate the updates of the replicas of the sites
        that finished the round, move the global backbone, restart every replica from it."""
        assert self.replicas is not None
        stepped = set(self.replicas.stepped())
        names = [n for n in reported if n in stepped]
        last_step = (self.round + 1) * self.steps_per_round - 1 if self.steps_per_round is not None else self.step
        if len(names) < self.min_sites or not names:
            self.events.append(StepSkipped(round=self.round, step=last_step, sites=tuple(names),
                                           reason=f"{len(names)} site(s) finished the round, fewer than "
                                                  f"min_sites={self.min_sites}: the backbone did not move"))
        else:
            updates = self.replicas.updates(names, self.params)  # (K, P): u_k = theta_k - theta
            combined, stats = self.aggregator(updates, site_names=tuple(names))
            offset = 0
            for p in self.params:  # theta <- theta + server_lr * u: SGD on the pseudo-gradient -u
                n = p.numel()
                p.grad = combined[offset : offset + n].view_as(p).neg()
                offset += n
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step_log.append({"step": last_step, "round": self.round, **stats.to_dict()})
        self.replicas.restart()

    def take_usage(self) -> dict[str, tuple[int, int]]:
        """Steps and samples per site since the last call (for the round's audit record)."""
        with self._cv:
            out = {k: (v[0], v[1]) for k, v in self.usage.items()}
            self.usage = {}
            return out

    # -- rounds -------------------------------------------------------------------
    def round_end(self, report: RoundReport) -> None:
        with self._cv:
            self._check_halted()
            if report.site not in self.sites:
                if report.site in self.dropped:
                    raise SiteDropped(f"site '{report.site}' was dropped ({self.dropped[report.site]}); join again")
                raise ProtocolError(f"site '{report.site}' has not joined this federation")
            if report.round != self.round:
                raise ProtocolError(f"site '{report.site}': report for round {report.round}, the server is in "
                                    f"round {self.round}")
            state = self.rounds.setdefault(report.round, _RoundState())
            if state.first_report_at is None:
                state.first_report_at = self.deadlines.clock()
            state.reports[report.site] = report
            if set(state.reports) >= set(self.sites):
                self._finish_round(state)
            self._cv.notify_all()

    def _finish_round(self, state: _RoundState) -> None:
        """Every member reported (or the round deadline passed): average, advance, admit new sites."""
        reports = {k: v for k, v in state.reports.items() if k in self.sites}
        if self.replicas is not None:
            self._aggregate_replicas(sorted(reports))
        state.synced = self._average_embeddings(reports) if reports else {}
        state.members = tuple(sorted(reports))
        finished = self.round
        self.round += 1
        if self.steps_per_round is not None:
            # A round whose steps were cut short (every site dropped) still ends where the schedule says.
            self.step = max(self.step, self.round * self.steps_per_round)
        self.members.promote_pending()
        for old in [r for r in self.rounds if r < finished]:  # keep only the last round's sync
            del self.rounds[old]
        if self.on_round_finished is not None:
            try:
                self.on_round_finished(finished, reports)  # lock held: nothing moves until it returns
            except BaseException as exc:
                # The round is not complete: its checkpoint or audit record is not on disk. No site may
                # see it as complete (its sync) and nothing may go on: every call from now on is refused
                # as retryable, and the owner stops the server (restart with --resume).
                # (the operator's details -- paths, errno -- stay in the server's own log)
                self.halted = ServerHalted(f"the server could not record the end of round {finished} and stops; "
                                           "it will train the round again when its operator resumes it: "
                                           "reconnect and retry")
                state.synced = None
                self._cv.notify_all()
                raise self.halted from exc
        self._cv.notify_all()

    def _check_halted(self) -> None:
        if self.halted is not None:
            raise self.halted

    def round_sync(self, site: str, round: int) -> RoundSync:
        with self._cv:
            self._check_halted()
            deadline = time.monotonic() + self.wait_timeout
            while True:
                state = self.rounds.get(round)
                if state is not None and state.synced is not None:
                    if site not in state.members:
                        raise SiteDropped(f"site '{site}' did not report round {round}; join again")
                    return state.synced.get(site, RoundSync(round, None, (site,)))
                if site not in self.sites:
                    raise SiteDropped(f"site '{site}' was dropped ({self.dropped.get(site, 'left')}); join again")
                if not self._wait(deadline - time.monotonic()):
                    raise ProtocolError(f"site '{site}': round {round} did not complete in time")

    def member_count(self) -> int:
        with self._cv:
            return len(self.sites)

    def take_events(self) -> list[Event]:
        with self._cv:
            out, self.members.events = self.members.events, []
            return out

    def _average_embeddings(self, reports: dict[str, RoundReport]) -> dict[str, RoundSync]:
        """FedAvg of embeddings among sites with the same modality and architecture."""
        groups: dict[tuple[str, str], list[str]] = {}
        for name in sorted(reports):
            r = reports[name]
            if self.embedding_fedavg and r.embedding is not None and r.embedding_signature:
                modality = self.sites[name].request.modality if name in self.sites else "?"
                groups.setdefault((modality, r.embedding_signature), []).append(name)
        out: dict[str, RoundSync] = {}
        rnd = next(iter(reports.values())).round
        for members in groups.values():
            if len(members) < 2:
                continue
            states = [reports[m].embedding for m in members]
            weights = [float(reports[m].samples) for m in members]
            avg = average_state_dicts(states, weights)  # type: ignore[arg-type]
            for m in members:
                out[m] = RoundSync(rnd, avg, tuple(members))
        return out

    # -- checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "server",
            "software_version": __version__,
            "run_id": self.run_id,
            "config_hash": self.config_hash,
            "config_json": self.config_json,
            "round": self.round,
            "step": self.step,
            "backbone": self.backbone.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "aggregator": self.aggregator.state_dict(),
            "cadence": self.cadence,
            "replica_optimizers": self.replicas.state_dict() if self.replicas is not None else None,
            "rng": torch.get_rng_state(),
            "last_sync": self._last_sync_state(),
        }

    def _last_sync_state(self) -> dict[str, Any] | None:
        """The last completed round's sync, so sites can still fetch it from a restarted server."""
        done = [r for r, st in self.rounds.items() if st.synced is not None]
        if not done:
            return None
        r = max(done)
        st = self.rounds[r]
        assert st.synced is not None
        return {
            "round": r,
            "members": list(st.members),
            "synced": {site: {"embedding": rs.embedding, "group": list(rs.group)} for site, rs in st.synced.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.aggregator.load_state_dict(state["aggregator"])
        if self.replicas is not None and state.get("replica_optimizers") is not None:
            self.replicas.load_state_dict(state["replica_optimizers"])
        self.round = int(state["round"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"])
        last = state.get("last_sync")
        if last is not None:
            r = int(last["round"])
            synced = {site: RoundSync(r, v["embedding"], tuple(v["group"])) for site, v in last["synced"].items()}
            self.rounds = {r: _RoundState(synced=synced, members=tuple(last["members"]))}
