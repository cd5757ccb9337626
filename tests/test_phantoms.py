"""Synthetic fundus and OCT phantoms: determinism, ground-truth consistency, learnable
signal, file round trips (PNG, DICOM OP/OPT, NIfTI) and argument checking."""

from __future__ import annotations

import numpy as np
import pytest

from fedbone_med.data.phantom_io import (
    OP_8BIT_SOP_CLASS,
    OPT_SOP_CLASS,
    to_uint8,
    write_fundus_dicom,
    write_fundus_png,
    write_label_png,
    write_oct_dicom,
    write_oct_label_nifti,
    write_oct_nifti,
)
from fedbone_med.data.phantoms import (
    FLUID_CLASS,
    SEVERE_HAEMORRHAGES,
    grade_from_counts,
    make_fundus,
    make_fundus_batch,
    make_oct,
    make_oct_batch,
    make_oct_volume,
)
from fedbone_med.errors import DataError, FedboneError

FUNDUS_FIELDS = ("image", "fov", "vessels", "disc", "cup", "lesions", "neovascular")
OCT_FIELDS = ("image", "layers", "fluid", "drusen", "boundaries")


def _same(a: object, b: object, fields: tuple[str, ...]) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields)


# --------------------------------------------------------------------------- fundus
def test_fundus_is_deterministic_and_seed_dependent() -> None:
    a, b = make_fundus(7, 64), make_fundus(7, 64)
    assert _same(a, b, FUNDUS_FIELDS)
    assert (a.grade, a.macular_edema, a.laterality, a.lesion_counts) == (
        b.grade,
        b.macular_edema,
        b.laterality,
        b.lesion_counts,
    )
    c = make_fundus(8, 64)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.vessels, c.vessels)


def test_fundus_does_not_touch_the_global_rng() -> None:
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    make_fundus(3, 32)
    make_oct(3, 32)
    assert np.random.random() == before


@pytest.mark.parametrize("size", [16, 32, 64, 100, 128])
def test_fundus_shapes_types_and_masks(size: int) -> None:
    for seed in range(4):
        p = make_fundus(seed, size)
        assert p.image.shape == (size, size, 3) and p.image.dtype == np.float32
        assert 0.0 <= p.image.min() and p.image.max() <= 1.0
        assert p.fov.shape == (size, size) and p.fov.dtype == bool
        assert 0.5 < p.fov.mean() < 0.8  # a centred circle
        assert not p.image[~p.fov].any(), "black outside the field of view"
        for name in ("vessels", "disc", "cup", "neovascular"):
            m = getattr(p, name)
            assert m.shape == (size, size) and m.dtype == np.uint8
            assert set(np.unique(m)) <= {0, 1}
            assert not m[~p.fov].any(), f"{name} outside the FOV"
        assert p.lesions.dtype == np.uint8 and p.lesions.max() <= 4
        assert not p.lesions[~p.fov].any()
        assert p.disc.any() and p.cup.any()
        assert not (p.cup & ~p.disc).any(), "cup inside disc"
        assert p.cup.sum() < p.disc.sum()
        assert p.laterality in ("R", "L")


def test_fundus_large_sizes_work() -> None:
    p = make_fundus(5, 1024, grade=4)
    assert p.image.shape == (1024, 1024, 3) and p.grade == 4
    assert 0.05 < p.vessels[p.fov].mean() < 0.2


@pytest.mark.parametrize("grade", range(5))
@pytest.mark.parametrize("size", [32, 64])
def test_requested_grade_is_honoured_and_matches_lesions(grade: int, size: int) -> None:
    for seed in range(8):
        p = make_fundus(seed, size, grade=grade)
        counts = p.lesion_counts
        assert p.grade == grade == grade_from_counts(*counts)
        present = {int(c) for c in np.unique(p.lesions)} - {0}
        assert present == {c for c in range(1, 5) if counts[c - 1] > 0}, "lesion map and counts agree"
        assert bool(p.neovascular.any()) == (grade == 4) == (counts[4] > 0)
        if grade == 0:
            assert not p.lesions.any()
        elif grade == 1:
            assert present == {1}
        else:
            assert present & {2, 3, 4}
        if grade == 3:
            assert counts[1] >= SEVERE_HAEMORRHAGES
        if grade == 2:
            assert counts[1] < SEVERE_HAEMORRHAGES


