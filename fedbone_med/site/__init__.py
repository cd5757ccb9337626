"""Site runtime: the training loop, evaluation and checkpoints of one hospital site."""

from .runtime import SiteRuntime, derive_seed

__all__ = ["SiteRuntime", "derive_seed"]
