"""The declared load steps (LoadSampled, EnsureChannelFirstd) give the tensors the loader gave
when it read samples in code; pipeline files must declare them; with data.skip_bad_files a
listing problem of one sample is skipped and counted, a structural one still stops the run."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedbone_med.config import load_site
from fedbone_med.data.manifest import Manifest, Sample, default_data_root, list_samples
from fedbone_med.data.phantom_io import write_fundus_dicom, write_fundus_png, write_oct_label_nifti, write_oct_nifti
from fedbone_med.data.phantoms import make_fundus, make_oct_volume
from fedbone_med.data.pipeline import (
    LOAD_STEPS,
    load_manifest,
    load_manifest_splits,
    load_pipeline,
    materialise,
    materialise_npz,
)
from fedbone_med.data.transforms import build_transforms
from fedbone_med.errors import ConfigError, DataError, RegistryError

REPO = Path(__file__).resolve().parents[1]
TRANSFORMS = REPO / "pipelines" / "transforms"
SIZE = 48


# --------------------------------------------------------------------------- the loader as it was
def _old_read(m: Manifest, sample: Sample) -> dict[str, Any]:
    """A sample read the way ``pipeline.read_sample`` did before the load steps were declared:
    the readers called in code, the layout changed with numpy. The reference for equality."""
    from fedbone_med.data.readers import detect_format, read_dicom, read_image, read_mask, read_nifti, read_nifti_labels

    if sample.frame is not None:
        assert m.volumes is not None
        axis, k = m.volumes.axis, sample.frame
        if detect_format(sample.image) == "dicom":
            vol = read_dicom(sample.image).pixels
            vol = vol if vol.ndim == 3 else vol[None]
        else:
            vol = read_nifti(sample.image, axis=axis)
        d: dict[str, Any] = {"image": vol[k][None].astype(np.float32)}
        if m.kind == "classification":
            d["label"] = sample.label
            return d
        labs = [read_nifti_labels(p, axis=axis) for p in sample.masks]
        planes = [lab[k] > spec.threshold if spec.kind == "binary" else lab[k]
                  for spec, lab in zip(m.masks, labs, strict=True)]
        d["label"] = np.stack(planes).astype(np.uint8)
        return d
    if detect_format(sample.image) == "dicom":
        pixels = read_dicom(sample.image).pixels
        image = np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels
    else:
        image = read_image(sample.image, mode="rgb")
    d = {"image": np.ascontiguousarray(image.transpose(2, 0, 1))}
    if m.kind == "classification":
        d["label"] = sample.label
        return d
    masks = []
    for spec, path in zip(m.masks, sample.masks, strict=True):
        if spec.kind == "color":
            cmap = {tuple(int(v) for v in key.split(",")): cls for key, cls in spec.colors.items()}
            masks.append(read_mask(path, kind="color", color_map=cmap, unknown=spec.unknown))  # type: ignore[arg-type]
        else:
            masks.append(read_mask(path, kind=spec.kind, threshold=spec.threshold))
    d["label"] = np.stack(masks).astype(np.uint8)
    return d


def _old_materialise(m: Manifest, samples: list[Sample], body: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    """The old loop: read in code, then the chain (which had no load steps), then tensors."""
    transform = build_transforms(body, seed=0)
    images, labels = [], []
    for s in samples:
        d = transform(_old_read(m, s))
        images.append(torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32))
        if m.kind == "classification":
            labels.append(torch.as_tensor(int(d["label"]), dtype=torch.int64))
        elif len(m.masks) == 1 and m.masks[0].kind in ("index", "color"):
            labels.append(torch.as_tensor(np.asarray(d["label"])[0], dtype=torch.int64))
        else:
            labels.append(torch.as_tensor(np.asarray(d["label"]), dtype=torch.float32))
    return torch.stack(images), torch.stack(labels)


def _resize(m: Manifest, size: int) -> dict[str, Any]:
    keys = ["image"] if m.kind == "classification" else ["image", "label"]
    return {"name": "Resized", "keys": keys, "spatial_size": [size, size], "mode": ["area", "nearest"][: len(keys)],
            "allow_missing_keys": True}


def _assert_same(m: Manifest, samples: list[Sample], pipeline_file: Path | None, size: int = 40) -> None:
    chain = load_pipeline(pipeline_file) if pipeline_file else [dict(s) for s in LOAD_STEPS]
    assert [e["name"] for e in chain[:2]] == ["LoadSampled", "EnsureChannelFirstd"]
    new = materialise(m, samples, [*chain, _resize(m, size)])
    old_images, old_targets = _old_materialise(m, samples, [*chain[2:], _resize(m, size)])
    assert new.images.dtype == old_images.dtype and new.targets.dtype == old_targets.dtype
    assert torch.equal(new.images, old_images)
    assert torch.equal(new.targets, old_targets)
    assert float(new.images.std()) > 0.01, "the comparison ran on real pixels"


def _manifest(root: Path, **fields: Any) -> Manifest:
    from fedbone_med.configtools import from_mapping

    data = {"name": "clinic", "kind": "segmentation", "root": str(root),
            "images": {"folder": "images", "pattern": "*.png", "subject": "P(\\d+)_"},
            "split": {"val_fraction": 0.0}}
    data.update(fields)
    return from_mapping(Manifest, data, where="manifest")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """4 phantom photographs (PNG and DICOM) with vessel, disc and lesion masks."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(4):
        ph = make_fundus(700 + i, SIZE)
        write_fundus_png(ph, root / "images" / f"P{i:02d}_L.png", root / "masks")
        write_fundus_dicom(ph, root / "dicom" / f"P{i:02d}_L.dcm")
    return root


