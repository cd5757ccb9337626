"""In-process transport: the site calls the server coordinator directly.

Tensors are detached and copied at the cut, exactly as a network transport would
deliver them, so no autograd graph or storage is shared across the cut.

With ledgers (the in-process runner's audit logs), every exchange is booked at both ends as
over gRPC, with a canonical plaintext encoding of the message in place of the sealed frame
(:func:`fedbone_med.audit.ledger.plaintext_frame`), under the same round tags.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..audit.ledger import FrameLedger, LedgerBook, plaintext_frame
from . import wire
from .base import Transport
from .messages import JoinReply, JoinRequest, RoundReport, RoundSync, StepHeader

if TYPE_CHECKING:
    from ..server.coordinator import Coordinator


def _copy(t: Tensor) -> Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)  # as a wire delivers it


class InProcessTransport(Transport):
    def __init__(self, coordinator: Coordinator, *, site_ledger: FrameLedger | None = None,
                 server_ledger: LedgerBook | None = None) -> None:
        self.coordinator = coordinator
        self.site_ledger, self.server_ledger = site_ledger, server_ledger

    def _book(self, site: str, direction: str, msg_type: str, tag: int, step: int, header: dict,
              tensors: list[Tensor]) -> None:
        if self.site_ledger is None and self.server_ledger is None:
            return
        frame = plaintext_frame({**header, "type": msg_type},
                                *(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data
                                  for t in tensors))
        kind = wire.ledger_type(msg_type)
        if self.site_ledger is not None:
            self.site_ledger.record(direction, kind, tag, step, frame)
        if self.server_ledger is not None:
            self.server_ledger.record(site, direction, kind, tag, step, frame)

    def _exchange(self, header: StepHeader, req_type: str, reply_type: str, sent: list[Tensor],
                  call: Callable[[], list[Tensor]]) -> list[Tensor]:
        tags = wire.ledger_tags(req_type, header.round, header.mode)
        assert tags is not None
        head = wire.step_to_json(header)
        self._book(header.site, "up", req_type, tags[0], header.step, head, sent)
        out = call()
        self._book(header.site, "down", reply_type, tags[1], header.step, head, out)
        return out

    def join(self, request: JoinRequest) -> JoinReply:
        return self.coordinator.join(request)

    def forward(self, header: StepHeader, z: Tensor) -> list[Tensor]:
        z = _copy(z)
        return self._exchange(header, "forward", "features", [z],
                              lambda: [_copy(f) for f in self.coordinator.forward(header, z)])

    def backward(self, header: StepHeader, grads: list[Tensor]) -> Tensor:
        grads = [_copy(g) for g in grads]
        return self._exchange(header, "backward", "input-grad", grads,
                              lambda: [_copy(self.coordinator.backward(header, grads))])[0]

    def round_end(self, report: RoundReport) -> None:
        emb = None if report.embedding is None else {k: _copy(v) for k, v in report.embedding.items()}
        copy = RoundReport(report.site, report.round, report.samples, report.train_loss, dict(report.metrics),
                           emb, report.embedding_signature, dict(report.extra))
        meta, tensors = wire.round_report_to_wire(copy)
        head = {"site": report.site, "round": report.round, "report": meta}
        self._book(report.site, "up", "round-end", report.round, 0, head, tensors)
        self.coordinator.round_end(copy)
        self._book(report.site, "down", "ok", report.round + 1, 0, {"site": report.site, "round": report.round}, [])

    def round_sync(self, site: str, round: int) -> RoundSync:
        head = {"site": site, "round": round}
        self._book(site, "up", "round-sync", round + 1, 0, head, [])
        result = self.coordinator.round_sync(site, round)
        meta, tensors = wire.round_sync_to_wire(result)
        self._book(site, "down", "round-sync-reply", round + 1, 0, {**head, "sync": meta}, tensors)
        return result

    def leave(self, site: str, privacy: Mapping[str, float] | None = None) -> None:
        self.coordinator.leave(site, wire.leave_privacy(privacy))
