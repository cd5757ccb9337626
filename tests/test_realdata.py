"""The shipped real-data sites load: counts, shapes, value ranges, alignment, label distribution.

The data lives outside the repository, in ``$FEDBONE_DATA_ROOT`` (default ``../shared/data``
beside the checkout). These tests fail, not skip, when it is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedbone_med.config import load_site
from fedbone_med.data.manifest import default_data_root
from fedbone_med.data.sources import load_site_data

pytestmark = pytest.mark.realdata
SITES = Path(__file__).resolve().parents[1] / "sites"


@pytest.fixture(scope="module", autouse=True)
def _data_root_present():
    root = default_data_root()
    for name in ("chase_db1", "idrid_seg_subset", "retinamnist"):
        if not (root / name).is_dir():
            pytest.fail(
                f"real data set {name!r} not found under {root}; put ../shared/data beside the checkout "
                "or set FEDBONE_DATA_ROOT to the folder that holds it"
            )


@pytest.fixture(scope="module")
def chase():
    return load_site_data(load_site(SITES / "chase-db1-vessels.toml"))


def _vessel_contrast(images: torch.Tensor, vessel: torch.Tensor, retina: torch.Tensor) -> float:
    """Mean of (green - its 9x9 local mean) over vessel pixels minus the same over other retina."""
    green = images[:, 1:2]
    local = torch.nn.functional.avg_pool2d(green, 9, stride=1, padding=4, count_include_pad=False)
    residual = (green - local)[:, 0]
    return float(residual[vessel & retina].mean() - residual[~vessel & retina].mean())


def _check_images(x: torch.Tensor, size: int) -> None:
    assert x.shape[1:] == (3, size, size) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.mean()) > 0.1


def test_chase_db1_vessels(chase):
    assert (len(chase.train), len(chase.val)) == (14, 14)
    assert chase.split["train_subjects"] == 7 and chase.split["val_subjects"] == 7
    for split in (chase.train, chase.val):
        _check_images(split.images, 128)
        y = split.targets
        assert y.shape[1:] == (1, 128, 128) and set(y.unique().tolist()) == {0.0, 1.0}
        retina = split.images.mean(1) > 0.1  # (N, H, W) inside the field of view
        vessel = y[:, 0] > 0
        frac = float((vessel & retina).sum() / retina.sum())
        assert 0.05 < frac < 0.20, frac
        # alignment: vessels are darker than their immediate surroundings in the green channel,
        # and a mask shifted by a few pixels loses that contrast (so misalignment is caught)
        aligned = _vessel_contrast(split.images, vessel, retina)
        shifted = _vessel_contrast(split.images, torch.roll(vessel, shifts=(6, 6), dims=(1, 2)), retina)
        assert aligned < -0.01 and aligned < 3 * shifted, (aligned, shifted)


def test_idrid_optic_disc_and_haemorrhages():
    data = load_site_data(load_site(SITES / "idrid-od-he.toml"))
    assert len(data.train) + len(data.val) == 20 and len(data.val) >= 3
    y = torch.cat([data.train.targets, data.val.targets])
    assert y.shape[1:] == (2, 128, 128)
    od = y[:, 0].flatten(1).mean(1)
    assert bool((od > 0.003).all()) and bool((od < 0.06).all()), "every image shows one optic disc"
    assert float(y[:, 1].sum()) > 0, "haemorrhages are present"
    # alignment: the optic disc is the brightest structure
    x = torch.cat([data.train.images, data.val.images]).mean(1)
    disc = y[:, 0] > 0
    assert float(x[disc].mean()) > float(x[(~disc) & (x > 0.1)].mean()) + 0.1


def test_idrid_five_lesion_classes_from_colour_masks():
    data = load_site_data(load_site(SITES / "idrid-lesions.toml"))
    y = torch.cat([data.train.targets, data.val.targets])
    assert y.shape[1:] == (128, 128) and y.dtype == torch.int64
    counts = torch.bincount(y.flatten(), minlength=6)
    assert counts.numel() == 6 and counts[0] > 0.85 * y.numel(), "background dominates"
    assert bool((counts[1:] > 0).all()), f"every lesion class and the disc appear: {counts.tolist()}"
    assert bool(((y == 5).flatten(1).any(1)).all()), "the optic disc is in every image"


def test_retinamnist_grades():
    data = load_site_data(load_site(SITES / "retinamnist-dr.toml"))
    assert (len(data.train), len(data.val)) == (1080, 120)
    _check_images(data.train.images, 64)
    counts = torch.bincount(data.train.targets, minlength=5)
    assert counts.numel() == 5 and int(counts.sum()) == 1080
    assert int(counts.argmax()) == 0 and bool((counts > 0).all()), counts.tolist()