# --------------------------------------------------------------------------- same tensors as before
@pytest.mark.parametrize("pipeline_file", [TRANSFORMS / "fundus.toml", None], ids=["fundus.toml", "no pipeline"])
def test_binary_masks_load_as_before(photos, pipeline_file):
    m = _manifest(photos, masks=[{"folder": "masks", "name": "{stem}_vessels.png", "kind": "binary"}])
    _assert_same(m, list_samples(m), pipeline_file)


def test_index_and_multilabel_masks_load_as_before(photos):
    lesions = _manifest(photos, masks=[{"folder": "masks", "name": "{stem}_lesions.png", "kind": "index"}])
    _assert_same(lesions, list_samples(lesions), TRANSFORMS / "fundus.toml")
    two = _manifest(photos, masks=[{"folder": "masks", "name": "{stem}_vessels.png"},
                                   {"folder": "masks", "name": "{stem}_disc.png"}])
    _assert_same(two, list_samples(two), None)


def test_colour_masks_and_dicom_photographs_load_as_before(photos, tmp_path):
    from PIL import Image

    for i in range(4):
        vessels = np.asarray(Image.open(photos / "masks" / f"P{i:02d}_L_vessels.png"), bool)
        rgb = np.zeros((*vessels.shape, 3), np.uint8)
        rgb[vessels] = (255, 0, 0)
        (tmp_path / "colour").mkdir(exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / "colour" / f"P{i:02d}_L.png")
    shutil.copytree(photos / "dicom", tmp_path / "images")
    m = _manifest(tmp_path, images={"folder": "images", "pattern": "*.dcm", "subject": "P(\\d+)_"},
                  masks=[{"folder": "colour", "name": "{stem}.png", "kind": "color",
                          "colors": {"0,0,0": 0, "255,0,0": 1}}])
    _assert_same(m, list_samples(m), TRANSFORMS / "fundus.toml")


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_oct_bscans_load_as_before(tmp_path, fmt):
    from fedbone_med.data.phantom_io import write_oct_dicom

    for i in range(2):
        vol = make_oct_volume(800 + i, 3, size=32, label=i)
        if fmt == "nifti":
            write_oct_nifti(vol, tmp_path / "volumes" / f"S{i}_L.nii.gz")
        else:
            write_oct_dicom(vol, tmp_path / "volumes" / f"S{i}_L.dcm")
        write_oct_label_nifti(vol, tmp_path / "labels" / f"S{i}_L_layers.nii.gz")
    m = _manifest(tmp_path, images=None,
                  volumes={"folder": "volumes", "pattern": "*.nii.gz" if fmt == "nifti" else "*.dcm",
                           "subject": "S(\\d+)_"},
                  masks=[{"folder": "labels", "name": "{stem}_layers.nii.gz", "kind": "index"}])
    samples = list_samples(m)
    assert len(samples) == 6
    _assert_same(m, samples, None, size=32)


