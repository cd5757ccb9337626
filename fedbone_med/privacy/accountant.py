"""One privacy accountant per site, over Opacus's RDP or PRV accountants.

Every release that leaves the site (each mechanism used at each step) is one sampled Gaussian
mechanism (sigma, q = batch / N); the accountant composes them all. Composition is commutative,
so identical (sigma, q) entries are merged (``history`` stays short however releases interleave).

Budget checks raise (``charge``): a site asks before sending, and a message that would overspend
is refused with ``BudgetExceeded`` and nothing is recorded.

delta defaults to 1 / (10 N): it must be well below 1/N, since a mechanism that publishes one
record in the clear with probability 1/N is (0, 1/N)-DP.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from .errors import BudgetExceeded, PrivacyError
from .mechanisms import Release, check_positive

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), as in Opacus


def _make(kind: str) -> IAccountant:
    if kind not in ACCOUNTANTS:
        raise PrivacyError(f"accountant: unknown name {kind!r}; known: {', '.join(sorted(ACCOUNTANTS))}")
    return ACCOUNTANTS[kind]()


def _check_entry(sigma: float, q: float, steps: int) -> HistoryEntry:
    s = check_positive("noise_multiplier", sigma)
    r = check_positive("sample_rate", q)
    if r > 1:
        raise PrivacyError(f"sample_rate must be <= 1, got {r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrivacyError(f"steps must be an integer >= 1, got {steps!r}")
    return (s, r, steps)


def compact(history: Iterable[Sequence[Any]]) -> list[HistoryEntry]:
    """Merge entries with the same (sigma, q), summing steps; order of first appearance kept."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        key = (float(sigma), float(q))
        merged[key] = merged.get(key, 0) + int(steps)
    return [(s, q, n) for (s, q), n in merged.items()]


def _as_release(r: Release | Sequence[Any]) -> Release:
    return r if isinstance(r, Release) else Release(*r)


class SiteAccountant:
    """Composes every release of one site; epsilon for a fixed delta; budget checks that raise."""

    def __init__(self, num_records: int, delta: float | None = None, accountant: str = "rdp") -> None:
        if isinstance(num_records, bool) or not isinstance(num_records, int) or num_records < 1:
            raise PrivacyError(f"num_records must be an integer >= 1, got {num_records!r}")
        self.num_records = num_records
        self.delta = 1.0 / (10 * num_records) if delta is None else check_positive("delta", delta)
        if self.delta >= 1.0 / num_records:
            raise PrivacyError(
                f"delta must be < 1/num_records = {1.0 / num_records:.3g} (got {self.delta:.3g}); "
                "a larger delta allows publishing a record outright"
            )
        self.kind = accountant
        self._acc = _make(accountant)
        self._counts: dict[str, int] = {}
        self._rdp_cache: dict[tuple[float, float], np.ndarray] = {}

    # -- recording ---------------------------------------------------------------------------
    def record(self, mechanism_name: str, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Compose ``steps`` releases of one mechanism at (sigma, q)."""
        entry = _check_entry(noise_multiplier, sample_rate, steps)
        self._acc.history = compact([*self._acc.history, entry])
        self._counts[mechanism_name] = self._counts.get(mechanism_name, 0) + steps

    def record_releases(self, releases: Sequence[Release | Sequence[Any]]) -> None:
        for r in map(_as_release, releases):
            self.record(r.mechanism, r.noise_multiplier, r.sample_rate)

    # -- queries -----------------------------------------------------------------------------
    @property
    def history(self) -> list[HistoryEntry]:
        return list(self._acc.history)

    @property
    def releases(self) -> dict[str, int]:
        """Number of releases recorded per mechanism name (for the audit log)."""
        return dict(self._counts)

    def _rdp_one(self, sigma: float, q: float) -> np.ndarray:
        """RDP curve of one release at (sigma, q), cached: the analysis costs up to ~0.1 s."""
        key = (sigma, q)
        if key not in self._rdp_cache:
            orders = RDPAccountant.DEFAULT_ALPHAS
            self._rdp_cache[key] = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
        return self._rdp_cache[key]

    def _epsilon_of(self, history: list[HistoryEntry]) -> float:
        if not history:
            return 0.0
        if self.kind == "rdp":
            # Same sum and conversion as RDPAccountant.get_epsilon (compute_rdp is linear in steps).
            rdp = sum(self._rdp_one(s, q) * n for s, q, n in history)
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=self.delta)
            return float(eps)
        acc = _make(self.kind)
        acc.history = history
        return float(acc.get_epsilon(delta=self.delta))

    def epsilon(self) -> float:
        """Epsilon spent so far at this accountant's delta (0 before any release)."""
        return self._epsilon_of(self.history)

    def epsilon_after(self, releases: Sequence[Release | Sequence[Any]]) -> float:
        """Epsilon if ``releases`` were recorded; computed on a copy, this accountant is unchanged."""
        extra = [_check_entry(r.noise_multiplier, r.sample_rate, 1) for r in map(_as_release, releases)]
        return self._epsilon_of(compact([*self.history, *extra]))

    def would_exceed(self, budget_epsilon: float, releases: Sequence[Release | Sequence[Any]]) -> bool:
        """Whether sending ``releases`` would take epsilon above ``budget_epsilon`` (on a copy)."""
        budget = check_positive("budget_epsilon", budget_epsilon)
        return self.epsilon_after(releases) > budget

    def charge(self, budget_epsilon: float, releases: Sequence[Release | Sequence[Any]]) -> float:
        """Record ``releases`` if epsilon stays <= budget, and return the new epsilon.

        Raises BudgetExceeded, recording nothing, if it would not: the message must not be sent.
        """
        budget = check_positive("budget_epsilon", budget_epsilon)
        after = self.epsilon_after(releases)
        if after > budget:
            raise BudgetExceeded(
                f"privacy budget epsilon={budget:g} (delta={self.delta:.3g}) would be exceeded: "
                f"epsilon is {self.epsilon():.4g} now and would be {after:.4g} after this message; "
                "it was not sent"
            )
        self.record_releases(releases)
        return after

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, lists, tuples, dicts): safe for torch.load(weights_only=True)."""
        return {
            "accountant": self.kind,
            "delta": float(self.delta),
            "num_records": int(self.num_records),
            "history": [(float(s), float(q), int(n)) for s, q, n in self._acc.history],
            "releases": {str(k): int(v) for k, v in self._counts.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``; refuses a different accountant, delta or dataset size."""
        missing = {"accountant", "delta", "num_records", "history", "releases"} - set(state)
        if missing:
            raise PrivacyError(f"accountant state: missing keys {sorted(missing)}")
        if state["accountant"] != self.kind:
            raise PrivacyError(f"accountant state is for {state['accountant']!r}, this accountant is {self.kind!r}")
        if int(state["num_records"]) != self.num_records or not math.isclose(float(state["delta"]), self.delta):
            raise PrivacyError(
                f"accountant state has num_records={state['num_records']}, delta={state['delta']}; "
                f"this accountant has num_records={self.num_records}, delta={self.delta}"
            )
        history = [_check_entry(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self._acc = _make(self.kind)
        self._acc.history = compact(history)
        self._counts = {str(k): int(v) for k, v in dict(state["releases"]).items()}

    def __repr__(self) -> str:
        eps = self.epsilon()
        return f"SiteAccountant({self.kind}, N={self.num_records}, delta={self.delta:.3g}, epsilon={eps:.4g})"
