"""The server coordinator: runs the shared backbone for every site and trains it.

Per training step it keeps one gradient slot per site. ``forward`` runs the backbone on
a site's z and keeps the graph; ``backward`` back-propagates that site's dF into its own
slot g_k = d loss_k / d theta and returns dz. When every site's slot for the step is in,
the aggregator (conflicting-gradient projection by default) combines the slots and the
backbone optimizer steps. Slots are ordered by site name, never by arrival, so a run
is reproducible whichever transport delivered the messages.

Thread-safe: gRPC calls arrive on several threads; a condition variable holds a site's
next-step forward until the current step has been aggregated.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..aggregation import average_state_dicts, get_aggregator
from ..config import ServerConfig
from ..device import resolve_device
from ..errors import ProtocolError
from ..models import CutSpec, build_backbone, refuse_batchnorm
from ..optim import build_optimizer
from ..transport.messages import JoinReply, JoinRequest, RoundReport, RoundSync, StepHeader
from ..transport.validate import check_activation, check_feature_grads


@dataclass
class _SiteSession:
    request: JoinRequest
    last_sequence: int = -1
    pending: tuple[int, Tensor, list[Tensor]] | None = None  # (step, z leaf, features) awaiting backward


@dataclass
class _RoundState:
    reports: dict[str, RoundReport] = field(default_factory=dict)
    synced: dict[str, RoundSync] | None = None


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
    ) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.config_hash = config_hash
        self.embedding_fedavg = embedding_fedavg
        self.wait_timeout = wait_timeout
        self.device = resolve_device(cfg.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.backbone = build_backbone(cfg.backbone).to(self.device)
        refuse_batchnorm(self.backbone)
        self.params = [p for p in self.backbone.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)
        o = cfg.optimizer
        self.optimizer = build_optimizer(o.name, self.params, o.lr, o.weight_decay, o.momentum)
        agg = cfg.aggregation
        # Only the projection aggregator draws random orders (seeded) and takes a reduction.
        kwargs = {"seed": seed, "reduction": agg.reduction} if agg.method == "projection" else {}
        self.aggregator = get_aggregator(agg.method, **kwargs)
        self.cut = CutSpec.of(self.backbone, cfg.max_batch)
        self.step = 0  # the training step being collected
        self.round = 0
        self.sites: dict[str, _SiteSession] = {}
        self.slots: dict[str, Tensor] = {}
        self._slot_names: list[str] = []
        self._slot_matrix = torch.empty(0)
        self.step_log: list[dict[str, Any]] = []
        self.usage: dict[str, list[int]] = {}  # site -> [training steps, samples] since the last take_usage()
        self.rounds: dict[int, _RoundState] = {}
        self._cv = threading.Condition()

    # -- membership ---------------------------------------------------------------
    def join(self, request: JoinRequest) -> JoinReply:
        with self._cv:
            self.sites[request.site] = _SiteSession(request)
            return JoinReply(self.run_id, self.cut, self.round, self.step, self.config_hash)

    def leave(self, site: str) -> None:
        with self._cv:
            self.sites.pop(site, None)
            self.slots.pop(site, None)
            self._maybe_aggregate()
            self._cv.notify_all()

    def _session(self, header: StepHeader) -> _SiteSession:
        if header.run_id != self.run_id:
            raise ProtocolError(
                f"site '{header.site}': message for run {header.run_id!r}, this server runs {self.run_id!r}"
            )
        session = self.sites.get(header.site)
        if session is None:
            raise ProtocolError(f"site '{header.site}' has not joined this federation")
        if header.sequence <= session.last_sequence:
            raise ProtocolError(
                f"site '{header.site}': sequence number {header.sequence} is not above {session.last_sequence} "
                "(replayed or reordered message)"
            )
        session.last_sequence = header.sequence
        return session

    # -- the step protocol --------------------------------------------------------
    def forward(self, header: StepHeader, z: Tensor) -> list[Tensor]:
        """Backbone features for z; in training mode the graph is kept for ``backward``."""
        with self._cv:
            session = self._session(header)
            z = check_activation(z, self.cut, header.site).to(self.device, torch.float32)
            if header.mode == "eval":
                self.backbone.eval()
                with torch.no_grad():
                    feats = self.backbone(z)
                return [f.detach() for f in feats]
            self._wait_for_step(header)
            if header.site in self.slots:
                raise ProtocolError(f"site '{header.site}': a second training forward for step {header.step}")
            self.backbone.train()
            z_leaf = z.requires_grad_(True)
            feats = self.backbone(z_leaf)
            session.pending = (header.step, z_leaf, feats)
            return [f.detach() for f in feats]

    def _wait_for_step(self, header: StepHeader) -> None:
        if header.step < self.step:
            raise ProtocolError(f"site '{header.site}': step {header.step} is over; the server is at step {self.step}")
        deadline = time.monotonic() + self.wait_timeout
        while header.step > self.step:
            left = deadline - time.monotonic()
            if left <= 0 or not self._cv.wait(timeout=left):
                raise ProtocolError(
                    f"site '{header.site}': timed out waiting for the other sites to finish step {self.step}"
                )

    def backward(self, header: StepHeader, grads: list[Tensor]) -> Tensor:
        """Back-propagate a site's dF into its gradient slot; return dz."""
        with self._cv:
            session = self._session(header)
            if header.mode != "train" or session.pending is None or session.pending[0] != header.step:
                raise ProtocolError(f"site '{header.site}': backward for step {header.step} without its forward")
            _, z_leaf, feats = session.pending
            session.pending = None
            used = self.usage.setdefault(header.site, [0, 0])
            used[0] += 1
            used[1] += int(z_leaf.shape[0])
            grads = check_feature_grads(grads, feats, header.site)
            grads = [g.to(self.device) for g in grads]
            out = torch.autograd.grad(feats, [*self.params, z_leaf], grad_outputs=grads)
            row = self._slot_row(header.site)  # (P,), a row of the (K, P) slot matrix
            offset = 0
            for g in out[:-1]:
                row[offset : offset + g.numel()].copy_(g.reshape(-1))
                offset += g.numel()
            self.slots[header.site] = row
            self._maybe_aggregate()
            self._cv.notify_all()
            return out[-1].detach()

    def _slot_row(self, site: str) -> Tensor:
        """This step's gradient slot for ``site``: a row of one (K, P) matrix, rows in name order."""
        names = sorted(self.sites)
        if names != self._slot_names:  # membership changed: re-lay the slots already filled
            matrix = torch.empty(len(names), self.num_params, device=self.device)
            for i, n in enumerate(names):
                if n in self.slots:
                    matrix[i].copy_(self.slots[n])
            self._slot_matrix, self._slot_names = matrix, names
            self.slots = {n: matrix[i] for i, n in enumerate(names) if n in self.slots}
        return self._slot_matrix[names.index(site)]

    def _maybe_aggregate(self) -> None:
        expected = sorted(self.sites)
        if not expected or any(s not in self.slots for s in expected):
            return
        if expected == self._slot_names:
            stacked = self._slot_matrix  # (K, P), no copy
        else:  # a site left mid-step
            stacked = torch.stack([self.slots[s] for s in expected])
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
        self.step += 1

    def take_usage(self) -> dict[str, tuple[int, int]]:
        """Steps and samples per site since the last call (for the round's audit record)."""
        with self._cv:
            out = {k: (v[0], v[1]) for k, v in self.usage.items()}
            self.usage = {}
            return out

    # -- rounds -------------------------------------------------------------------
    def round_end(self, report: RoundReport) -> None:
        with self._cv:
            if report.site not in self.sites:
                raise ProtocolError(f"site '{report.site}' has not joined this federation")
            state = self.rounds.setdefault(report.round, _RoundState())
            state.reports[report.site] = report
            if set(state.reports) >= set(self.sites):
                state.synced = self._average_embeddings(state.reports)
                self.round = max(self.round, report.round + 1)
            self._cv.notify_all()

    def round_sync(self, site: str, round: int) -> RoundSync:
        with self._cv:
            deadline = time.monotonic() + self.wait_timeout
            while True:
                state = self.rounds.get(round)
                if state is not None and state.synced is not None:
                    return state.synced.get(site, RoundSync(round, None, (site,)))
                left = deadline - time.monotonic()
                if left <= 0 or not self._cv.wait(timeout=left):
                    raise ProtocolError(f"site '{site}': round {round} did not complete in time")

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
            "round": self.round,
            "step": self.step,
            "backbone": self.backbone.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "aggregator": self.aggregator.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.aggregator.load_state_dict(state["aggregator"])
        self.round = int(state["round"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"])
