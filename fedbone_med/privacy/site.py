"""A site's privacy state: its mechanisms on z and dF, its accountants and its budget.

Each training step the site first *charges* the step's releases (activation DP on z and
label DP on dF, each a subsampled Gaussian release at q = B / N) against its budget, and
only then sends anything; a step that would overspend raises :class:`BudgetExceeded` with
nothing sent, so the budget is never exceeded. Validation passes also send z: they are
charged to a second accountant over the validation records (one full pass = one release
at q = 1), and skipped when that would overspend. Both accountants and the noise
generators are part of the site checkpoint, so a restart never resets the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import PrivacyConfig
from .accountant import SiteAccountant
from .calibrate import noise_for_target
from .errors import BudgetExceeded, PrivacyError
from .mechanisms import GaussianActivationDP, LabelDP, Release


class SitePrivacy:
    def __init__(self, cfg: PrivacyConfig, *, num_train: int, num_val: int, batch_size: int, planned_steps: int,
                 seed: int) -> None:
        self.cfg = cfg
        self.sample_rate = min(1.0, batch_size / num_train)
        self.train = SiteAccountant(num_train, cfg.delta, cfg.accountant)
        self.val = SiteAccountant(max(num_val, 1), None, cfg.accountant)
        per_step = int(cfg.activation_dp) + int(cfg.label_dp) + int(cfg.dpsgd)
        if cfg.noise_multiplier is not None:
            sigma = cfg.noise_multiplier
        elif cfg.target_epsilon is not None:
            sigma = noise_for_target(cfg.target_epsilon, self.train.delta, self.sample_rate, planned_steps,
                                     cfg.accountant, releases_per_step=per_step)
        else:
            raise PrivacyError("privacy: give target_epsilon or noise_multiplier")
        self.sigma = sigma
        self.budget = cfg.epsilon_budget if cfg.epsilon_budget is not None else float(cfg.target_epsilon or 0.0)
        self.validation_budget = cfg.validation_epsilon_budget or self.budget
        self._generators: list[torch.Generator] = []

        def gen(i: int) -> torch.Generator | None:
            if cfg.secure_mode:
                return None
            g = torch.Generator().manual_seed((seed + 7919 * i) % 2**63)
            self._generators.append(g)
            return g

        self.activation = GaussianActivationDP(cfg.activation_clip, sigma, gen(1), cfg.secure_mode) \
            if cfg.activation_dp else None
        self.label = LabelDP(cfg.label_clip, sigma, gen(2), cfg.secure_mode) if cfg.label_dp else None
        # DP-SGD's noise generator (the optimizer itself is built by the site runtime).
        self.dpsgd_generator = gen(3) if cfg.dpsgd else None

    def charge_step(self) -> float:
        """Account this step's releases, or raise BudgetExceeded (nothing may be sent then)."""
        releases = [m.release(self.sample_rate) for m in (self.activation, self.label) if m is not None]
        if self.cfg.dpsgd:
            releases.append(Release(self.sigma, self.sample_rate, "dpsgd"))
        return self.train.charge(self.budget, releases)

    def charge_evaluation(self) -> bool:
        """Account one validation pass; False (nothing charged) if it would overspend."""
        if self.activation is None:
            return True  # label DP only: validation sends z in the clear; documented in SECURITY.md
        try:
            self.val.charge(self.validation_budget, [Release(self.activation.noise_multiplier, 1.0, "validation")])
        except BudgetExceeded:
            return False
        return True

    def noise_activation(self, z: Tensor) -> Tensor:
        return z if self.activation is None else self.activation.apply(z)

    def noise_feature_grads(self, grads: Sequence[Tensor]) -> list[Tensor]:
        return list(grads) if self.label is None else self.label.apply(grads)

    def report(self) -> dict[str, float]:
        return {
            "epsilon": self.train.epsilon(),
            "delta": self.train.delta,
            "epsilon_validation": self.val.epsilon(),
            "noise_multiplier": self.sigma,
            "epsilon_budget": self.budget,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "train": self.train.state_dict(),
            "val": self.val.state_dict(),
            "generators": [g.get_state() for g in self._generators],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state["train"])
        self.val.load_state_dict(state["val"])
        for g, s in zip(self._generators, state["generators"], strict=True):
            g.set_state(s)