def test_classified_bscans_and_npz_items_load_as_before(tmp_path):
    from fedbone_med.configtools import from_mapping

    rows = ["volume,bscan,label"]
    for p in range(2):
        vol = make_oct_volume(900 + p, 3, size=32, label=p)
        write_oct_nifti(vol, tmp_path / "oct_edema" / "volumes" / f"P{p:02d}_L.nii.gz")
        rows += [f"P{p:02d}_L.nii.gz,{k},{'edema' if vol[k].fluid.sum() else 'normal'}" for k in (0, 2)]
    (tmp_path / "oct_edema" / "bscan_labels.csv").write_text("\n".join(rows) + "\n")
    m = load_manifest(REPO / "pipelines" / "datasets" / "oct_edema_bscans.toml")
    _assert_same(m, list_samples(m, data_root=tmp_path), None, size=32)

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", train_images=rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8),
             train_labels=np.arange(5)[:, None], grey_images=rng.integers(0, 256, (3, 12, 12), dtype=np.uint8),
             grey_labels=np.zeros(3, np.int64))
    npz = from_mapping(Manifest, {"name": "a", "kind": "classification", "root": str(tmp_path),
                                  "npz": {"file": "a.npz", "splits": {"train": ["train_images", "train_labels"],
                                                                      "grey": ["grey_images", "grey_labels"]}}},
                       where="m")
    chain = [*load_pipeline(TRANSFORMS / "none.toml"), _resize(npz, 20)]
    for split, key in (("train", "train_images"), ("grey", "grey_images")):
        new = materialise_npz(npz, split, chain, None)
        raw = np.load(tmp_path / "a.npz")[key].astype(np.float32) / 255
        transform = build_transforms(chain[2:], seed=0)
        old = torch.stack([torch.as_tensor(np.asarray(transform(
            {"image": np.ascontiguousarray(x.transpose(2, 0, 1) if x.ndim == 3 else x[None])})["image"]),
            dtype=torch.float32) for x in raw])
        assert new.images.shape == old.shape and torch.equal(new.images, old), split


def test_one_real_chase_db1_image_loads_as_before():
    """Skipped (only this test) when CHASE_DB1 is not under the data root."""
    if not (default_data_root() / "chase_db1").is_dir():
        pytest.skip(f"CHASE_DB1 not found under {default_data_root()}")
    m = load_manifest(REPO / "pipelines" / "datasets" / "chase_db1.toml")
    first = list_samples(m)[:1]
    assert first and first[0].image.suffix == ".jpg"
    _assert_same(m, first, TRANSFORMS / "fundus.toml", size=128)


# --------------------------------------------------------------------------- the load steps must be declared
def test_a_pipeline_without_the_load_steps_is_refused_with_what_to_add(tmp_path):
    crop = '[[transform]]\nname = "FundusFOVCropd"\nkeys = ["image", "label"]\n'
    no_load = tmp_path / "no_load.toml"
    no_load.write_text(crop)
    with pytest.raises(ConfigError) as e:
        load_pipeline(no_load)
    msg = str(e.value)
    assert msg.startswith(f"{no_load}: the pipeline has no LoadSampled step")
    assert "Add at the head of the file:" in msg
    assert 'name = "LoadSampled"' in msg and 'name = "EnsureChannelFirstd"' in msg, "says what to add"
    # what it says to add works: the file with those tables in front loads
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(msg.split("Add at the head of the file:\n\n", 1)[1] + "\n\n" + crop)
    assert [e["name"] for e in load_pipeline(fixed)] == ["LoadSampled", "EnsureChannelFirstd", "FundusFOVCropd"]

    load_only = tmp_path / "load_only.toml"
    load_only.write_text('[[transform]]\nname = "LoadSampled"\nkeys = ["image", "label"]\n' + crop)
    with pytest.raises(ConfigError) as e:
        load_pipeline(load_only)
    msg = str(e.value)
    assert msg.startswith(f"{load_only}: the pipeline has no EnsureChannelFirstd step")
    assert "Add right after the LoadSampled step:" in msg
    assert 'name = "EnsureChannelFirstd"' in msg and 'name = "LoadSampled"' not in msg

    late = tmp_path / "late.toml"
    late.write_text(crop + '[[transform]]\nname = "LoadSampled"\nkeys = ["image", "label"]\n'
                    '[[transform]]\nname = "EnsureChannelFirstd"\nkeys = ["image", "label"]\n')
    with pytest.raises(ConfigError, match=f"{late}: LoadSampled is step 1 of the pipeline; it must be step 0"):
        load_pipeline(late)


