"""Make a site's own modules (embedding, adaptation, head) Opacus DP-SGD compatible.

Thin wrappers over ``opacus.validators.ModuleValidator``: ``validate_module`` reports every
problem at once with its reason (e.g. BatchNorm mixes samples, so per-sample gradients do not
exist); ``fix_module`` replaces what Opacus can replace (BatchNorm -> GroupNorm, ...).
Wiring the DP-SGD optimizer (``PrivacyEngine``) into the site runtime is not done here.
"""

from __future__ import annotations

from opacus.validators import ModuleValidator
from torch import nn

from .errors import PrivacyError


def validate_module(module: nn.Module) -> list[str]:
    """Every reason ``module`` cannot be trained with DP-SGD; an empty list if it can."""
    return [str(err) for err in ModuleValidator.validate(module, strict=False)]


def check_module(module: nn.Module, what: str = "module") -> None:
    """Raise PrivacyError listing every problem, if any."""
    problems = validate_module(module)
    if problems:
        raise PrivacyError(f"{what} is not DP-SGD compatible: " + "; ".join(problems))


def fix_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with Opacus's replacements applied; raises if problems remain."""
    fixed = ModuleValidator.fix(module)
    check_module(fixed, "module after fix")
    return fixed