def test_grade_rule() -> None:
    assert grade_from_counts(0, 0, 0, 0, 0) == 0
    assert grade_from_counts(3, 0, 0, 0, 0) == 1
    assert grade_from_counts(3, 1, 0, 0, 0) == 2
    assert grade_from_counts(0, 0, 1, 0, 0) == 2
    assert grade_from_counts(0, 0, 0, 1, 0) == 2
    assert grade_from_counts(1, SEVERE_HAEMORRHAGES, 0, 0, 0) == 3
    assert grade_from_counts(0, 0, 0, 0, 1) == 4


def test_drawn_grade_is_uniform_and_reproducible() -> None:
    grades = [make_fundus(s, 32).grade for s in range(60)]
    assert set(grades) == set(range(5))
    p = make_fundus(11, 48)
    q = make_fundus(11, 48, grade=p.grade)
    assert _same(p, q, FUNDUS_FIELDS)


def test_macular_edema_follows_exudates_near_the_fovea() -> None:
    seen = set()
    for seed in range(30):
        p = make_fundus(seed, 64, grade=2 + seed % 3)
        rows, cols = np.nonzero(p.lesions == 3)
        d = np.hypot(rows + 0.5 - p.fovea_center[0], cols + 0.5 - p.fovea_center[1])
        assert p.macular_edema == int(bool(len(d)) and d.min() <= p.disc_diameter)
        seen.add(p.macular_edema)
    assert seen == {0, 1}
    assert all(make_fundus(s, 64, grade=g).macular_edema == 0 for s in range(5) for g in (0, 1))


def test_anatomy_layout_and_laterality() -> None:
    sides = set()
    for seed in range(12):
        p = make_fundus(seed, 64)
        sides.add(p.laterality)
        disc_col, fovea_col = p.disc_center[1], p.fovea_center[1]
        # the disc is nasal: right of the fovea in a right eye, left of it in a left eye
        assert (disc_col > fovea_col) == (p.laterality == "R")
        assert 2.0 < abs(disc_col - fovea_col) / p.disc_diameter < 3.0
        rows, cols = np.nonzero(p.disc)
        assert abs(rows.mean() + 0.5 - p.disc_center[0]) < 2 and abs(cols.mean() + 0.5 - disc_col) < 2
    assert sides == {"L", "R"}


def test_vessels_are_plausible_and_darker_in_green() -> None:
    for seed in range(20):
        p = make_fundus(seed, 64)
        frac = p.vessels[p.fov].mean()
        assert 0.05 < frac < 0.2, f"vessel fraction {frac:.3f}"
        green = p.image[..., 1]
        background = p.fov & (p.vessels == 0)
        assert green[p.vessels == 1].mean() < green[background].mean()


def test_lesion_colours_are_learnable() -> None:
    p = make_fundus(2, 128, grade=3)
    g, r = p.image[..., 1], p.image[..., 0]
    background = p.fov & (p.vessels == 0) & (p.lesions == 0) & (p.disc == 0)
    assert g[p.lesions == 2].mean() < g[background].mean()  # haemorrhages dark
    assert r[p.lesions == 3].mean() > r[background].mean()  # exudates bright
    assert p.image[p.disc == 1].mean() > p.image[background].mean()  # disc bright


def test_fundus_batch() -> None:
    b = make_fundus_batch([1, 2, 3], 32, grades=[0, 4, None])
    assert b["image"].shape == (3, 32, 32, 3) and b["vessels"].shape == (3, 32, 32)
    assert b["grade"].tolist()[:2] == [0, 4] and b["grade"].dtype == np.int64
    assert np.array_equal(b["image"][1], make_fundus(2, 32, 4).image)


# --------------------------------------------------------------------------- OCT
def test_oct_is_deterministic_and_seed_dependent() -> None:
    a, b = make_oct(5, 64), make_oct(5, 64)
    assert _same(a, b, OCT_FIELDS) and a.label == b.label
    assert not np.array_equal(a.image, make_oct(6, 64).image)


