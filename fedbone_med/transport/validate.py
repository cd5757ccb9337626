"""Checks every tensor that crosses the cut before it is used (both sides).

A failed check raises ProtocolError naming the check and the peer, never a tensor value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ProtocolError
from ..models.split import CutSpec

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _finite(t: Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ProtocolError(f"{what}: contains NaN or Inf values; the message was rejected")


def check_activation(z: object, cut: CutSpec, who: str) -> Tensor:
    """z must be a finite float (B, C, H, W) tensor with the backbone's channel count, B <= ``cut.max_batch``
    (``server.max_batch``) and H, W <= ``cut.max_side`` (``server.max_z_side``). Checked before the backbone runs."""
    what = f"activation from site '{who}'"
    if not isinstance(z, Tensor):
        raise ProtocolError(f"{what}: expected a tensor, got {type(z).__name__}")
    if z.dtype not in FLOAT_DTYPES:
        raise ProtocolError(f"{what}: dtype {z.dtype} is not a floating-point type")
    if z.dim() != 4:
        raise ProtocolError(f"{what}: expected 4 dimensions (batch, channels, height, width), got {z.dim()}")
    b, c, h, w = z.shape
    if not 1 <= b <= cut.max_batch:
        raise ProtocolError(f"{what}: batch size {b} is outside 1..{cut.max_batch} (the server's max_batch limit; "
                            "the server operator can raise server.max_batch, or the site can use smaller batches)")
    if c != cut.z_channels:
        raise ProtocolError(
            f"{what}: shape mismatch at the cut: {c} channels, the backbone expects {cut.z_channels} "
            "(the site's embedding does not fit this server's backbone)"
        )
    if not (1 <= h <= cut.max_side and 1 <= w <= cut.max_side):
        raise ProtocolError(f"{what}: spatial size {h}x{w} is outside 1..{cut.max_side} (the server's max_z_side "
                            "limit; the server operator can raise server.max_z_side, or the site can use a smaller "
                            "data.image_size or a larger model.stride)")
    _finite(z, what)
    return z


def check_feature_grads(grads: object, feats: list[Tensor], who: str) -> list[Tensor]:
    """dF must be one finite tensor per feature map, each with that map's exact shape."""
    what = f"feature gradients from site '{who}'"
    if not isinstance(grads, (list, tuple)) or not all(isinstance(g, Tensor) for g in grads):
        raise ProtocolError(f"{what}: expected a list of tensors")
    if len(grads) != len(feats):
        raise ProtocolError(f"{what}: got {len(grads)} tensors for {len(feats)} feature maps")
    out = []
    for i, (g, f) in enumerate(zip(grads, feats, strict=True)):
        if g.dtype not in FLOAT_DTYPES:
            raise ProtocolError(f"{what}: map {i} has dtype {g.dtype}, not a floating-point type")
        if g.shape != f.shape:
            raise ProtocolError(f"{what}: map {i} has shape {tuple(g.shape)}, the features had {tuple(f.shape)}")
        _finite(g, f"{what} (map {i})")
        out.append(g.to(f.dtype))
    return out


def check_features(feats: object, cut: CutSpec, batch: int) -> list[Tensor]:
    """The server's F must match the cut it announced at join."""
    what = "features from the server"
    if not isinstance(feats, (list, tuple)) or not all(isinstance(f, Tensor) for f in feats):
        raise ProtocolError(f"{what}: expected a list of tensors")
    if len(feats) != len(cut.feature_channels):
        raise ProtocolError(f"{what}: got {len(feats)} maps, the cut announced {len(cut.feature_channels)}")
    for i, (f, c) in enumerate(zip(feats, cut.feature_channels, strict=True)):
        if f.dim() != 4 or f.shape[0] != batch or f.shape[1] != c:
            raise ProtocolError(f"{what}: map {i} has shape {tuple(f.shape)}, expected ({batch}, {c}, h, w)")
        _finite(f, f"{what} (map {i})")
    return list(feats)


def check_input_grad(dz: object, z: Tensor) -> Tensor:
    """dz from the server must have z's shape and be finite."""
    what = "activation gradient from the server"
    if not isinstance(dz, Tensor) or dz.shape != z.shape:
        shape = tuple(dz.shape) if isinstance(dz, Tensor) else type(dz).__name__
        raise ProtocolError(f"{what}: shape {shape} does not match the activation's {tuple(z.shape)}")
    _finite(dz, what)
    return dz.to(z.dtype)
