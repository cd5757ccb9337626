"""Noise multiplier for a target (epsilon, delta), through Opacus's ``get_noise_multiplier``."""

from __future__ import annotations

from opacus.accountants.utils import get_noise_multiplier

from .accountant import ACCOUNTANTS
from .errors import PrivacyError
from .mechanisms import check_positive


def noise_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    releases_per_step: int = 1,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest sigma (to ``epsilon_tolerance``) whose composition stays within ``target_epsilon``.

    ``releases_per_step`` mechanisms at the same (sigma, q) per step (e.g. 2 with activation and
    label DP) compose as ``steps * releases_per_step`` releases. Raises PrivacyError for an
    impossible target.
    """
    eps = check_positive("target_epsilon", target_epsilon)
    d = check_positive("delta", delta)
    q = check_positive("sample_rate", sample_rate)
    if d >= 1 or q > 1:
        raise PrivacyError(f"delta must be < 1 and sample_rate <= 1 (got delta={d}, sample_rate={q})")
    for name, n in (("steps", steps), ("releases_per_step", releases_per_step)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PrivacyError(f"{name} must be an integer >= 1, got {n!r}")
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant: unknown name {accountant!r}; known: {', '.join(sorted(ACCOUNTANTS))}")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=eps,
                target_delta=d,
                sample_rate=q,
                steps=steps * releases_per_step,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
        )
    except ValueError as exc:
        raise PrivacyError(
            f"no noise multiplier reaches epsilon={eps:g} at delta={d:.3g} over {steps * releases_per_step} "
            f"releases at sample_rate={q:g}: {exc}"
        ) from exc
