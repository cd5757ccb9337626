"""Errors of the privacy package.

Messages name the parameter or budget that failed; they never contain tensor values.
"""

from __future__ import annotations

from ..errors import FedboneError


class PrivacyError(FedboneError):
    """A privacy parameter is invalid, or a release was refused (non-finite input, bad state)."""

    exit_code = 10


class BudgetExceeded(PrivacyError):
    """Sending the message would spend more than the site's privacy budget; nothing was recorded."""
