"""Site embeddings: the layers below the cut, which turn an image into activations z.

``z`` is what leaves the site (after optional activation DP), so the embedding is
kept small: a convolutional stem or a Swin-style linear patch embedding. Neither uses
BatchNorm (it mixes samples, which DP-SGD and per-sample clipping forbid).
"""

from __future__ import annotations

import math

from monai.networks.blocks import PatchEmbed
from torch import Tensor, nn

from ..registry import Registry

EMBEDDINGS: Registry = Registry("embedding")


def _groups(channels: int) -> int:
    """Largest of 8, 4, 2, 1 that divides ``channels`` (GroupNorm groups)."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvStem(nn.Module):
    """Strided 3x3 convolutions with GroupNorm and GELU; total stride ``stride``.

    (B, in_channels, H, W) -> (B, embed_dim, H/stride, W/stride)
    """

    def __init__(self, in_channels: int, embed_dim: int, stride: int = 2) -> None:
        super().__init__()
        n_down = int(math.log2(stride))
        hidden = max(16, embed_dim // 2)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.GroupNorm(_groups(hidden), hidden),
            nn.GELU(),
        ]
        for _ in range(n_down):
            layers += [
                nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
                nn.GroupNorm(_groups(hidden), hidden),
                nn.GELU(),
            ]
        layers.append(nn.Conv2d(hidden, embed_dim, 1))
        self.net = nn.Sequential(*layers)
        self.stride = stride
        self.embed_dim = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, D, H/s, W/s)


class LinearPatchEmbed(nn.Module):
    """MONAI's Swin patch embedding (non-overlapping ``stride`` x ``stride`` patches, linear)."""

    def __init__(self, in_channels: int, embed_dim: int, stride: int = 4) -> None:
        super().__init__()
        self.embed = PatchEmbed(
            patch_size=stride, in_chans=in_channels, embed_dim=embed_dim, norm_layer=nn.LayerNorm, spatial_dims=2
        )
        self.stride = stride
        self.embed_dim = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)  # (B, D, H/s, W/s)


@EMBEDDINGS.register("conv-stem")
def _conv_stem(in_channels: int, embed_dim: int, stride: int) -> nn.Module:
    return ConvStem(in_channels, embed_dim, stride)


@EMBEDDINGS.register("patch")
def _patch(in_channels: int, embed_dim: int, stride: int) -> nn.Module:
    return LinearPatchEmbed(in_channels, embed_dim, stride)
