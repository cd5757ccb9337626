"""Task adaptation: per-task attention over the backbone's multi-scale features.

FedBone's task adaptation module re-weights the general model's features for one
task before the head (the paper uses deformable convolution plus self-attention).
Here, built from MONAI and torch parts:

1. per scale: 1x1 projection to a common width, a depthwise 3x3 convolution (local
   spatial re-sampling, the role deformable convolution plays in the paper) and
   MONAI's squeeze-and-excitation block (task-specific channel attention);
2. self-attention (MONAI ``SABlock``) over the tokens of the two coarsest scales
   together, with a learned scale embedding, so that the task can relate distant
   regions (lesion to disc, fluid to fovea);
3. top-down fusion (FPN) down to the resolution of the site's own embedding z, which
   never left the site and serves as the finest skip connection.

The output pyramid is finest first: [at z's resolution, at each backbone scale...].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import ChannelSELayer, SABlock
from torch import Tensor, nn

from ..registry import Registry
from .embeddings import _groups

ADAPTATIONS: Registry = Registry("adaptation module")


class ScaleAdapter(nn.Module):
    """(B, C_in, H, W) -> (B, D, H, W): project, local depthwise conv, channel attention."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.GroupNorm(_groups(dim), dim))
        self.local = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.GELU())
        self.se = ChannelSELayer(spatial_dims=2, in_channels=dim, r=4, acti_type_1=("relu", {"inplace": False}))

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        x = x + self.local(x)
        return self.se(x)


class TaskAttentionAdapter(nn.Module):
    """Adapts backbone features ``feats`` (coarsening list) plus the local z to one task."""

    def __init__(self, feature_channels: tuple[int, ...], z_channels: int, dim: int, heads: int) -> None:
        super().__init__()
        self.scales = nn.ModuleList(ScaleAdapter(c, dim) for c in feature_channels)
        self.z_adapter = ScaleAdapter(z_channels, dim)
        n_attn = min(2, len(feature_channels))
        self.attn_scales = list(range(len(feature_channels) - n_attn, len(feature_channels)))
        self.scale_embed = nn.Parameter(torch.zeros(n_attn, dim))
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = SABlock(hidden_size=dim, num_heads=heads, qkv_bias=True)
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(_groups(dim), dim), nn.GELU())
            for _ in range(len(feature_channels) + 1)
        )
        self.dim = dim
        self.num_levels = len(feature_channels) + 1

    def forward(self, feats: list[Tensor], z: Tensor) -> list[Tensor]:
        adapted = [m(f) for m, f in zip(self.scales, feats, strict=True)]  # each (B, D, H_i, W_i)

        # Self-attention across the coarsest scales' tokens.
        tokens, shapes = [], []
        for j, i in enumerate(self.attn_scales):
            b, d, h, w = adapted[i].shape
            tokens.append(adapted[i].flatten(2).transpose(1, 2) + self.scale_embed[j])  # (B, h*w, D)
            shapes.append((h, w))
        seq = torch.cat(tokens, dim=1)
        seq = seq + self.attn(self.attn_norm(seq))
        start = 0
        for i, (h, w) in zip(self.attn_scales, shapes, strict=True):
            part = seq[:, start : start + h * w]
            adapted[i] = part.transpose(1, 2).reshape(part.shape[0], self.dim, h, w)
            start += h * w

        # Top-down fusion, coarsest to finest, ending at z's resolution.
        levels = [self.z_adapter(z)] + adapted
        out: list[Tensor] = [levels[-1]]
        for lvl in reversed(levels[:-1]):
            up = F.interpolate(out[0], size=lvl.shape[-2:], mode="bilinear", align_corners=False)
            out.insert(0, lvl + up)
        return [m(x) for m, x in zip(self.smooth, out, strict=True)]  # finest first


@ADAPTATIONS.register("task-attention")
def _task_attention(feature_channels: tuple[int, ...], z_channels: int, dim: int, heads: int) -> nn.Module:
    return TaskAttentionAdapter(feature_channels, z_channels, dim, heads)
