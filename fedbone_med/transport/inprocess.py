"""In-process transport: the site calls the server coordinator directly.

Tensors are detached and copied at the cut, exactly as a network transport would
deliver them, so no autograd graph or storage is shared across the cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import Transport
from .messages import JoinReply, JoinRequest, RoundReport, RoundSync, StepHeader

if TYPE_CHECKING:
    from ..server.coordinator import Coordinator


def _copy(t: Tensor) -> Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)  # as a wire delivers it


class InProcessTransport(Transport):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def join(self, request: JoinRequest) -> JoinReply:
        return self.coordinator.join(request)

    def forward(self, header: StepHeader, z: Tensor) -> list[Tensor]:
        return [_copy(f) for f in self.coordinator.forward(header, _copy(z))]

    def backward(self, header: StepHeader, grads: list[Tensor]) -> Tensor:
        return _copy(self.coordinator.backward(header, [_copy(g) for g in grads]))

    def round_end(self, report: RoundReport) -> None:
        emb = None if report.embedding is None else {k: _copy(v) for k, v in report.embedding.items()}
        self.coordinator.round_end(
            RoundReport(
                report.site, report.round, report.samples, report.train_loss, dict(report.metrics),
                emb, report.embedding_signature, dict(report.extra),
            )
        )

    def round_sync(self, site: str, round: int) -> RoundSync:
        return self.coordinator.round_sync(site, round)

    def leave(self, site: str) -> None:
        self.coordinator.leave(site)
