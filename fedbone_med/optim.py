"""Optimizers from configuration (shared by the server and the sites)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def build_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW (default) or SGD with momentum."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
