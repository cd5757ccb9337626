"""Attacks an honest-but-curious server can mount on what crosses the split: measuring the leak.

Two threat models, each with the message the server sees in the clear:

* **Label leakage from dF** (Li et al., "Label Leakage and Protection in Two-party Split Learning",
  ICLR 2022). For a binary classification site the server receives each sample's feature gradient
  dF = d loss / dF. With cross-entropy, dF = J(x)^T (p - onehot(y)): its norm scales with |1 - p_y|,
  which is larger for the (hard-to-fit) minority class, and its direction flips with the label.
  ``norm_attack_scores`` scores each sample by ||dF|| (convention: a higher score predicts the
  minority / positive class, the sign the attacker knows a priori); ``direction_attack_scores``
  scores by the cosine with a reference sample whose label the attacker knows (sign then fixed by
  that label, see ``direction_attack_auc``).
* **Reconstruction from z** (model inversion). The server has auxiliary data from the same
  distribution and query access to the same embedding, trains a decoder z -> x and applies it to
  the sites' z. ``train_inversion_decoder`` and ``ssim`` measure how well that works.

These functions measure leakage; they are not defences. The defences are ``LabelDP`` (on dF) and
``GaussianActivationDP`` (on z) in :mod:`.mechanisms`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..site.metrics import binary_auc

GradLike = Tensor | Sequence[Tensor]


def flatten_per_sample(maps: GradLike) -> Tensor:
    """One (B, P) float64 matrix per sample from a tensor (B, ...) or a list of maps, each (B, ...)."""
    if isinstance(maps, Tensor):
        maps = [maps]
    maps = list(maps)
    if not maps:
        raise ValueError("no gradient maps given")
    b = maps[0].shape[0]
    for i, m in enumerate(maps):
        if m.ndim < 1 or m.shape[0] != b:
            raise ValueError(f"map {i}: batch dimension {tuple(m.shape[:1])} differs from map 0's ({b},)")
    return torch.cat([m.detach().reshape(b, -1).to(torch.float64) for m in maps], dim=1)


def norm_attack_scores(dF_per_sample: GradLike) -> Tensor:
    """Per-sample L2 norm of dF (joint over all maps); a higher score predicts the positive class. (B,)"""
    return flatten_per_sample(dF_per_sample).norm(dim=1)


def direction_attack_scores(dF_per_sample: GradLike, reference_index: int) -> Tensor:
    """Cosine similarity of each sample's dF with sample ``reference_index``'s dF. (B,)

    A high score means "same label as the reference"; the reference itself scores 1.
    """
    flat = flatten_per_sample(dF_per_sample)
    if not -flat.shape[0] <= reference_index < flat.shape[0]:
        raise IndexError(f"reference_index {reference_index} out of range for batch {flat.shape[0]}")
    ref = flat[reference_index]
    return F.cosine_similarity(flat, ref.unsqueeze(0).expand_as(flat), dim=1, eps=1e-30)


def label_auc(scores: Tensor, labels: Tensor) -> float:
    """AUC of ``scores`` for predicting ``labels == 1`` (no sign flipping)."""
    return binary_auc(scores.detach().double().cpu(), labels.detach().cpu().bool())


def norm_attack_auc(dF_per_sample: GradLike, labels: Tensor) -> float:
    """AUC of the norm attack with the a-priori sign (larger norm = positive / minority class)."""
    return label_auc(norm_attack_scores(dF_per_sample), labels)


def direction_attack_auc(dF_per_sample: GradLike, labels: Tensor, reference_index: int) -> float:
    """AUC of the direction attack, the reference sample excluded from the evaluation.

    The attacker knows the reference's label: if it is positive, a high cosine predicts positive;
    if negative, a high cosine predicts negative, so the score is negated. No max(AUC, 1 - AUC).
    """
    labels = labels.detach().cpu().bool()
    scores = direction_attack_scores(dF_per_sample, reference_index).cpu()
    if not bool(labels[reference_index]):
        scores = -scores
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    keep[reference_index] = False
    return label_auc(scores[keep], labels[keep])


def auc_null_std(n_pos: int, n_neg: int) -> float:
    """Standard deviation of the AUC of a score independent of the labels (Mann-Whitney null)."""
    return math.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))


# --- reconstruction -------------------------------------------------------------------------


class InversionDecoder(nn.Module):
    """Small conv decoder z (B, D, H/s, W/s) -> x (B, C, H, W) in [0, 1]; s = 2**n_up (pixel shuffle).

    The output is sigmoid(net(z) + prior) with a learnable per-pixel prior initialised to the logit
    of the mean training image, so the decoder starts at the no-information baseline.
    """

    def __init__(
        self, z_channels: int, out_shape: tuple[int, ...], n_up: int, width: int = 64, prior: Tensor | None = None
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(z_channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
        ]
        for _ in range(n_up):
            layers += [nn.Conv2d(width, 4 * width, 3, padding=1), nn.PixelShuffle(2), nn.GELU()]
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, out_shape[0], 1)]
        self.net = nn.Sequential(*layers)
        init = torch.zeros(out_shape) if prior is None else torch.logit(prior.float().clamp(0.01, 0.99))
        self.prior = nn.Parameter(init.reshape(out_shape).clone())

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.net(z) + self.prior)


def train_inversion_decoder(
    z_train: Tensor,
    x_train: Tensor,
    steps: int,
    *,
    batch_size: int = 32,
    lr: float = 3e-3,
    width: int = 64,
    seed: int = 0,
    z_transform: Callable[[Tensor], Tensor] | None = None,
) -> InversionDecoder:
    """Train a decoder mapping activations ``z_train`` (N, D, h, w) to images ``x_train`` (N, C, H, W).

    ``z_transform`` is applied to every minibatch of z (e.g. ``GaussianActivationDP.apply``, so that
    the attacker trains on freshly noised z as the site would release it). Loss: L1 + MSE.
    """
    if z_train.shape[0] != x_train.shape[0]:
        raise ValueError(f"z has {z_train.shape[0]} samples, x has {x_train.shape[0]}")
    ratio = x_train.shape[-1] // z_train.shape[-1]
    n_up = int(round(math.log2(ratio))) if ratio >= 1 else 0
    if 2**n_up != ratio or x_train.shape[-2] != z_train.shape[-2] * ratio:
        raise ValueError(f"image size {tuple(x_train.shape[-2:])} is not a power-of-2 multiple of z's")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = InversionDecoder(
            z_train.shape[1], tuple(x_train.shape[1:]), n_up, width, prior=x_train.float().mean(dim=0)
        )
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    z_train, x_train = z_train.detach().float(), x_train.detach().float()
    n = z_train.shape[0]
    dec.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        z = z_train[idx]
        if z_transform is not None:
            z = z_transform(z)
        out = dec(z)
        loss = F.l1_loss(out, x_train[idx]) + F.mse_loss(out, x_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    dec.eval()
    return dec


@torch.no_grad()
def reconstruct(decoder: nn.Module, z: Tensor, batch_size: int = 128) -> Tensor:
    """Apply a trained decoder in batches (no grad)."""
    return torch.cat([decoder(z[i : i + batch_size].float()) for i in range(0, z.shape[0], batch_size)])


def ssim_per_sample(x_hat: Tensor, x: Tensor, win_size: int = 7) -> Tensor:
    """2-D SSIM per sample (mean over channels), data range 1, via MONAI's SSIMMetric. (B,)"""
    from monai.metrics import SSIMMetric

    if x_hat.shape != x.shape or x.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(x_hat.shape)}, {tuple(x.shape)}")
    win = min(win_size, x.shape[-1], x.shape[-2])
    win -= 1 - win % 2  # odd
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=win, reduction="none")
    out = metric(x_hat.detach().float().clamp(0, 1), x.detach().float())
    return torch.as_tensor(out).reshape(x.shape[0], -1).mean(dim=1)


def ssim(x_hat: Tensor, x: Tensor, win_size: int = 7) -> float:
    """Mean 2-D SSIM over the batch (data range 1)."""
    return float(ssim_per_sample(x_hat, x, win_size).mean())


def mean_image_baseline(x_train: Tensor, x_test: Tensor, win_size: int = 7) -> float:
    """SSIM of predicting the mean training image for every test image (an attacker with no z)."""
    mean = x_train.float().mean(dim=0, keepdim=True).expand_as(x_test)
    return ssim(mean, x_test, win_size)