@pytest.mark.parametrize("size", [16, 32, 64, (48, 96), (128, 64)])
@pytest.mark.parametrize("label", [0, 1, 2])
def test_oct_label_layers_and_masks(size: int | tuple[int, int], label: int) -> None:
    h, w = (size, size) if isinstance(size, int) else size
    for seed in range(5):
        p = make_oct(seed, size, label=label)
        assert p.label == label and p.edema == int(label == 1)
        assert p.image.shape == (h, w) and p.image.dtype == np.float32
        assert 0.0 <= p.image.min() and p.image.max() <= 1.0
        for name in ("layers", "fluid", "drusen"):
            assert getattr(p, name).shape == (h, w) and getattr(p, name).dtype == np.uint8
        assert bool(p.fluid.any()) == (label == 1), "fluid present iff label 1"
        assert bool(p.drusen.any()) == (label == 2), "drusen present iff label 2"
        assert np.array_equal(p.layers == FLUID_CLASS, p.fluid == 1)
        assert p.layers.max() <= FLUID_CLASS
        # layers are ordered top to bottom in every column (fluid ignored)
        lay = np.where(p.fluid == 1, -1, p.layers.astype(int))
        for col in lay.T:
            kept = col[col >= 0]
            assert np.all(np.diff(kept) >= 0)
        assert p.layers[0].max() == 0 and p.layers[-1].min() == 7, "vitreous on top, choroid at the bottom"
        assert not (p.drusen & (p.layers != 6)).any(), "drusen belong to the RPE/drusen complex"
        assert np.all(np.diff(p.boundaries, axis=0) >= -1e-4)
        if label == 1:
            assert set(np.unique(p.layers[p.fluid == 1])) == {FLUID_CLASS}


def test_oct_layers_have_distinct_reflectivity() -> None:
    means = np.zeros((8, 10))
    for seed in range(10):
        p = make_oct(seed, 128, label=0)
        for c in range(8):
            means[c, seed] = p.image[p.layers == c].mean()
    m = means.mean(axis=1)
    assert m[6] == m.max(), "RPE brightest"
    assert m[1] > m[4] and m[2] > m[4], "RNFL and GCL/IPL brighter than the ONL"
    assert m[0] < m[4], "vitreous darkest"
    oed = make_oct(3, 128, label=1)
    assert oed.image[oed.fluid == 1].mean() < oed.image[(oed.layers == 3) | (oed.layers == 4)].mean()


def test_oct_labels_are_drawn_uniformly() -> None:
    labels = [make_oct(s, 32).label for s in range(30)]
    assert set(labels) == {0, 1, 2}
    p = make_oct(4, 32)
    assert _same(p, make_oct(4, 32, label=p.label), OCT_FIELDS)


@pytest.mark.parametrize("label", [0, 1, 2])
def test_oct_volume_is_one_smooth_eye(label: int) -> None:
    vol = make_oct_volume(9, 17, 64, label=label)
    assert len(vol) == 17 and all(p.label == label for p in vol)
    assert all(bool(p.fluid.any()) == (label == 1) and bool(p.drusen.any()) == (label == 2) for p in vol)
    positions = [p.slice_position for p in vol]
    assert positions == sorted(positions) and positions[8] == 0.0

    def mean_step(v: list) -> float:
        return float(np.mean([np.abs(b.boundaries - a.boundaries).mean() for a, b in zip(v[:-1], v[1:], strict=True)]))

    fine = make_oct_volume(9, 33, 64, label=label)
    assert mean_step(fine) < 0.7 * mean_step(vol), "halving the spacing about halves the change"
    assert max(np.mean(a.layers != b.layers) for a, b in zip(fine[:-1], fine[1:], strict=True)) < 0.06
    assert not np.array_equal(vol[0].image, vol[1].image)
    one = make_oct_volume(9, 1, 64, label=label)[0]
    assert _same(one, make_oct(9, 64, label=label), OCT_FIELDS)


def test_oct_batch() -> None:
    b = make_oct_batch([1, 2], (32, 48), labels=[2, 1])
    assert b["image"].shape == (2, 32, 48) and b["layers"].shape == (2, 32, 48)
    assert b["label"].tolist() == [2, 1] and b["edema"].tolist() == [0, 1]


# --------------------------------------------------------------------------- files
def test_fundus_png_round_trip(tmp_path) -> None:
    from PIL import Image

    p = make_fundus(3, 64, grade=3)
    paths = write_fundus_png(p, tmp_path / "img" / "eye.png", tmp_path / "masks")
    im = Image.open(paths["image"])
    assert im.mode == "RGB"
    assert np.array_equal(np.asarray(im), to_uint8(p.image))
    for name in ("fov", "vessels", "disc", "cup", "neovascular"):
        m = Image.open(paths[name])
        assert m.mode == "1"
        assert np.array_equal(np.asarray(m), np.asarray(getattr(p, name)).astype(bool))
    les = Image.open(paths["lesions"])
    assert les.mode == "P"
    assert np.array_equal(np.asarray(les), p.lesions)
    oct_p = make_oct(1, 32, label=1)
    lab = Image.open(write_label_png(oct_p.layers, tmp_path / "layers.png"))
    assert lab.mode == "P" and np.array_equal(np.asarray(lab), oct_p.layers)


