"""Losses and decoded predictions for each task type.

Targets: classification (B,) int64; binary segmentation (B, 1, H, W) float {0, 1};
multilabel (B, C, H, W) float {0, 1}; multiclass segmentation (B, H, W) int64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch import Tensor, nn

from ..config import TaskConfig


def ordinal_targets(y: Tensor, num_classes: int) -> Tensor:
    """Grade y in 0..K-1 -> K-1 cumulative binary targets [y > 0, y > 1, ...]. (B,) -> (B, K-1)"""
    thresholds = torch.arange(num_classes - 1, device=y.device)
    return (y.unsqueeze(1) > thresholds).to(torch.float32)


def ordinal_probs(logits: Tensor) -> Tensor:
    """Cumulative logits (B, K-1) -> class probabilities (B, K) that sum to one."""
    p_gt = torch.sigmoid(logits)
    # enforce monotone P(y > k) so that every class probability is >= 0
    p_gt = torch.cummin(p_gt, dim=1).values
    ones = torch.ones_like(p_gt[:, :1])
    zeros = torch.zeros_like(p_gt[:, :1])
    upper = torch.cat([ones, p_gt], dim=1)
    lower = torch.cat([p_gt, zeros], dim=1)
    return upper - lower


class TaskLoss(nn.Module):
    """The loss for ``task``: cross-entropy / cumulative BCE, or Dice + (B)CE for segmentation."""

    def __init__(self, task: TaskConfig) -> None:
        super().__init__()
        self.task = task
        if task.type == "segmentation" and task.mode == "multiclass":
            self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
        elif task.type == "segmentation":
            self.dice = DiceLoss(sigmoid=True)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        t = self.task
        if t.type == "classification":
            if t.ordinal:
                return F.binary_cross_entropy_with_logits(logits, ordinal_targets(target, t.num_classes))
            return F.cross_entropy(logits, target)
        if t.mode == "multiclass":
            return self.dice_ce(logits, target.unsqueeze(1))
        return self.dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


def class_probabilities(task: TaskConfig, logits: Tensor) -> Tensor:
    """Per-class probabilities: (B, K) for classification, (B, C, H, W) for segmentation."""
    if task.type == "classification":
        return ordinal_probs(logits) if task.ordinal else torch.softmax(logits, dim=1)
    if task.mode == "multiclass":
        return torch.softmax(logits, dim=1)
    return torch.sigmoid(logits)


def decode(task: TaskConfig, logits: Tensor) -> Tensor:
    """Hard predictions in the target's format (see the module docstring)."""
    if task.type == "classification":
        if task.ordinal:
            return (torch.sigmoid(logits) > 0.5).sum(dim=1)
        return logits.argmax(dim=1)
    if task.mode == "multiclass":
        return logits.argmax(dim=1)
    return (logits > 0).to(torch.float32)
