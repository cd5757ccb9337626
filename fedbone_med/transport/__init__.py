"""Transports between sites and the server (in-process; gRPC with mutual TLS)."""

from .base import Transport
from .inprocess import InProcessTransport
from .messages import JoinReply, JoinRequest, RoundReport, RoundSync, StepHeader

__all__ = ["InProcessTransport", "JoinReply", "JoinRequest", "RoundReport", "RoundSync", "StepHeader", "Transport"]