def test_a_site_with_such_a_pipeline_stops_before_reading(photos, tmp_path):
    (tmp_path / "p.toml").write_text('[[transform]]\nname = "FundusFOVCropd"\nkeys = ["image", "label"]\n')
    (tmp_path / "m.toml").write_text(
        f'[dataset]\nname = "clinic"\nkind = "segmentation"\nroot = "{photos.as_posix()}"\n'
        '[dataset.images]\nfolder = "images"\n[[dataset.masks]]\nfolder = "masks"\nname = "{stem}_vessels.png"\n')
    (tmp_path / "site.toml").write_text(
        'name = "clinic"\nmodality = "fundus"\n[data]\nsource = "manifest"\nmanifest = "m.toml"\npipeline = "p.toml"\n'
        '[task]\ntype = "segmentation"\nmode = "binary"\nnum_classes = 1\n[model]\nhead = "segmentation"\n')
    from fedbone_med.data.sources import load_site_data

    with pytest.raises(ConfigError, match="p.toml: the pipeline has no LoadSampled step"):
        load_site_data(load_site(tmp_path / "site.toml"))


def test_every_shipped_pipeline_declares_the_load_steps_and_augment_chains_do_not_load(tmp_path):
    from fedbone_med.data.pipeline import load_augment

    for site in sorted((REPO / "sites").glob("*.toml")):
        cfg = load_site(site)
        if cfg.data.pipeline:
            load_pipeline(cfg.data.pipeline)
        if cfg.data.augment:
            load_augment(cfg.data.augment)
    bad = tmp_path / "aug.toml"
    bad.write_text('[[transform]]\nname = "LoadSampled"\nkeys = ["image"]\n')
    with pytest.raises(ConfigError, match="aug.toml: a data.augment chain runs on loaded images"):
        load_augment(bad)


def test_unknown_names_still_list_the_allowed_ones_and_load_keys_are_checked():
    known = "unknown transform 'LoadImaged'; known: .*EnsureChannelFirstd.*LoadSampled.*RandFlipd"
    with pytest.raises(RegistryError, match=known):
        build_transforms([{"name": "LoadImaged", "keys": ["image"]}])
    with pytest.raises(ConfigError, match="LoadSampled: keys must be"):
        build_transforms([{"name": "LoadSampled", "keys": ["mask"]}])
    with pytest.raises(ConfigError, match="the record names no sample to read"):
        build_transforms(list(LOAD_STEPS)).transforms[0]({"image": np.zeros((3, 8, 8), np.float32)})


def test_load_steps_lay_out_images_and_masks_channel_first(photos):
    from fedbone_med.data.loading import sample_record
    from fedbone_med.data.readers import read_image

    m = _manifest(photos, masks=[{"folder": "masks", "name": "{stem}_vessels.png"},
                                 {"folder": "masks", "name": "{stem}_disc.png"}])
    sample = list_samples(m)[0]
    steps = build_transforms(list(LOAD_STEPS)).transforms
    loaded = steps[0](sample_record(m, sample))
    assert tuple(loaded["image"].shape) == (SIZE, SIZE, 3) and tuple(loaded["label"].shape) == (2, SIZE, SIZE)
    out = steps[1](loaded)
    assert tuple(out["image"].shape) == (3, SIZE, SIZE) and tuple(out["label"].shape) == (2, SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(out["image"])[1], read_image(sample.image)[..., 1])


