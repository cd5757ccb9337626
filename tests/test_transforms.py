"""Declarative transform chains: allow-list, argument checks, mask alignment, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedbone_med.data.phantoms import make_fundus
from fedbone_med.data.transforms import build_transforms
from fedbone_med.errors import ConfigError, RegistryError


def _blocky(seed: int = 0, size: int = 48) -> dict:
    """An image whose every channel equals its (multi-class) mask, in 6x6 blocks."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 4, (size // 6, size // 6)), np.ones((6, 6))).astype(np.uint8)[None]  # (1, H, W)
    image = np.repeat(mask.astype(np.float32) / 3.0, 3, axis=0)  # (3, H, W) in {0, 1/3, 2/3, 1}
    return {"image": image, "label": mask}


GEOMETRIC = {
    "RandFlipd": {"prob": 1.0, "spatial_axis": 1},
    "RandRotate90d": {"prob": 1.0, "max_k": 3},
    "RandRotated": {"prob": 1.0, "range_x": 0.6, "mode": "nearest", "padding_mode": "zeros"},
    "RandZoomd": {"prob": 1.0, "min_zoom": 0.8, "max_zoom": 1.3, "mode": "nearest"},
    "RandAffined": {"prob": 1.0, "rotate_range": 0.5, "translate_range": [4, 4], "scale_range": 0.2,
                    "mode": "nearest", "padding_mode": "zeros"},
    "RandSpatialCropd": {"roi_size": [30, 36], "random_size": False},
    # deterministic geometry: sizes that change the array so that a misaligned mask would show
    "Resized": {"spatial_size": [60, 44], "mode": "nearest"},
    "SpatialPadd": {"spatial_size": [56, 60]},
    "CenterSpatialCropd": {"roi_size": [40, 36]},
    "ResizeWithPadOrCropd": {"spatial_size": [40, 60]},
}
INTENSITY_ONLY = {"EnsureChannelFirstd", "ScaleIntensityd", "ScaleIntensityRanged", "ScaleIntensityRangePercentilesd",
                  "NormalizeIntensityd", "CastToTyped", "EnsureTyped", "RandAdjustContrastd", "RandGaussianNoised",
                  "RandGaussianSmoothd", "RandScaleIntensityd", "RandShiftIntensityd"}
ALBU_INTENSITY_ONLY = {"RandomBrightnessContrast", "CLAHE", "GaussNoise", "HueSaturationValue", "RandomGamma"}
ALBU_GEOMETRIC = [
    {"name": "HorizontalFlip", "p": 1.0},
    {"name": "VerticalFlip", "p": 1.0},
    {"name": "RandomRotate90", "p": 1.0},
    {"name": "Rotate", "limit": 40, "p": 1.0, "interpolation": 0},
    {"name": "Affine", "rotate": [-30, 30], "translate_percent": [-0.1, 0.1], "scale": [0.8, 1.2],
     "interpolation": 0, "p": 1.0},
]


def test_every_allowed_geometric_transform_is_in_the_alignment_tests():
    from fedbone_med.data.transforms import _ALBU_ALLOWED, _MONAI_ALLOWED

    assert set(_MONAI_ALLOWED) - INTENSITY_ONLY == set(GEOMETRIC)
    assert set(_ALBU_ALLOWED) - ALBU_INTENSITY_ONLY == {op["name"] for op in ALBU_GEOMETRIC}


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_monai_geometric_augmentations_keep_masks_aligned(name):
    chain = [{"name": name, "keys": ["image", "label"], **GEOMETRIC[name]}]
    changed = False
    for seed in range(5):
        sample = _blocky(seed)
        out = build_transforms(chain, seed=seed)(sample)
        image, label = np.asarray(out["image"]), np.asarray(out["label"])
        assert image.shape[1:] == label.shape[1:]
        np.testing.assert_array_equal(np.rint(image[0] * 3).astype(np.uint8), label[0], err_msg=f"{name} seed {seed}")
        changed |= label.shape != sample["label"].shape or not np.array_equal(label, sample["label"])
    assert changed, "the augmentation never changed the mask: the test would not catch misalignment"


@pytest.mark.parametrize("op", ALBU_GEOMETRIC, ids=[o["name"] for o in ALBU_GEOMETRIC])
def test_albumentations_geometric_augmentations_keep_masks_aligned(op):
    chain = [{"name": "Albumentationsd", "keys": ["image", "label"], "ops": [op]}]
    changed = False
    for seed in range(5):
        sample = _blocky(seed)
        out = build_transforms(chain, seed=seed)(sample)
        image, label = np.asarray(out["image"]), np.asarray(out["label"])
        np.testing.assert_array_equal(np.rint(image[0] * 3).astype(np.uint8), label[0], err_msg=f"seed {seed}")
        changed |= not np.array_equal(label, sample["label"])
    assert changed, "the augmentation never changed the mask: the test would not catch misalignment"


