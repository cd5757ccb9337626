"""Label-leakage and reconstruction attacks on split-learning messages (fedbone_med.privacy.attacks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbone_med.data.phantoms import make_fundus
from fedbone_med.privacy import GaussianActivationDP, LabelDP
from fedbone_med.privacy.attacks import (
    auc_null_std,
    direction_attack_auc,
    direction_attack_scores,
    flatten_per_sample,
    mean_image_baseline,
    norm_attack_auc,
    norm_attack_scores,
    reconstruct,
    ssim,
    ssim_per_sample,
    train_inversion_decoder,
)


def _labels(n: int, n_pos: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, dtype=torch.int64)
    y[torch.randperm(n, generator=g)[:n_pos]] = 1
    return y


def _norm_grads(y: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    """Two maps per sample; positives' gradients are 3x larger, directions random."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.where(y == 1, 3.0, 1.0)
    a = torch.randn(y.shape[0], 4, 4, 4, generator=g)
    b = torch.randn(y.shape[0], 8, 2, 2, generator=g)
    flat = flatten_per_sample([a, b]).float()
    unit = flat / flat.norm(dim=1, keepdim=True) * scale[:, None]
    return [unit[:, :64].reshape(a.shape), unit[:, 64:].reshape(b.shape)]


def _cluster_grads(y: torch.Tensor, seed: int = 2, spread: float = 0.3) -> list[torch.Tensor]:
    """Same norm distribution for both labels; positives around +u, negatives around -u."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, 96, generator=g)
    u = u / u.norm()
    sign = torch.where(y == 1, 1.0, -1.0)[:, None]
    flat = sign * u + spread * torch.randn(y.shape[0], 96, generator=g) / 96**0.5
    flat = flat * torch.empty(y.shape[0], 1).uniform_(0.5, 2.0, generator=g)
    return [flat[:, :64].reshape(-1, 4, 4, 4), flat[:, 64:].reshape(-1, 8, 2, 2)]


def test_norm_attack_separates_larger_positive_norms():
    y = _labels(400, 80)
    assert norm_attack_scores(_norm_grads(y)).shape == (400,)
    assert norm_attack_auc(_norm_grads(y), y) > 0.99


def test_norm_attack_on_random_gradients_is_chance():
    y = _labels(400, 100)
    g = torch.Generator().manual_seed(3)
    dF = torch.randn(400, 8, 4, 4, generator=g)
    assert abs(norm_attack_auc(dF, y) - 0.5) < 4 * auc_null_std(100, 300)


def test_direction_attack_on_two_clusters():
    y = _labels(300, 60)
    dF = _cluster_grads(y)
    ref_pos = int(torch.nonzero(y == 1)[0])
    ref_neg = int(torch.nonzero(y == 0)[0])
    assert direction_attack_scores(dF, ref_pos)[ref_pos] == pytest.approx(1.0)
    assert direction_attack_auc(dF, y, ref_pos) > 0.99
    assert direction_attack_auc(dF, y, ref_neg) > 0.99  # sign fixed by the known reference label
    # norms carry no label information in this construction
    assert abs(norm_attack_auc(dF, y) - 0.5) < 4 * auc_null_std(60, 240)


def test_label_dp_with_large_noise_defeats_both_attacks():
    y = _labels(600, 150)
    bound = 4 * auc_null_std(150, 450)
    for dF, ref in ((_norm_grads(y), None), (_cluster_grads(y), int(torch.nonzero(y == 1)[0]))):
        c = float(norm_attack_scores(dF).median())
        mech = LabelDP(clip_norm=c, noise_multiplier=50.0, generator=torch.Generator().manual_seed(7))
        noised = mech.apply(dF)
        assert abs(norm_attack_auc(noised, y) - 0.5) < bound
        if ref is not None:
            assert direction_attack_auc(dF, y, ref) > 0.99  # leaks without DP ...
            assert abs(direction_attack_auc(noised, y, ref) - 0.5) < bound  # ... not with it


def test_ssim_identical_and_unrelated():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert ssim_per_sample(x, x).shape == (6,)
    noise = torch.rand(6, 3, 32, 32, generator=g)
    assert ssim(noise, x) < 0.1


def _fundus(seeds: range, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.stack([make_fundus(s, size).image.transpose(2, 0, 1) for s in seeds]).astype(np.float32))


def test_inversion_decoder_beats_mean_image_on_an_invertible_toy_embedding():
    torch.manual_seed(0)
    x_train, x_test = _fundus(range(0, 256)), _fundus(range(10_000, 10_048))
    embed = torch.nn.Conv2d(3, 16, 2, stride=2)  # fixed random patch embedding: injective per 2x2 patch
    with torch.no_grad():
        z_train, z_test = embed(x_train), embed(x_test)
    dec = train_inversion_decoder(z_train, x_train, steps=150, batch_size=32, width=32, seed=0)
    rec = ssim(reconstruct(dec, z_test), x_test)
    base = mean_image_baseline(x_train, x_test)
    assert rec > base + 0.05, (rec, base)

    # Activation DP with large noise on z: the attacker, trained on noised z, is back near baseline.
    c = float(z_train.flatten(1).norm(dim=1).median())
    mech = GaussianActivationDP(clip_norm=c, noise_multiplier=5.0, generator=torch.Generator().manual_seed(1))
    dec_dp = train_inversion_decoder(
        z_train, x_train, steps=60, batch_size=32, width=32, seed=0, z_transform=mech.apply
    )
    rec_dp = ssim(reconstruct(dec_dp, mech.apply(z_test)), x_test)
    assert rec_dp < base + 0.03 < rec, (rec_dp, base, rec)


def test_inputs_are_checked():
    with pytest.raises(ValueError):
        flatten_per_sample([torch.zeros(3, 2), torch.zeros(4, 2)])
    with pytest.raises(IndexError):
        direction_attack_scores(torch.zeros(3, 2), 5)
    with pytest.raises(ValueError):
        train_inversion_decoder(torch.zeros(4, 2, 4, 4), torch.zeros(4, 1, 12, 12), steps=1)