# --------------------------------------------------------------------------- skip_bad_files at listing time
def _site(base: Path, root: Path, manifest_body: str, task: str) -> Path:
    (base / "m.toml").write_text(f'[dataset]\nname = "clinic"\nroot = "{root.as_posix()}"\n{manifest_body}')
    site = base / "site.toml"
    site.write_text('name = "clinic"\nmodality = "fundus"\n[data]\nsource = "manifest"\nmanifest = "m.toml"\n'
                    f'pipeline = "{(TRANSFORMS / "fundus.toml").as_posix()}"\nimage_size = 32\n{task}')
    return site


SEG_MANIFEST = ('kind = "segmentation"\n[dataset.images]\nfolder = "images"\npattern = "*.png"\n'
                'subject = "P(\\\\d+)_"\n[[dataset.masks]]\nfolder = "masks"\nname = "{stem}_vessels.png"\n'
                '[dataset.split]\nfile = "split.csv"\n')
SEG_TASK = '[task]\ntype = "segmentation"\nmode = "binary"\nnum_classes = 1\n[model]\nhead = "segmentation"\n'


@pytest.fixture()
def clinic(photos, tmp_path) -> tuple[Path, Path]:
    """A copy of the photographs (P00, P01, P02 train; P03 val) and a segmentation site on them."""
    root = tmp_path / "clinic"
    shutil.copytree(photos, root)
    rows = ["image,split"] + [f"P{i:02d}_L.png,{'val' if i == 3 else 'train'}" for i in range(4)]
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    return root, _site(tmp_path, root, SEG_MANIFEST, SEG_TASK)


def _check_data_errors(site: Path) -> list[str]:
    from fedbone_med.data.check import check_site_data

    return check_site_data(load_site(site)).errors


def test_missing_mask_is_skipped_and_counted_under_skip_bad_files(clinic, caplog):
    from fedbone_med.data.sources import load_site_data
    from fedbone_med.site.runtime import SiteRuntime

    root, site = clinic
    (root / "masks" / "P01_L_vessels.png").unlink()
    (error,) = _check_data_errors(site)
    with pytest.raises(DataError) as e:  # off: the run stops with check-data's message
        load_site_data(load_site(site))
    assert str(e.value) == error
    cfg = load_site(site, {"data": {"skip_bad_files": True}})
    with caplog.at_level(logging.WARNING, logger="fedbone_med.data.pipeline"):
        data = load_site_data(cfg)
    assert [r.getMessage() for r in caplog.records] == [f"{error} (left out: data.skip_bad_files)"]
    assert (len(data.train), len(data.val)) == (2, 1)
    assert data.split is not None and data.split["skipped"] == {
        "listing": {"total": 1, "mask missing": 1}, "train": {"total": 0}, "val": {"total": 0}}
    runtime = SiteRuntime(cfg, None, data, seed=0)  # type: ignore[arg-type]  # no transport needed
    assert runtime.skipped_files() == {"skipped_files_listing": 1.0, "skipped_files_train": 0.0,
                                       "skipped_files_val": 0.0}


