"""Security errors raised by the sealed envelope and the session handshake.

Like pyca's Fernet, which turns every failure into one opaque ``InvalidToken``, every failure to
open a sealed message is one :class:`InvalidMessage`; every handshake failure is one
:class:`HandshakeError`. Each carries a short ``reason`` code (for logs and metrics) and never key
material, nonces, plaintext or tensor values.
"""

from __future__ import annotations

from fedbone_med.errors import FedboneError


class SecurityError(FedboneError):
    """A cryptographic check failed; the message or peer must not be trusted."""

    exit_code = 9

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        message = reason if not detail else f"{reason}: {detail}"
        super().__init__(message)


class InvalidMessage(SecurityError):
    """A sealed blob was refused by ``Session.open`` (or could not be reassembled from chunks).

    ``reason`` is one of: ``truncated``, ``version``, ``header-size``, ``header``, ``too-large``,
    ``length``, ``direction``, ``session``, ``replay``, ``authentication``, ``unexpected``,
    ``non-finite``, ``chunking``.
    """


class HandshakeError(SecurityError):
    """The session handshake failed: bad signature, tampered or replayed hello, wrong run or site."""


class SealError(SecurityError):
    """``Session.seal`` refused its input (unsupported dtype, wire overflow, wrong run/site/direction)."""
