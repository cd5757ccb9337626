"""The ``Transport`` interface: the only way a site talks to the server.

The site and server runtimes are the same code whichever transport carries the
messages: the in-process one (simulation, tests) or gRPC with mutual TLS.
Every method may raise :class:`fedbone_med.errors.ProtocolError`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

from torch import Tensor

from .messages import JoinReply, JoinRequest, RoundReport, RoundSync, StepHeader


class Transport(ABC):
    """One site's connection to the server."""

    @abstractmethod
    def join(self, request: JoinRequest) -> JoinReply:
        """Register the site; the reply states the cut the site's layers must fit."""

    @abstractmethod
    def forward(self, header: StepHeader, z: Tensor) -> list[Tensor]:
        """Send activations z (B, C, H, W); receive the backbone's feature maps F."""

    @abstractmethod
    def backward(self, header: StepHeader, grads: list[Tensor]) -> Tensor:
        """Send dF for the forward with the same step; receive dz (shape of z)."""

    @abstractmethod
    def round_end(self, report: RoundReport) -> None:
        """Report the end of a round (metrics, optionally the embedding for FedAvg)."""

    @abstractmethod
    def round_sync(self, site: str, round: int) -> RoundSync:
        """Fetch the end-of-round result once every site has reported."""

    @abstractmethod
    def leave(self, site: str, privacy: Mapping[str, float] | None = None) -> None:
        """Leave the federation cleanly; ``privacy``: the site's epsilon/delta spent so far, for the
        server's audit record of the round it leaves in (it sends no end-of-round report)."""
