"""Dataset manifests and pipelines on real files written from phantoms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedbone_med.config import load_site
from fedbone_med.configtools import from_mapping
from fedbone_med.data.manifest import Manifest, list_samples
from fedbone_med.data.phantom_io import write_fundus_png
from fedbone_med.data.phantoms import make_fundus
from fedbone_med.data.sources import load_site_data
from fedbone_med.errors import ConfigError, DataError

# the two steps every data.pipeline file starts with
LOAD_STEPS_TOML = (
    '[[transform]]\nname = "LoadSampled"\nkeys = ["image", "label"]\nallow_missing_keys = true\n\n'
    '[[transform]]\nname = "EnsureChannelFirstd"\nkeys = ["image", "label"]\nallow_missing_keys = true\n\n'
)


@pytest.fixture()
def fundus_folder(tmp_path):
    """10 photographs of 5 patients (left and right eye) with vessel and lesion masks."""
    root = tmp_path / "data" / "clinic"
    for i in range(10):
        subject, eye = i // 2, "LR"[i % 2]
        write_fundus_png(make_fundus(100 + i, 96), root / "images" / f"P{subject:02d}_{eye}.png", root / "masks")
    return tmp_path / "data"


def _manifest(**overrides) -> Manifest:
    data = {
        "name": "clinic",
        "kind": "segmentation",
        "root": "clinic",
        "images": {"folder": "images", "pattern": "*.png", "subject": "P(\\d+)_"},
        "masks": [{"folder": "masks", "name": "{stem}_vessels.png", "kind": "binary"}],
        "split": {"val_fraction": 0.4, "seed": 1},
    }
    data.update(overrides)
    return from_mapping(Manifest, data, where="manifest")


def test_seeded_split_keeps_each_patient_in_one_split(fundus_folder):
    samples = list_samples(_manifest(), data_root=fundus_folder)
    assert len(samples) == 10 and all(len(s.masks) == 1 and s.masks[0].is_file() for s in samples)
    splits = {}
    for s in samples:
        splits.setdefault(s.subject, set()).add(s.split)
    assert all(len(v) == 1 for v in splits.values())
    assert {"train", "val"} == {s.split for s in samples}
    # the same seed gives the same split
    assert [s.split for s in samples] == [s.split for s in list_samples(_manifest(), data_root=fundus_folder)]


def test_split_file_that_separates_the_eyes_of_one_patient_is_refused(fundus_folder):
    rows = ["image,split"] + [f"P{i // 2:02d}_{'LR'[i % 2]}.png,{'train' if i % 2 else 'val'}" for i in range(10)]
    (fundus_folder / "clinic" / "split.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="subject leak: one subject's files are in 2 splits"):
        list_samples(_manifest(split={"file": "split.csv"}), data_root=fundus_folder)
    problems: list[str] = []
    samples = list_samples(_manifest(split={"file": "split.csv"}), data_root=fundus_folder, problems=problems)
    assert len(samples) == 10 and len(problems) == 5, "one problem per leaking subject, all collected"
    assert all(p.startswith("subject leak:") for p in problems)


def test_missing_masks_and_folders_are_named(fundus_folder):
    (fundus_folder / "clinic" / "masks" / "P00_L_vessels.png").unlink()
    with pytest.raises(DataError, match="P00_L_vessels.png: mask missing \\(image P00_L.png\\)"):
        list_samples(_manifest(), data_root=fundus_folder)
    with pytest.raises(DataError, match="folder not found.*FEDBONE_DATA_ROOT"):
        list_samples(_manifest(root="elsewhere"), data_root=fundus_folder)


def test_manifest_site_loads_aligned_tensors_and_records_the_split(fundus_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBONE_DATA_ROOT", str(fundus_folder))
    (tmp_path / "m.toml").write_text(
        '[dataset]\nname = "clinic"\nkind = "segmentation"\nroot = "clinic"\n'
        '[dataset.images]\nfolder = "images"\npattern = "*.png"\nsubject = "P(\\\\d+)_"\n'
        '[[dataset.masks]]\nfolder = "masks"\nname = "{stem}_vessels.png"\nkind = "binary"\n'
        "[dataset.split]\nval_fraction = 0.4\nseed = 1\n"
    )
    crop = '[[transform]]\nname = "FundusFOVCropd"\nkeys = ["image", "label"]\n'
    (tmp_path / "p.toml").write_text(LOAD_STEPS_TOML + crop)
    (tmp_path / "site.toml").write_text(
        'name = "clinic"\nmodality = "fundus"\n[data]\nsource = "manifest"\nmanifest = "m.toml"\n'
        'pipeline = "p.toml"\nimage_size = 64\n[task]\ntype = "segmentation"\nmode = "binary"\nnum_classes = 1\n'
        '[model]\nhead = "segmentation"\n'
    )
    data = load_site_data(load_site(tmp_path / "site.toml"))
    assert data.train.images.shape[1:] == (3, 64, 64) and data.train.targets.shape[1:] == (1, 64, 64)
    assert len(data.train) + len(data.val) == 10
    x, y = data.train.images, data.train.targets
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and set(y.unique().tolist()) <= {0.0, 1.0}
    # alignment: vessel pixels are darker in the green channel than the rest of the retina
    green, vessel = x[:, 1], y[:, 0] > 0
    retina = x.mean(1) > 0.1
    assert float(green[vessel & retina].mean()) < float(green[~vessel & retina].mean()) - 0.02
    record = data.split
    assert record is not None and record["train_subjects"] + record["val_subjects"] == 5
    assert "P00" not in json.dumps(record), "file names must not be written to the run output"


def test_manifest_that_contradicts_the_site_task_is_refused(fundus_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBONE_DATA_ROOT", str(fundus_folder))
    (tmp_path / "m.toml").write_text(
        '[dataset]\nname = "clinic"\nkind = "segmentation"\nroot = "clinic"\n'
        '[dataset.images]\nfolder = "images"\n'
        '[[dataset.masks]]\nfolder = "masks"\nname = "{stem}_vessels.png"\n'
    )
    (tmp_path / "site.toml").write_text(
        'name = "clinic"\nmodality = "fundus"\n[data]\nsource = "manifest"\nmanifest = "m.toml"\n'
        '[task]\ntype = "segmentation"\nmode = "multiclass"\nnum_classes = 3\n[model]\nhead = "segmentation"\n'
    )
    with pytest.raises(ConfigError, match="provides segmentation, num_classes = 1, mode = 'binary'"):
        load_site_data(load_site(tmp_path / "site.toml"))


def test_classification_from_class_folders_and_labels_csv(tmp_path):
    from PIL import Image

    root = tmp_path / "cls"
    rows = ["file,grade,patient"]
    for label in range(3):
        for i in range(4):
            img = (np.random.default_rng(label * 10 + i).random((16, 16, 3)) * 255).astype(np.uint8)
            path = root / str(label) / f"p{i}_{label}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            rows.append(f"{label}/p{i}_{label}.png,{label},p{i}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    by_folder = from_mapping(
        Manifest, {"name": "c", "kind": "classification", "root": "cls", "class_folders": ["0", "1", "2"]}, where="m"
    )
    samples = list_samples(by_folder, data_root=tmp_path)
    assert sorted(s.label for s in samples) == [0] * 4 + [1] * 4 + [2] * 4
    by_csv = from_mapping(
        Manifest,
        {"name": "c", "kind": "classification", "root": "cls",
         "labels_csv": {"file": "labels.csv", "image_column": "file", "label_column": "grade",
                        "subject_column": "patient"}},
        where="m",
    )
    samples = list_samples(by_csv, data_root=tmp_path)
    assert len(samples) == 12 and len({s.subject for s in samples}) == 4
    per_patient = {}
    for s in samples:
        per_patient.setdefault(s.subject, set()).add(s.split)
    assert all(len(v) == 1 for v in per_patient.values())
    bad = from_mapping(
        Manifest,
        {"name": "c", "kind": "classification", "root": "cls",
         "labels_csv": {"file": "labels.csv", "image_column": "path", "label_column": "grade"}},
        where="m",
    )
    with pytest.raises(DataError, match="missing column\\(s\\) \\['path'\\]"):
        list_samples(bad, data_root=tmp_path)


def test_dicom_photographs_load_through_a_manifest(tmp_path):
    from fedbone_med.data.phantom_io import write_fundus_dicom
    from fedbone_med.data.pipeline import read_sample

    ph = make_fundus(5, 64)
    root = tmp_path / "dcm"
    write_fundus_dicom(ph, root / "images" / "P01_L.dcm")
    write_fundus_png(ph, tmp_path / "unused.png", root / "masks")
    (root / "masks" / "unused_vessels.png").rename(root / "masks" / "P01_L_vessels.png")
    m = _manifest(root="dcm", images={"folder": "images", "pattern": "*.dcm", "subject": "P(\\d+)_"},
                  split={"val_fraction": 0.0})
    (sample,) = list_samples(m, data_root=tmp_path)
    d = read_sample(m, sample)
    assert d["image"].shape == (3, 64, 64) and d["label"].shape == (1, 64, 64)
    np.testing.assert_array_equal(d["label"][0], ph.vessels)
    np.testing.assert_allclose(d["image"].transpose(1, 2, 0), np.round(ph.image * 255) / 255, atol=1 / 255 + 1e-6)


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_oct_volumes_expand_to_bscans_with_their_layer_labels(tmp_path, fmt, monkeypatch):
    from fedbone_med.data.phantom_io import to_uint8, write_oct_dicom, write_oct_label_nifti, write_oct_nifti
    from fedbone_med.data.phantoms import make_oct_volume

    root = tmp_path / "oct"
    volumes = {}
    for i in range(4):  # 4 eyes of 2 patients, 3 B-scans each
        vol = make_oct_volume(200 + i, 3, size=48, label=i % 3)
        name = f"S{i // 2}_{'LR'[i % 2]}"
        volumes[name] = vol
        if fmt == "nifti":
            write_oct_nifti(vol, root / "volumes" / f"{name}.nii.gz")
        else:
            write_oct_dicom(vol, root / "volumes" / f"{name}.dcm")
        write_oct_label_nifti(vol, root / "labels" / f"{name}_layers.nii.gz", which="layers")
    pattern = "*.nii.gz" if fmt == "nifti" else "*.dcm"
    manifest = (
        '[dataset]\nname = "oct"\nkind = "segmentation"\nroot = "oct"\n'
        f'[dataset.volumes]\nfolder = "volumes"\npattern = "{pattern}"\nsubject = "S(\\\\d+)_"\naxis = 2\n'
        '[[dataset.masks]]\nfolder = "labels"\nname = "{stem}_layers.nii.gz"\nkind = "index"\n'
        "[dataset.split]\nval_fraction = 0.5\nseed = 0\n"
    )
    (tmp_path / "m.toml").write_text(manifest)
    (tmp_path / "site.toml").write_text(
        'name = "oct"\nmodality = "oct"\n[data]\nsource = "manifest"\nmanifest = "m.toml"\nimage_size = 48\n'
        '[task]\ntype = "segmentation"\nmode = "multiclass"\nnum_classes = 9\n[model]\nhead = "segmentation"\n'
    )
    monkeypatch.setenv("FEDBONE_DATA_ROOT", str(tmp_path))
    data = load_site_data(load_site(tmp_path / "site.toml"))
    assert (len(data.train), len(data.val)) == (6, 6), "whole patients (2 eyes x 3 B-scans) per split"
    assert data.train.images.shape[1:] == (1, 48, 48) and data.train.targets.shape[1:] == (48, 48)
    assert data.split["train_subjects"] == 1 and data.split["val_subjects"] == 1
    # every B-scan's label is its phantom's layer map (the pipeline keeps B-scans in volume order)
    all_layers = {tuple(ph.layers.flatten().tolist()) for vol in volumes.values() for ph in vol}
    for y in torch.cat([data.train.targets, data.val.targets]):
        assert tuple(y.flatten().tolist()) in all_layers
    if fmt == "dicom":  # exact 8-bit pixels from DICOM
        first = sorted(volumes)[0]
        assert any(np.allclose(x[0].numpy(), to_uint8(volumes[first][0].image) / 255, atol=1e-6)
                   for x in torch.cat([data.train.images, data.val.images]))


# --------------------------------------------------------------------------- per-B-scan labels of OCT volumes
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
BSCAN_MANIFEST = REPO / "pipelines" / "datasets" / "oct_edema_bscans.toml"


def _write_bscan_set(root, n_patients: int = 4, n_bscans: int = 4, size: int = 32) -> dict:
    """NIfTI volumes P01_L.nii.gz ... and bscan_labels.csv grading B-scans 0, 2, 3 of each
    (B-scan 1 is left ungraded); a B-scan is 'edema' iff its phantom shows at least 20 pixels of
    intraretinal fluid, so that oedema volumes hold B-scans of both classes.
    Returns {(volume name, B-scan index): class id}."""
    from fedbone_med.data.phantom_io import write_oct_nifti
    from fedbone_med.data.phantoms import make_oct_volume

    rows, truth = ["volume,bscan,label"], {}
    for p in range(n_patients):
        for e, eye in enumerate("LR"):
            name = f"P{p + 1:02d}_{eye}.nii.gz"
            vol = make_oct_volume(300 + 2 * p + e, n_bscans, size=size, label=(p + e) % 2)
            write_oct_nifti(vol, root / "volumes" / name)
            for k in (0, 2, 3):
                truth[(name, k)] = int(vol[k].fluid.sum() >= 20)
                rows.append(f"{name},{k},{'edema' if truth[(name, k)] else 'normal'}")
    (root / "bscan_labels.csv").write_text("\n".join(rows) + "\n")
    return truth


def test_per_bscan_labels_from_nifti_volumes_load_aligned(tmp_path, monkeypatch):
    """The example manifest on phantom volumes: each loaded B-scan carries its own CSV label."""
    from fedbone_med.data.readers import read_nifti

    truth = _write_bscan_set(tmp_path / "oct_edema")
    assert set(truth.values()) == {0, 1}, "the phantom set has both classes"
    mixed = [v for v in {n for n, _ in truth} if len({truth[(v, k)] for k in (0, 2, 3)}) > 1]
    assert mixed, "some volume has B-scans of both classes, so a per-volume label would fail this test"
    monkeypatch.setenv("FEDBONE_DATA_ROOT", str(tmp_path / "nowhere"))  # the data_root argument wins
    (tmp_path / "site.toml").write_text(
        f'name = "oct-edema"\nmodality = "oct"\n[data]\nsource = "manifest"\nmanifest = "{BSCAN_MANIFEST.as_posix()}"\n'
        'image_size = 32\n[task]\ntype = "classification"\nnum_classes = 2\n[model]\nhead = "classification"\n'
    )
    data = load_site_data(load_site(tmp_path / "site.toml"), data_root=tmp_path)
    assert (len(data.train), len(data.val)) == (18, 6), "3 graded B-scans x 2 eyes; 1 of 4 patients held out"
    assert data.train.images.shape[1:] == (1, 32, 32) and data.split["val_subjects"] == 1
    # find each loaded B-scan in the volumes and check it carries that B-scan's label
    scans = {(name, k): read_nifti(tmp_path / "oct_edema" / "volumes" / name)[k] for name, k in truth}
    for images, targets in ((data.train.images, data.train.targets), (data.val.images, data.val.targets)):
        for x, y in zip(images, targets, strict=True):
            (key,) = [key for key, scan in scans.items() if np.allclose(x[0].numpy(), scan, atol=1e-5)]
            assert int(y) == truth[key], key
    assert sorted(torch.cat([data.train.targets, data.val.targets]).tolist()) == sorted(truth.values())


def test_per_bscan_label_problems_are_collected_or_raised(tmp_path):
    from fedbone_med.data.pipeline import load_manifest

    root = tmp_path / "oct_edema"
    _write_bscan_set(root, n_patients=2)
    csv_path = root / "bscan_labels.csv"
    lines = csv_path.read_text().splitlines()
    lines[1] = lines[1].replace("normal", "oedema?").replace("edema,", "oedema?,")  # unknown class
    lines += ["P01_L.nii.gz,7,normal",  # beyond the volume's 4 B-scans
              "P01_L.nii.gz,2,edema",  # the same B-scan twice
              "P09_L.nii.gz,0,normal",  # no such volume
              "P02_R.nii.gz,x,normal"]  # not an index
    csv_path.write_text("\n".join(line for line in lines if not line.startswith("P02_L")) + "\n")  # P02_L unlabelled
    m = load_manifest(BSCAN_MANIFEST)
    problems: list[str] = []
    samples = list_samples(m, data_root=tmp_path, problems=problems)
    checks = ["row 2: label: not one of the declared classes", "row 11: B-scan index: outside the volume's 4",
              "row 12: labels: the same B-scan is already labelled on row 3", "row 13: volume missing",
              "row 14: B-scan index: not a non-negative integer", "P02_L.nii.gz: labels: the volume has no row"]
    for check in checks:
        assert sum(check in p for p in problems) == 1, (check, problems)
    assert len(problems) == len(checks)
    assert len(samples) == 3 * 3 - 1, "the good rows of the three labelled volumes are still listed"
    assert all("oedema" not in p for p in problems), "label values are not echoed"
    with pytest.raises(DataError) as e:  # training stops at the first, with the same message
        list_samples(m, data_root=tmp_path)
    assert str(e.value) == problems[0]


def test_bscan_column_needs_volumes():
    with pytest.raises(ConfigError, match="bscan_column labels B-scans of OCT volumes"):
        from_mapping(Manifest, {"name": "c", "kind": "classification", "root": "r",
                                "labels_csv": {"file": "l.csv", "image_column": "f", "label_column": "y",
                                               "bscan_column": "b"}}, where="m")


def test_named_classes_must_match_the_site_task(tmp_path, monkeypatch):
    _write_bscan_set(tmp_path / "oct_edema", n_patients=2)
    monkeypatch.setenv("FEDBONE_DATA_ROOT", str(tmp_path))
    (tmp_path / "site.toml").write_text(
        f'name = "oct-edema"\nmodality = "oct"\n[data]\nsource = "manifest"\nmanifest = "{BSCAN_MANIFEST.as_posix()}"\n'
        'image_size = 32\n[task]\ntype = "classification"\nnum_classes = 3\n[model]\nhead = "classification"\n'
    )
    with pytest.raises(ConfigError, match="provides classification, num_classes = 2; the \\[task\\] table says"):
        load_site_data(load_site(tmp_path / "site.toml"))


def test_a_volume_whose_rows_name_different_subjects_is_that_volumes_problem(tmp_path):
    """Reported per volume with its check: check-data lists it, skip_bad_files leaves only that volume
    out, and training without skipping stops at it."""
    root = tmp_path / "oct_edema"
    _write_bscan_set(root, n_patients=2)
    csv_path = root / "bscan_labels.csv"
    header, *rows = csv_path.read_text().splitlines()
    out = [header + ",patient"]
    for row in rows:
        volume = row.split(",")[0]
        patient = volume.split("_")[0]
        if row.startswith("P01_R.nii.gz,2,"):
            patient = "P02"  # one of P01_R's rows names another patient
        out.append(f"{row},{patient}")
    csv_path.write_text("\n".join(out) + "\n")
    text = BSCAN_MANIFEST.read_text().replace('classes = ["normal", "edema"]',
                                              'classes = ["normal", "edema"]\nsubject_column = "patient"')
    manifest_path = tmp_path / "bscans.toml"
    manifest_path.write_text(text)
    from fedbone_med.data.pipeline import load_manifest

    m = load_manifest(manifest_path)
    problems: list[str] = []
    list_samples(m, data_root=tmp_path, problems=problems)
    assert len(problems) == 1 and "subject: one volume's rows name different subjects (P01_R.nii.gz)" in problems[0]
    skipped: list[tuple[str, str]] = []
    samples = list_samples(m, data_root=tmp_path, skipped=skipped)
    assert [c for c, _ in skipped] == ["subject"]
    assert {s.image.name for s in samples} == {"P01_L.nii.gz", "P02_L.nii.gz", "P02_R.nii.gz"}
    with pytest.raises(DataError, match="different subjects"):
        list_samples(m, data_root=tmp_path)