def test_fundus_dicom_round_trip(tmp_path) -> None:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    p = make_fundus(4, 48, grade=2)
    path = write_fundus_dicom(p, tmp_path / "op.dcm", patient_id="PHANTOM-7")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == OP_8BIT_SOP_CLASS == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "OP" and ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert ds.BitsAllocated == 8 and ds.ImageLaterality == p.laterality
    assert ds.PatientID == "PHANTOM-7" and str(ds.PatientName).startswith("PHANTOM")
    assert ds.pixel_array.shape == (48, 48, 3)
    assert np.array_equal(ds.pixel_array, to_uint8(p.image))
    with open(path, "rb") as f:
        assert f.read(132)[128:] == b"DICM"
    # same phantom -> byte-identical file (UIDs derive from the pixels)
    again = write_fundus_dicom(p, tmp_path / "op2.dcm", patient_id="PHANTOM-7")
    assert path.read_bytes() == again.read_bytes()


def test_oct_dicom_round_trip(tmp_path) -> None:
    import pydicom

    vol = make_oct_volume(2, 5, (40, 56), label=1)
    ds = pydicom.dcmread(write_oct_dicom(vol, tmp_path / "opt.dcm"))
    assert ds.SOPClassUID == OPT_SOP_CLASS and ds.Modality == "OPT"
    assert ds.PhotometricInterpretation == "MONOCHROME2" and int(ds.NumberOfFrames) == 5
    assert len(ds.PerFrameFunctionalGroupsSequence) == 5
    arr = ds.pixel_array
    assert arr.shape == (5, 40, 56) and arr.dtype == np.uint8
    assert np.array_equal(arr, np.stack([to_uint8(p.image) for p in vol]))


def test_oct_nifti_round_trip(tmp_path) -> None:
    import nibabel as nib

    vol = make_oct_volume(6, 4, (32, 48), label=2)
    img = nib.load(write_oct_nifti(vol, tmp_path / "oct.nii.gz"))
    data = np.asarray(img.dataobj)
    assert data.shape == (32, 48, 4) and data.dtype == np.uint8  # depth, lateral, B-scan
    for k, p in enumerate(vol):
        assert np.array_equal(data[:, :, k], to_uint8(p.image))
    for which in ("layers", "drusen", "fluid"):
        lab = np.asarray(nib.load(write_oct_label_nifti(vol, tmp_path / f"{which}.nii", which)).dataobj)
        assert np.array_equal(lab, np.stack([getattr(p, which) for p in vol], axis=-1))
    assert np.allclose(img.header.get_zooms()[:2], (2.0 / 32, 6.0 / 48))


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: make_fundus(0, 15), "size"),
        (lambda: make_fundus(0, 0), "size"),
        (lambda: make_fundus(0, 4096), "size"),
        (lambda: make_fundus(0, "64"), "size"),  # type: ignore[arg-type]
        (lambda: make_fundus(0, 64, grade=7), "grade"),
        (lambda: make_fundus(0, 64, grade=-1), "grade"),
        (lambda: make_fundus(-1, 64), "seed"),
        (lambda: make_fundus(1.5, 64), "seed"),  # type: ignore[arg-type]
        (lambda: make_oct(0, 64, label=5), "label"),
        (lambda: make_oct(0, (64, 8)), "width"),
        (lambda: make_oct(0, (64, 64, 3)), "size"),  # type: ignore[arg-type]
        (lambda: make_oct_volume(0, 0), "n_bscans"),
        (lambda: make_fundus_batch([1, 2], 32, grades=[1]), "grades"),
        (lambda: write_oct_nifti([], "unused.nii"), "B-scan"),
        (lambda: write_oct_nifti([make_oct(0, 32), make_oct(1, 48)], "unused.nii"), "shape"),
    ],
)
def test_bad_arguments_raise_data_error(call, words: str) -> None:
    with pytest.raises(DataError, match=words) as info:
        call()
    assert isinstance(info.value, FedboneError)
