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

import os
from collections.abc import Sequence
from pathlib import Path
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
        self._journal: Path | None = None
        self.journal_count = 0  # charges journaled so far (the checkpoint's accountant covers this many)

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

    def _step_releases(self) -> list[Release]:
        releases = [m.release(self.sample_rate) for m in (self.activation, self.label) if m is not None]
        if self.cfg.dpsgd:
            releases.append(Release(self.sigma, self.sample_rate, "dpsgd"))
        return releases

    def _validation_releases(self) -> list[Release]:
        assert self.activation is not None
        return [Release(self.activation.noise_multiplier, 1.0, "validation")]

    def charge_step(self) -> float:
        """Account this step's releases, or raise BudgetExceeded (nothing may be sent then)."""
        eps = self.train.charge(self.budget, self._step_releases())
        self._journal_write(b"train\n")
        return eps

    # -- write-ahead journal ------------------------------------------------------------------
    def attach_journal(self, path: str | Path, *, fresh: bool) -> int:
        """Journal every charge to ``path`` (appended and fsync'd before the message it pays for is sent).

        Protects the budget against a crash: a checkpoint holds the accountant of the last completed
        round, and the releases of a partial round would otherwise be forgotten by a restart. With
        ``fresh=False`` (a resume, after :meth:`load_state_dict`) the charges the journal holds beyond
        the checkpoint are replayed into the accountants; ``fresh=True`` starts an empty journal.
        Returns the number of charges replayed.
        """
        self._journal = Path(path)
        self._journal.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            with open(self._journal, "wb") as fh:
                fh.flush()
                os.fsync(fh.fileno())
            self.journal_count = 0
            return 0
        try:
            entries = self._journal.read_bytes().split(b"\n")
        except FileNotFoundError:
            entries = []
        complete = entries[:-1]  # a torn last line (no newline) was never followed by a send
        replay = complete[self.journal_count:]
        for entry in replay:
            if entry == b"train":
                self.train.record_releases(self._step_releases())
            elif entry == b"val":
                self.val.record_releases(self._validation_releases())
            else:
                raise PrivacyError(f"{self._journal}: unreadable privacy journal entry; the accountant cannot be "
                                   "restored safely (keep the file for review)")
        self.journal_count = len(complete)
        return len(replay)

    def _journal_write(self, entry: bytes) -> None:
        if self._journal is None:
            return
        with open(self._journal, "ab") as fh:
            fh.write(entry)
            fh.flush()
            os.fsync(fh.fileno())
        self.journal_count += 1

    def charge_evaluation(self) -> bool:
        """Account one validation pass; False (nothing charged) if it would overspend."""
        if self.activation is None:
            return True  # label DP only: validation sends z in the clear; documented in SECURITY.md
        try:
            self.val.charge(self.validation_budget, self._validation_releases())
        except BudgetExceeded:
            return False
        self._journal_write(b"val\n")
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
            "journal_count": self.journal_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state["train"])
        self.val.load_state_dict(state["val"])
        for g, s in zip(self._generators, state["generators"], strict=True):
            g.set_state(s)
        self.journal_count = int(state.get("journal_count", 0))