def test_seeded_chain_is_reproducible_and_seeds_differ():
    chain = [
        {"name": "RandAffined", "keys": ["image", "label"], "prob": 1.0, "rotate_range": 0.5, "mode": "nearest"},
        {"name": "Albumentationsd", "keys": ["image", "label"],
         "ops": [{"name": "RandomBrightnessContrast", "p": 1.0}, {"name": "HorizontalFlip", "p": 0.5}]},
    ]
    a = build_transforms(chain, seed=3)(_blocky(1))
    b = build_transforms(chain, seed=3)(_blocky(1))
    c = build_transforms(chain, seed=4)(_blocky(1))
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))


def test_fundus_fov_crop_is_square_and_keeps_the_field():
    ph = make_fundus(0, 96)
    image = np.ascontiguousarray(ph.image.transpose(2, 0, 1))
    # put the fundus off-centre in a wider black frame
    framed = np.zeros((3, 96, 160), dtype=np.float32)
    framed[:, :, 40:136] = image
    label = np.zeros((1, 96, 160), dtype=np.uint8)
    label[0, :, 40:136] = ph.vessels
    out = build_transforms([{"name": "FundusFOVCropd", "keys": ["image", "label"]}])({"image": framed, "label": label})
    h, w = np.asarray(out["image"]).shape[1:]
    assert h == w and abs(h - 96) <= 6
    assert int(np.asarray(out["label"]).sum()) == int(ph.vessels.sum()), "the crop must not cut vessels"
    # aligned: a mask computed from the image before the crop equals the one computed after it
    bright = (framed.mean(axis=0) > 0.3).astype(np.uint8)[None]
    out = build_transforms([{"name": "FundusFOVCropd", "keys": ["image", "label"]}])({"image": framed, "label": bright})
    np.testing.assert_array_equal(np.asarray(out["label"])[0], np.asarray(out["image"]).mean(axis=0) > 0.3)


def test_clahe_and_speckle_run_and_stay_in_range():
    chain = [
        {"name": "Albumentationsd", "keys": ["image"], "ops": [{"name": "CLAHE", "clip_limit": 2.0, "p": 1.0}]},
        {"name": "SpeckleNoised", "keys": ["image"], "prob": 1.0, "looks": 10.0},
    ]
    image = np.ascontiguousarray(make_fundus(1, 64).image.transpose(2, 0, 1))
    out = np.asarray(build_transforms(chain, seed=0)({"image": image})["image"])
    assert out.shape == image.shape and out.min() >= 0.0 and out.max() <= 1.0
    assert not np.array_equal(out, image)


def test_unknown_transform_and_bad_arguments_are_config_errors():
    with pytest.raises(RegistryError, match="unknown transform 'Exec'; known: .*RandFlipd"):
        build_transforms([{"name": "Exec", "code": "import os"}])
    with pytest.raises(ConfigError, match=r"transform\[0\] \(RandFlipd\): invalid arguments"):
        build_transforms([{"name": "RandFlipd", "keys": ["image"], "probability": 1.0}])
    with pytest.raises(ConfigError, match="not an allowed albumentations transform"):
        build_transforms([{"name": "Albumentationsd", "keys": ["image"], "ops": [{"name": "Lambda"}]}])
    with pytest.raises(ConfigError, match="needs a 'name'"):
        build_transforms([{"keys": ["image"]}])


def test_train_time_augmentation_of_a_batch_is_aligned_and_reproducible():
    import torch

    from fedbone_med.config import TaskConfig
    from fedbone_med.data.augment import augment_batch
    from fedbone_med.data.pipeline import load_chain

    shipped = Path(__file__).resolve().parents[1] / "pipelines" / "transforms" / "fundus_augment.toml"
    chain = build_transforms(load_chain(shipped)[:2])  # its geometric part
    masks = torch.stack([torch.as_tensor(_blocky(s)["label"][0], dtype=torch.int64) for s in range(6)])  # (B, H, W)
    x = (masks.float() / 3.0)[:, None].repeat(1, 3, 1, 1)
    task = TaskConfig(type="segmentation", num_classes=4, mode="multiclass")
    # nearest for the image too, so that the image still encodes its mask exactly
    nearest = build_transforms([
        {"name": "RandFlipd", "keys": ["image", "label"], "prob": 0.5, "spatial_axis": 1},
        {"name": "RandRotated", "keys": ["image", "label"], "prob": 1.0, "range_x": 0.5, "mode": "nearest"},
    ])
    xa, ya = augment_batch(nearest, task, x, masks, seed=11)
    assert ya.dtype == torch.int64 and ya.shape == masks.shape
    assert torch.equal(torch.round(xa[:, 0] * 3).long(), ya)
    assert not torch.equal(ya, masks)
    xb, yb = augment_batch(nearest, task, x, masks, seed=11)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xc, _ = augment_batch(nearest, task, x, masks, seed=12)
    assert not torch.equal(xa, xc)
    # the shipped chain runs on binary masks and keeps them binary
    binary = (masks > 1).float()[:, None]
    _, yb2 = augment_batch(chain, TaskConfig(type="segmentation", num_classes=1, mode="binary"), x, binary, seed=1)
    assert set(yb2.unique().tolist()) <= {0.0, 1.0}
