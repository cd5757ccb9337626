"""Task heads: the top of each site's model. They never leave the site.

* classification: multi-scale mean- and max-pooled features -> class logits; with ``ordinal`` the head
  emits K-1 cumulative logits P(y > k) (for graded labels such as DR grade 0..4).
* segmentation: the finest adapted map (at z's resolution) is refined and decoded to the
  input resolution; one channel per foreground class (binary / multilabel) or per class
  including background (multiclass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TaskConfig
from ..errors import ModelError
from ..registry import Registry
from .embeddings import _groups

HEADS: Registry = Registry("head")


class ClassificationHead(nn.Module):
    """pyramid [(B, D, H_i, W_i)] -> (B, num_classes) or (B, num_classes - 1) if ordinal."""

    def __init__(self, dim: int, num_levels: int, num_classes: int, ordinal: bool) -> None:
        super().__init__()
        width = 2 * dim * num_levels
        out = num_classes - 1 if ordinal else num_classes
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, out))

    def forward(self, pyramid: list[Tensor], out_size: tuple[int, int]) -> Tensor:
        # Mean pooling summarises the image; max pooling keeps small findings (a microaneurysm,
        # a fluid cyst) that an average over the whole field would wash out.
        pooled = torch.cat([torch.cat([p.mean(dim=(2, 3)), p.amax(dim=(2, 3))], 1) for p in pyramid], 1)  # (B, 2DL)
        return self.mlp(pooled)


class SegmentationHead(nn.Module):
    """pyramid[0] (B, D, h, w) -> (B, out_channels, H, W) at the input resolution."""

    def __init__(self, dim: int, out_channels: int) -> None:
        super().__init__()
        mid = max(16, dim // 2)
        self.refine = nn.Sequential(
            nn.Conv2d(dim, mid, 3, padding=1), nn.GroupNorm(_groups(mid), mid), nn.GELU()
        )
        self.out = nn.Conv2d(mid, out_channels, 1)

    def forward(self, pyramid: list[Tensor], out_size: tuple[int, int]) -> Tensor:
        x = pyramid[0]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return self.out(self.refine(x))


@HEADS.register("classification")
def _classification(task: TaskConfig, dim: int, num_levels: int) -> nn.Module:
    if task.type != "classification":
        raise ModelError(f"head 'classification' does not fit a {task.type} task; use head = 'segmentation'")
    return ClassificationHead(dim, num_levels, task.num_classes, task.ordinal)


@HEADS.register("segmentation")
def _segmentation(task: TaskConfig, dim: int, num_levels: int) -> nn.Module:
    if task.type != "segmentation":
        raise ModelError(f"head 'segmentation' does not fit a {task.type} task; use head = 'classification'")
    return SegmentationHead(dim, task.num_classes)
