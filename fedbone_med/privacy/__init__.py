"""Site-side differential privacy: mechanisms on z and dF, one accountant per site, calibration.

The site runtime, each step (see the package README): ask the accountant whether the message's
releases fit the budget (``charge``), then apply the mechanism and send.
"""

from __future__ import annotations

from .accountant import SiteAccountant
from .calibrate import noise_for_target
from .clipping import clip_joint_per_sample, clip_per_sample, per_sample_norms
from .errors import BudgetExceeded, PrivacyError
from .mechanisms import GaussianActivationDP, LabelDP, Mechanism, Release

__all__ = [
    "BudgetExceeded",
    "GaussianActivationDP",
    "LabelDP",
    "Mechanism",
    "PrivacyError",
    "Release",
    "SiteAccountant",
    "clip_joint_per_sample",
    "clip_per_sample",
    "noise_for_target",
    "per_sample_norms",
]
