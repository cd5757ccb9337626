"""Site embeddings: the layers below the cut, which turn an image into activations z.

``z`` is what leaves the site (after optional activation DP), so the embedding is
kept small: a convolutional stem or a Swin-style linear patch embedding. ``conv-stem-swin``
moves the cut one backbone stage deeper: the conv stem plus one MONAI Swin stage run at the
site (configure the server backbone with one stage fewer, starting at twice the width). None
uses BatchNorm (it mixes samples, which DP-SGD and per-sample clipping forbid).
"""

from __future__ import annotations

import math

from monai.networks.blocks import PatchEmbed
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import Tensor, nn

from ..errors import ModelError
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


class ConvStemSwin(nn.Module):
    """A conv stem, then one MONAI Swin stage (window-attention blocks and patch merging).

    (B, in_channels, H, W) -> stem (stride / 2, embed_dim / 2 channels) -> Swin stage
    -> (B, embed_dim, H/stride, W/stride). The stage is what the first stage of the server's
    Swin backbone would be for a z of embed_dim / 2 channels (heads of 16 channels, window
    ``window_size``), so with a server backbone that starts one stage later the network is the
    same, cut one stage deeper: those weights stay at the site. Not for DP-SGD sites: Opacus has
    no per-sample gradients for MONAI's window attention (its relative-position table), so a
    site with ``privacy.enabled`` and this embedding is refused with that reason.
    """

    def __init__(self, in_channels: int, embed_dim: int, stride: int, depth: int = 2, window_size: int = 8) -> None:
        super().__init__()
        if stride < 2 or embed_dim % 2:
            raise ModelError(
                f"embedding 'conv-stem-swin' needs model.stride >= 2 and an even backbone input width, got stride "
                f"{stride} and width {embed_dim} (its Swin stage halves the resolution and doubles the channels)"
            )
        width = embed_dim // 2
        self.stem = ConvStem(in_channels, width, stride // 2)
        swin = SwinTransformer(
            in_chans=width,
            embed_dim=width,
            window_size=(window_size, window_size),
            patch_size=(1, 1),
            depths=(depth,),
            num_heads=(max(1, width // 16),),
            spatial_dims=2,
        )
        self.stage = swin.layers1[0]
        self.stride = stride
        self.embed_dim = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.stage(self.stem(x).contiguous())  # (B, D, H/s, W/s)


@EMBEDDINGS.register("conv-stem")
def _conv_stem(in_channels: int, embed_dim: int, stride: int) -> nn.Module:
    return ConvStem(in_channels, embed_dim, stride)


@EMBEDDINGS.register("conv-stem-swin")
def _conv_stem_swin(in_channels: int, embed_dim: int, stride: int) -> nn.Module:
    return ConvStemSwin(in_channels, embed_dim, stride)


@EMBEDDINGS.register("patch")
def _patch(in_channels: int, embed_dim: int, stride: int) -> nn.Module:
    return LinearPatchEmbed(in_channels, embed_dim, stride)
