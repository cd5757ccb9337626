"""Site-side Gaussian mechanisms on what leaves a site: activations z and feature gradients dF.

Each mechanism clips every sample's contribution to L2 norm <= C (``clipping.py``) and adds
N(0, (sigma*C)^2) noise to every coordinate. With Poisson sampling at rate q = batch/N, one
application is one release of a sampled Gaussian mechanism (noise multiplier sigma, rate q),
which the site's ``SiteAccountant`` composes (``Release`` is what to record).

What this protects: the (epsilon, delta) guarantee bounds what anyone who sees the released
tensors (the server, or anyone who breaks the transport) can learn about whether any single
record was in the site's data. Per-sample clipping bounds one record's influence on one release;
the accountant bounds it over all releases.

What it does not protect:
- the server still sees the noised z (and dF) in the clear; encryption in transit is the
  envelope's job, not this one's, and a small sigma leaves z close to the embedding of x;
- activation DP covers z only: without ``LabelDP``, dF = d loss / dF depends on the labels and
  leaks them (a single-sample dF often reveals the class outright);
- the site's own weights (embedding shared by FedAvg) need DP-SGD (``dpsgd.py``), not this;
- amplification by subsampling assumes Poisson sampling with batch membership secret from the
  server; with fixed-size shuffled batches the accounting is the usual (Opacus) approximation;
- non-secure mode draws from an ordinary PRNG and is open to floating-point attacks
  (arXiv 2107.10138); use ``secure_mode=True`` for real deployments.
"""

from __future__ import annotations

import math
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, NamedTuple, TypeVar

import torch
from opacus.optimizers.optimizer import _generate_noise
from torch import Tensor

from .clipping import clip_joint_per_sample, clip_per_sample
from .errors import PrivacyError

T = TypeVar("T")


class Release(NamedTuple):
    """One application of a mechanism, as the accountant composes it."""

    noise_multiplier: float
    sample_rate: float
    mechanism: str = "unnamed"


def check_positive(name: str, value: float) -> float:
    """``value`` as a float if finite and > 0, else PrivacyError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise PrivacyError(f"{name} must be a number, got {type(value).__name__}") from exc
    if not math.isfinite(v) or v <= 0:
        raise PrivacyError(f"{name} must be finite and > 0, got {v}")
    return v


class Mechanism(ABC, Generic[T]):
    """Clip + Gaussian noise on what a site releases. Validates its parameters at construction."""

    name: str = "mechanism"

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        self._clip_norm = check_positive("clip_norm", clip_norm)
        # sigma = 0 is refused: "no DP" is expressed by not constructing a mechanism.
        self._noise_multiplier = check_positive("noise_multiplier", noise_multiplier)
        if secure_mode and generator is not None:
            raise PrivacyError(
                f"{self.name}: a generator was passed in secure mode; secure noise is never seeded "
                "(pass generator=None, or secure_mode=False for reproducible tests)"
            )
        if generator is None and not secure_mode:
            # Never the shared global RNG: a private generator with a fresh random seed.
            generator = torch.Generator()
            generator.manual_seed(secrets.randbits(64))
        self._generator = generator
        self.secure_mode = bool(secure_mode)

    @property
    def clip_norm(self) -> float:
        return self._clip_norm

    @property
    def noise_multiplier(self) -> float:
        return self._noise_multiplier

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate: sigma * C."""
        return self._noise_multiplier * self._clip_norm

    def release(self, sample_rate: float) -> Release:
        """The accountant entry for one application at sampling rate q = batch / N."""
        return Release(self._noise_multiplier, sample_rate, self.name)

    def noise_like(self, reference: Tensor) -> Tensor:
        """N(0, (sigma*C)^2) noise of reference's shape, dtype and device."""
        if self.secure_mode:
            # Fresh 64-bit seed from the OS CSPRNG per call, and Opacus's sum of draws against
            # floating-point attacks (arXiv 2107.10138, section 5.1).
            gen = torch.Generator(device=reference.device)
            gen.manual_seed(secrets.randbits(64))
            noise = _generate_noise(self.noise_std, reference, generator=gen, secure_mode=True)
        else:
            noise = _generate_noise(self.noise_std, reference, generator=self._generator, secure_mode=False)
        return noise.to(reference.dtype)

    @abstractmethod
    def clip(self, x: T) -> T:
        """Per-sample clipping only (no noise)."""

    @abstractmethod
    def apply(self, x: T) -> T:
        """Clip each sample to norm <= C and add noise. Raises PrivacyError on non-finite input."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(clip_norm={self._clip_norm}, noise_multiplier={self._noise_multiplier}, "
            f"secure_mode={self.secure_mode})"
        )


class GaussianActivationDP(Mechanism[Tensor]):
    """Activation DP on z (B, ...): per-sample clip to C over all non-batch dims, then noise sigma*C.

    Protects the images (and anything else z is derived from) of the records in the batch against
    the server, to the accounted (epsilon, delta). Does not protect labels (see ``LabelDP``).
    """

    name = "activation"

    def clip(self, x: Tensor) -> Tensor:
        return clip_per_sample(x, self._clip_norm)

    def apply(self, x: Tensor) -> Tensor:
        clipped = self.clip(x)
        return clipped + self.noise_like(clipped)


class LabelDP(Mechanism[Sequence[Tensor]]):
    """Label DP on the feature gradients dF returned to the server: a list of maps, each (B, ...).

    Clips the JOINT per-sample norm over all maps to C (one record's whole contribution to the
    message is bounded, not each scale separately), then adds noise sigma*C to every map. Protects
    labels (and masks) against the server, to the accounted (epsilon, delta). It also bounds what
    dF reveals about the images, but not what z reveals (see ``GaussianActivationDP``).
    """

    name = "label"

    def clip(self, x: Sequence[Tensor]) -> list[Tensor]:
        return clip_joint_per_sample(list(x), self._clip_norm)

    def apply(self, x: Sequence[Tensor]) -> list[Tensor]:
        return [m + self.noise_like(m) for m in self.clip(x)]