def test_labels_csv_rows_naming_a_missing_file_or_an_unknown_class_are_skipped(photos, tmp_path, caplog):
    from fedbone_med.data.sources import load_site_data

    rows = ["file,grade,patient"] + [f"images/P{i:02d}_L.png,{'normal' if i % 2 else 'dr'},P{i:02d}" for i in range(4)]
    rows += ["images/P07_L.png,dr,P07",  # no such file
             "images/P02_L.png,mild,P02"]  # not a declared class (and would be a second row for P02_L)
    root = tmp_path / "graded"
    shutil.copytree(photos / "images", root / "images")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "split.csv").write_text("image,split\nP00,train\nP01,train\nP02,val\nP03,val\nP07,train\n")
    site = _site(tmp_path, root, 'kind = "classification"\n[dataset.labels_csv]\nfile = "labels.csv"\n'
                 'image_column = "file"\nlabel_column = "grade"\nsubject_column = "patient"\n'
                 'classes = ["dr", "normal"]\n[dataset.split]\nfile = "split.csv"\n',
                 '[task]\ntype = "classification"\nnum_classes = 2\n')
    errors = _check_data_errors(site)
    assert len(errors) == 2 and "P07_L.png: image missing (named on row 6" in errors[1]
    assert "row 7: label: not one of the declared classes" in errors[0]
    with pytest.raises(DataError) as e:
        load_site_data(load_site(site))
    assert str(e.value) == errors[0]
    with caplog.at_level(logging.WARNING, logger="fedbone_med.data.pipeline"):
        data = load_site_data(load_site(site, {"data": {"skip_bad_files": True}}))
    assert sorted(r.getMessage() for r in caplog.records) == sorted(f"{x} (left out: data.skip_bad_files)"
                                                                    for x in errors)
    assert (len(data.train), len(data.val)) == (2, 2)
    assert data.split is not None and data.split["skipped"]["listing"] == {"total": 2, "image missing": 1, "label": 1}
    assert sorted(data.train.targets.tolist() + data.val.targets.tolist()) == [0, 0, 1, 1]


def test_structural_problems_still_stop_with_the_check_data_message(clinic):
    from fedbone_med.data.sources import load_site_data

    root, site = clinic
    skip = {"data": {"skip_bad_files": True}}
    # a split left empty
    (root / "split.csv").write_text((root / "split.csv").read_text().replace("P03_L.png,val", "P03_L.png,train"))
    (error,) = _check_data_errors(site)
    assert error.startswith("split 'val': no images")
    with pytest.raises(DataError) as e:
        load_site_data(load_site(site, skip))
    assert str(e.value) == error
    # an empty image folder (no samples at all)
    for p in (root / "images").iterdir():
        p.unlink()
    errors = _check_data_errors(site)
    assert "images: image folder: no files matching '*.png' (empty folder?)" in errors[0]
    with pytest.raises(DataError) as e:
        load_site_data(load_site(site, skip))
    assert str(e.value) == errors[0]
    # an unreadable manifest: check-data's message holds the training one, after the file name
    (site.parent / "m.toml").write_text("[dataset\n")
    (error,) = _check_data_errors(site)
    with pytest.raises((ConfigError, DataError)) as e2:
        load_site_data(load_site(site, skip))
    assert error.endswith(f": manifest: {e2.value}")



def test_oct_listing_problems_of_one_volume_or_row_are_skipped(tmp_path):
    """Per-B-scan labels: a row beyond its volume, a volume without rows and a missing label
    volume are left out and counted; the messages are check-data's."""
    root = tmp_path / "oct_edema"
    rows = ["volume,bscan,label"]
    for p in range(4):
        vol = make_oct_volume(950 + p, 3, size=32, label=p % 2)
        write_oct_nifti(vol, root / "volumes" / f"P{p:02d}_L.nii.gz")
        if p != 3:  # P03_L has no rows
            rows += [f"P{p:02d}_L.nii.gz,{k},{'edema' if vol[k].fluid.sum() else 'normal'}" for k in range(3)]
    rows.append("P00_L.nii.gz,9,normal")  # beyond the volume's 3 B-scans
    (root / "bscan_labels.csv").write_text("\n".join(rows) + "\n")
    m = load_manifest(REPO / "pipelines" / "datasets" / "oct_edema_bscans.toml")
    problems: list[str] = []
    list_samples(m, data_root=tmp_path, problems=problems)  # what check-data lists
    assert len(problems) == 2
    with pytest.raises(DataError) as e:
        load_manifest_splits(m, LOAD_STEPS, data_root=tmp_path)
    assert str(e.value) == problems[0]
    skipped: list[tuple[str, str]] = []
    samples = list_samples(m, data_root=tmp_path, skipped=skipped)
    assert [msg for _, msg in skipped] == problems and len(samples) == 9
    train, val, record = load_manifest_splits(m, LOAD_STEPS, data_root=tmp_path, skip_bad=True)
    assert len(train) + len(val) == 9
    assert record["skipped"]["listing"] == {"total": 2, "B-scan index": 1, "labels": 1}
