"""Server backbones: the large general model shared by every site and task.

The default is MONAI's 2-D ``SwinTransformer`` without its patch embedding (that part
sits at the site, below the cut). It takes z (B, C, H', W') and returns one feature map
per stage, each layer-normalised over channels. There is no BatchNorm anywhere: a batch
statistic would couple the sites whose activations pass through the server.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import Tensor, nn

from ..config import BackboneConfig
from ..errors import ConfigError
from ..registry import Registry

BACKBONES: Registry = Registry("backbone")


@dataclass(frozen=True)
class SwinSpec:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_ratio: float = 4.0


# Swin-T/S/B are the published sizes (Liu et al. 2021); "swin-tiny" is this project's CPU size.
SWIN_PRESETS = {
    "swin-tiny": SwinSpec(32, (2, 2, 2, 2), (2, 4, 8, 16), 8),
    "swin-t": SwinSpec(96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin-s": SwinSpec(96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin-b": SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32), 7),
}


class Backbone(nn.Module):
    """What every server backbone states about its interface at the cut."""

    in_channels: int  # channels of z
    feature_channels: tuple[int, ...]  # channels of each returned feature map
    feature_strides: tuple[int, ...]  # each map's stride relative to z


class SwinBackbone(Backbone):
    """MONAI SwinTransformer stages 1..L on site activations.

    z (B, C, H', W') -> [ (B, 2C, H'/2, W'/2), (B, 4C, H'/4, W'/4), ... ]  (L maps)
    """

    def __init__(self, spec: SwinSpec, drop_path_rate: float = 0.0, use_checkpoint: bool = False) -> None:
        super().__init__()
        if not 1 <= len(spec.depths) <= 4:
            raise ConfigError(f"backbone.depths: MONAI's Swin has 1 to 4 stages, got {len(spec.depths)}")
        for i, heads in enumerate(spec.num_heads):
            if (spec.embed_dim * 2**i) % heads:
                raise ConfigError(
                    f"backbone.num_heads: stage {i} width {spec.embed_dim * 2**i} is not divisible by {heads} heads"
                )
        swin = SwinTransformer(
            in_chans=spec.embed_dim,
            embed_dim=spec.embed_dim,
            window_size=(spec.window_size,) * 2,
            patch_size=(1, 1),
            depths=spec.depths,
            num_heads=spec.num_heads,
            mlp_ratio=spec.mlp_ratio,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=2,
        )
        # The patch embedding is the site's job; keep only the stages.
        self.stages = nn.ModuleList(
            getattr(swin, f"layers{i + 1}")[0] for i in range(len(spec.depths))
        )
        self.spec = spec
        self.in_channels = spec.embed_dim
        self.feature_channels = tuple(spec.embed_dim * 2 ** (i + 1) for i in range(len(spec.depths)))
        self.feature_strides = tuple(2 ** (i + 1) for i in range(len(spec.depths)))  # relative to z

    def forward(self, z: Tensor) -> list[Tensor]:
        feats = []
        x = z
        for stage in self.stages:
            x = stage(x.contiguous())
            # (B, C_i, H_i, W_i), normalised over channels as MONAI's proj_out does
            normed = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)
            # Standard (row-major) strides, as a network delivers them: the site's kernels (and
            # Opacus's per-sample convolutions) then behave the same in process and over gRPC.
            feats.append(normed.clone(memory_format=torch.contiguous_format))
        return feats


def _swin_factory(preset: str):
    def build(cfg: BackboneConfig) -> SwinBackbone:
        base = SWIN_PRESETS[preset]
        spec = SwinSpec(
            embed_dim=cfg.embed_dim if cfg.embed_dim is not None else base.embed_dim,
            depths=cfg.depths if cfg.depths is not None else base.depths,
            num_heads=cfg.num_heads if cfg.num_heads is not None else base.num_heads,
            window_size=cfg.window_size if cfg.window_size is not None else base.window_size,
            mlp_ratio=cfg.mlp_ratio if cfg.mlp_ratio is not None else base.mlp_ratio,
        )
        if len(spec.depths) != len(spec.num_heads):
            raise ConfigError("backbone: depths and num_heads must have the same length")
        return SwinBackbone(spec, cfg.drop_path_rate, cfg.use_checkpoint)

    return build


for _name in SWIN_PRESETS:
    BACKBONES.register(_name)(_swin_factory(_name))


def build_backbone(cfg: BackboneConfig | str) -> Backbone:
    """Build a backbone from its configuration (or a preset name)."""
    if isinstance(cfg, str):
        cfg = BackboneConfig(name=cfg)
    return BACKBONES.get(cfg.name)(cfg)


def refuse_batchnorm(module: nn.Module) -> None:
    """Raise ConfigError if ``module`` contains a BatchNorm layer (server-side invariant)."""
    bad = [n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bad:
        raise ConfigError(
            f"backbone contains BatchNorm ({', '.join(bad[:3])}): batch statistics would couple "
            "the sites whose activations share a server batch; use LayerNorm or GroupNorm"
        )
