"""The audit error class.

Every failed audit check raises :class:`AuditError` (never returns ``False``), so a caller
cannot accidentally ignore a tampered log. Messages name the line and the check that
failed; they never contain record contents beyond identifiers and hashes.
"""

from __future__ import annotations

from ..errors import FedboneError


class AuditError(FedboneError):
    """An audit log or key failed a check (tampering, truncation, bad key, bad record).

    ``check`` names the failed check (e.g. ``"hash-chain"``) and ``line`` the 1-based line
    number when the failure is tied to a log line; both are ``None`` otherwise.
    """

    exit_code = 8

    def __init__(self, message: str, *, check: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.check = check
        self.line = line
