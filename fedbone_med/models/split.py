"""The FedBone split: what sits at the site, what sits on the server, and the cut between.

    site:    x --Embedding--> z ............................ TaskAdaptation(F, z) --Head--> logits
    server:                   z --Backbone--> F = [F_1..F_L] ^

Only z (site -> server) and F (server -> site), and on the way back dF and dz, cross the
cut. :class:`CutSpec` is the contract the server states when a site joins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from ..config import DEFAULT_MAX_BATCH, DEFAULT_MAX_Z_SIDE, SiteConfig
from ..errors import ModelError
from .adaptation import ADAPTATIONS
from .backbones import Backbone
from .embeddings import EMBEDDINGS
from .heads import HEADS

IN_CHANNELS = {"fundus": 3, "oct": 1}


Z_ITEMSIZE = 4  # bytes of one z (or dF) value on the wire at most: float32 (float16 / bfloat16 take 2)


@dataclass(frozen=True)
class CutSpec:
    """The server backbone's interface at the cut, and the largest activation it accepts.

    ``max_batch`` (``server.max_batch``) bounds the batch of z and ``max_side`` (``server.max_z_side``)
    its height and width: a valid z is at most (max_batch, z_channels, max_side, max_side). The
    feature maps (and so dF) follow from z: map i is (B, feature_channels[i], ceil(H / s_i),
    ceil(W / s_i)) with s_i = feature_strides[i]. :meth:`max_z_bytes` and
    :meth:`max_feature_bytes` are what one forward or backward frame can carry at most.
    """

    z_channels: int
    feature_channels: tuple[int, ...]
    feature_strides: tuple[int, ...]
    max_batch: int = DEFAULT_MAX_BATCH
    max_side: int = DEFAULT_MAX_Z_SIDE

    @classmethod
    def of(cls, backbone: Backbone, max_batch: int = DEFAULT_MAX_BATCH, max_side: int = DEFAULT_MAX_Z_SIDE) -> CutSpec:
        return cls(backbone.in_channels, tuple(backbone.feature_channels), tuple(backbone.feature_strides), max_batch,
                   max_side)

    def max_z_bytes(self, itemsize: int = Z_ITEMSIZE) -> int:
        """Bytes of the largest valid z: max_batch x z_channels x max_side x max_side values."""
        return self.max_batch * self.z_channels * self.max_side * self.max_side * itemsize

    def max_feature_bytes(self, itemsize: int = Z_ITEMSIZE) -> int:
        """Bytes of the feature maps (or their gradients dF) of the largest valid z."""
        return sum(self.max_batch * c * (-(-self.max_side // s)) ** 2 * itemsize
                   for c, s in zip(self.feature_channels, self.feature_strides, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CutSpec:
        return cls(
            int(d["z_channels"]),
            tuple(int(c) for c in d["feature_channels"]),
            tuple(int(s) for s in d["feature_strides"]),
            int(d.get("max_batch", DEFAULT_MAX_BATCH)),
            int(d.get("max_side", DEFAULT_MAX_Z_SIDE)),
        )


class SiteModel(nn.Module):
    """The layers a site owns: embedding (below the cut), adaptation and head (above)."""

    def __init__(self, embedding: nn.Module, adaptation: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.adaptation = adaptation
        self.head = head

    def embed(self, x: Tensor) -> Tensor:
        return self.embedding(x)  # (B, D, H/s, W/s)

    def top(self, feats: list[Tensor], z: Tensor, out_size: tuple[int, int]) -> Tensor:
        return self.head(self.adaptation(feats, z), out_size)


def build_site_model(cfg: SiteConfig, cut: CutSpec) -> SiteModel:
    """Build a site's layers to fit the server's cut; a mismatch is a ModelError."""
    m = cfg.model
    if m.embed_dim is not None and m.embed_dim != cut.z_channels:
        raise ModelError(
            f"site '{cfg.name}': model.embed_dim = {m.embed_dim} but the server backbone takes "
            f"{cut.z_channels} channels at the cut; remove model.embed_dim or set it to {cut.z_channels}"
        )
    embedding = EMBEDDINGS.get(m.embedding)(IN_CHANNELS[cfg.modality], cut.z_channels, m.stride)
    adaptation = ADAPTATIONS.get(m.adaptation)(cut.feature_channels, cut.z_channels, m.adapt_dim, m.adapt_heads)
    head = HEADS.get(m.head)(cfg.task, m.adapt_dim, len(cut.feature_channels) + 1)
    return SiteModel(embedding, adaptation, head)


class FedBoneModel(nn.Module):
    """The whole model of one site in one piece (reference for the split, and for baselines)."""

    def __init__(self, site: SiteModel, backbone: nn.Module) -> None:
        super().__init__()
        self.site = site
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        z = self.site.embed(x)
        return self.site.top(self.backbone(z), z, (x.shape[-2], x.shape[-1]))
