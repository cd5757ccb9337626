"""Validation metrics per task type, and what a model with no information would score.

Classification: accuracy, macro one-vs-rest AUC (rank statistic), quadratic-weighted
kappa. Segmentation: Dice and IoU per foreground class over the pooled validation set
(true/false positives summed over all images, then averaged over classes), so classes
absent from some images (small lesions) do not produce undefined per-image scores.

Each task has a *primary* metric; ``chance`` is the primary metric of the best
constant predictor on the same validation labels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import TaskConfig


def primary_metric(task: TaskConfig) -> str:
    if task.type == "segmentation":
        return "dice"
    if task.ordinal:
        return "kappa"
    return "auc" if task.num_classes == 2 else "accuracy"


def binary_auc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties halved."""
    pos, neg = scores[positive], scores[~positive]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    allv = torch.cat([pos, neg]).double()
    order = torch.argsort(allv, stable=True)
    ranks = torch.empty_like(allv)
    ranks[order] = torch.arange(1, allv.numel() + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inverse, counts = torch.unique(allv, return_inverse=True, return_counts=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = pos.numel(), neg.numel()
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def quadratic_kappa(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights (agreement on ordered grades)."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    conf.index_put_((target.long(), pred.long()), torch.ones(target.numel(), dtype=torch.float64), accumulate=True)
    n = conf.sum()
    idx = torch.arange(num_classes, dtype=torch.float64)
    weights = (idx[:, None] - idx[None, :]) ** 2 / max(1, (num_classes - 1) ** 2)
    expected = conf.sum(1, keepdim=True) * conf.sum(0, keepdim=True) / n
    denom = (weights * expected).sum()
    if denom == 0:
        return 0.0
    return float(1.0 - (weights * conf).sum() / denom)


def classification_metrics(task: TaskConfig, probs: Tensor, pred: Tensor, target: Tensor) -> dict[str, float]:
    """probs (N, K), pred (N,), target (N,)."""
    k = task.num_classes
    aucs = [binary_auc(probs[:, c], target == c) for c in range(k)] if k > 2 else [binary_auc(probs[:, 1], target == 1)]
    aucs = [a for a in aucs if a == a]
    counts = torch.bincount(target, minlength=k).double()
    majority = int(counts.argmax())
    out = {
        "accuracy": float((pred == target).double().mean()),
        "auc": float(sum(aucs) / len(aucs)) if aucs else float("nan"),
        "kappa": quadratic_kappa(pred, target, k),
    }
    chance = {"accuracy": float(counts[majority] / counts.sum()), "auc": 0.5, "kappa": 0.0}
    out["chance"] = chance[primary_metric(task)]
    return out


def segmentation_counts(task: TaskConfig, pred: Tensor, target: Tensor) -> Tensor:
    """Per foreground class [tp, fp, fn, positives]; shape (C, 4), summed over a batch."""
    if task.mode == "multiclass":
        classes = range(1, task.num_classes)
        p = torch.stack([pred == c for c in classes], 1)
        t = torch.stack([target == c for c in classes], 1)
    else:
        p, t = pred.bool(), target.bool()
    dims = (0, 2, 3)
    tp = (p & t).sum(dims)
    fp = (p & ~t).sum(dims)
    fn = (~p & t).sum(dims)
    return torch.stack([tp, fp, fn, t.sum(dims)], 1).double()


def segmentation_metrics(counts: Tensor, total_pixels: int) -> dict[str, float]:
    """Dice/IoU averaged over foreground classes present in the validation labels."""
    tp, fp, fn, pos = counts.unbind(1)
    present = pos > 0
    dice = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    iou = tp / (tp + fp + fn).clamp(min=1)
    prev = pos / max(1, total_pixels)
    chance = 2 * prev / (1 + prev)  # Dice of predicting the class everywhere
    m = present if bool(present.any()) else torch.ones_like(present)
    return {
        "dice": float(dice[m].mean()),
        "iou": float(iou[m].mean()),
        "chance": float(chance[m].mean()),
    }
