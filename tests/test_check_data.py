"""``fedbone-site check-data``: every problem in a site's data, found in one run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedbone_med.cli.site import main
from fedbone_med.data.manifest import DATA_ROOT_ENV, default_data_root
from fedbone_med.data.phantom_io import write_fundus_png
from fedbone_med.data.phantoms import make_fundus
from fedbone_med.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SIZE = 48


def _write_site(base: Path, root: Path, kind: str) -> Path:
    """A site file plus manifest on the dataset at ``root``: 'vessels' (binary) or 'lesions' (index)."""
    mask = (
        'folder = "masks"\nname = "{stem}_vessels.png"\nkind = "binary"\n'
        if kind == "vessels"
        else 'folder = "masks"\nname = "{stem}_lesions.png"\nkind = "index"\n'
    )
    task = 'mode = "binary"\nnum_classes = 1\n' if kind == "vessels" else 'mode = "multiclass"\nnum_classes = 5\n'
    (base / f"m_{kind}.toml").write_text(
        f'[dataset]\nname = "clinic"\nkind = "segmentation"\nroot = "{root.as_posix()}"\n'
        '[dataset.images]\nfolder = "images"\npattern = "*.png"\nsubject = "P(\\\\d+)_"\n'
        f"[[dataset.masks]]\n{mask}"
        '[dataset.split]\nfile = "split.csv"\n'
    )
    site = base / f"site_{kind}.toml"
    site.write_text(
        f'name = "clinic-{kind}"\nmodality = "fundus"\n[data]\nsource = "manifest"\nmanifest = "m_{kind}.toml"\n'
        f'image_size = 32\n[task]\ntype = "segmentation"\n{task}[model]\nhead = "segmentation"\n'
    )
    return site


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """6 photographs of 3 patients (P00, P01 train; P02 val) with vessel and lesion masks."""
    base = tmp_path_factory.mktemp("clean")
    root = base / "clinic"
    rows = ["image,split"]
    for i in range(6):
        subject, eye = i // 2, "LR"[i % 2]
        name = f"P{subject:02d}_{eye}.png"
        write_fundus_png(make_fundus(200 + i, SIZE), root / "images" / name, root / "masks")
        rows.append(f"{name},{'val' if subject == 2 else 'train'}")
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture()
def copy(clean, tmp_path):
    """A fresh copy of the clean dataset and its two site files: (root, vessels site, lesions site)."""
    root = tmp_path / "clinic"
    shutil.copytree(clean, root)
    return root, _write_site(tmp_path, root, "vessels"), _write_site(tmp_path, root, "lesions")


def _run(capsys, site: Path, *extra: str) -> tuple[int, str, str]:
    rc = main(["check-data", "--config", str(site), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _errors(out: str) -> list[str]:
    """The lines of the ERRORS listing."""
    lines = out.splitlines()
    if not any(x.startswith("ERRORS (") for x in lines):
        return []
    start = next(i for i, x in enumerate(lines) if x.startswith("ERRORS ("))
    block: list[str] = []
    for x in lines[start + 1 :]:
        if x.startswith("      ") and block:  # a continuation line of the item above
            block[-1] += "\n" + x
        elif x.startswith("  - "):
            block.append(x)
        else:
            break
    return block


def test_clean_dataset_passes_with_counts(copy, capsys, tmp_path):
    _, vessels, lesions = copy
    report = tmp_path / "report.json"
    rc, out, err = _run(capsys, vessels, "--json", str(report))
    assert rc == 0, out + err
    assert "errors: none" in out and "warnings: none" in out and "result: OK" in out
    assert "split 'train': 4 images, 2 subjects" in out and "split 'val': 2 images, 1 subjects" in out
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["errors"] == [] and data["warnings"] == []
    train = data["stats"]["splits"]["train"]
    assert train["images"] == 4 and train["subjects"] == 2 and train["empty_masks"] == 0
    assert abs(sum(train["class_pixel_fraction"].values()) - 1) < 1e-4 and train["class_pixel_fraction"]["1"] > 0
    assert data["stats"]["files_checked"] == 12

    rc, out, err = _run(capsys, lesions)
    assert rc == 0, out + err
    assert "class pixel fractions: 0:" in out


def test_missing_mask(copy, capsys):
    root, vessels, _ = copy
    (root / "masks" / "P01_L_vessels.png").unlink()
    rc, out, err = _run(capsys, vessels)
    assert rc == DataError.exit_code
    errors = _errors(out)
    assert len(errors) == 1 and "P01_L_vessels.png: mask missing" in errors[0]
    assert "check-data found 1 error(s)" in err and "listing" in err


def test_corrupt_image(copy, capsys):
    root, vessels, _ = copy
    img = root / "images" / "P00_R.png"
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    rc, out, _ = _run(capsys, vessels)
    assert rc == 3
    errors = _errors(out)
    assert len(errors) == 1 and "P00_R.png: image read:" in errors[0] and "unreadable image" in errors[0]


def test_mask_of_the_wrong_size(copy, capsys):
    root, vessels, _ = copy
    Image.fromarray(np.zeros((20, 30), bool)).save(root / "masks" / "P02_L_vessels.png")
    rc, out, _ = _run(capsys, vessels)
    assert rc == 3
    errors = _errors(out)
    assert len(errors) == 1 and "P02_L_vessels.png: mask size: mask is 30x20 pixels" in errors[0]


def test_non_binary_binary_mask(copy, capsys):
    root, vessels, _ = copy
    grey = np.zeros((SIZE, SIZE), np.uint8)
    grey[:10], grey[10:20] = 100, 255
    Image.fromarray(grey).save(root / "masks" / "P00_L_vessels.png")
    rc, out, _ = _run(capsys, vessels)
    assert rc == 3
    errors = _errors(out)
    assert len(errors) == 1 and "P00_L_vessels.png: binary mask: holds 3 distinct values" in errors[0]
    assert "100" not in errors[0], "no pixel values in messages"


def test_class_id_out_of_range_in_index_mask(copy, capsys):
    root, _, lesions = copy
    ids = np.zeros((SIZE, SIZE), np.uint8)
    ids[5:8, 5:9] = 7
    Image.fromarray(ids).save(root / "masks" / "P01_R_lesions.png")
    rc, out, _ = _run(capsys, lesions)
    assert rc == 3
    errors = _errors(out)
    assert len(errors) == 1 and "P01_R_lesions.png: class range: 12 pixel(s) have class ids outside 0..4" in errors[0]


def test_duplicate_image_across_splits(copy, capsys):
    root, vessels, _ = copy
    shutil.copyfile(root / "images" / "P00_L.png", root / "images" / "P02_R.png")  # train copy lands in val
    rc, out, _ = _run(capsys, vessels)
    assert rc == 3
    errors = _errors(out)
    assert len(errors) == 1 and "duplicate images across splits" in errors[0]
    assert "P00_L.png (train)" in errors[0] and "P02_R.png (val)" in errors[0]


def test_duplicate_within_a_split_and_blank_image_are_warnings(copy, capsys, tmp_path):
    root, vessels, _ = copy
    Image.fromarray(np.full((SIZE, SIZE, 3), 40, np.uint8)).save(root / "images" / "P01_R.png")
    shutil.copyfile(root / "images" / "P00_L.png", root / "images" / "P00_R.png")
    report = tmp_path / "r.json"
    rc, out, err = _run(capsys, vessels, "--json", str(report))
    assert rc == 0, out + err
    assert "errors: none" in out and "WARNINGS (2):" in out
    assert "P01_R.png: blank image" in out and "duplicate images (identical pixels)" in out
    data = json.loads(report.read_text())
    assert data["stats"]["splits"]["train"]["blank_images"] == 1 and len(data["warnings"]) == 2


def test_empty_mask_is_a_warning_counted_per_split(copy, capsys, tmp_path):
    root, vessels, _ = copy
    Image.fromarray(np.zeros((SIZE, SIZE), bool)).save(root / "masks" / "P02_R_vessels.png")
    report = tmp_path / "r.json"
    rc, out, _ = _run(capsys, vessels, "--json", str(report))
    assert rc == 0 and "P02_R_vessels.png: empty mask" in out
    splits = json.loads(report.read_text())["stats"]["splits"]
    assert splits["val"]["empty_masks"] == 1 and splits["train"]["empty_masks"] == 0


def test_every_problem_is_reported_in_one_run(copy, capsys, tmp_path):
    root, vessels, _ = copy
    (root / "masks" / "P01_L_vessels.png").unlink()  # missing mask
    img = root / "images" / "P00_R.png"
    img.write_bytes(img.read_bytes()[:200])  # corrupt image
    Image.fromarray(np.zeros((20, 30), bool)).save(root / "masks" / "P02_L_vessels.png")  # wrong size
    grey = np.zeros((SIZE, SIZE), np.uint8)
    grey[:10], grey[10:20] = 100, 255
    Image.fromarray(grey).save(root / "masks" / "P00_L_vessels.png")  # not binary
    shutil.copyfile(root / "images" / "P01_R.png", root / "images" / "P02_R.png")  # leak train -> val
    # subject leak: P01_R goes to val while P01_L stays in train
    split = root / "split.csv"
    split.write_text(split.read_text().replace("P01_R.png,train", "P01_R.png,val"))
    report = tmp_path / "all.json"
    rc, out, err = _run(capsys, vessels, "--json", str(report))
    assert rc == 3
    errors = _errors(out)
    checks = ["mask missing", "image read:", "mask size:", "binary mask:", "subject leak:"]
    for check in checks:
        assert sum(check in e for e in errors) == 1, (check, out)
    assert out.index("ERRORS (") < out.index("split 'train'"), "problems come first"
    data = json.loads(report.read_text())
    assert len(data["errors"]) == len(errors) == 5 and f"found {len(errors)} error(s)" in err
    assert str(report) in err


def test_task_that_does_not_fit_is_an_error_alongside_file_checks(copy, capsys):
    root, vessels, _ = copy
    vessels.write_text(vessels.read_text().replace('mode = "binary"\nnum_classes = 1', 'mode = "multiclass"\n'
                                                                                       "num_classes = 3"))
    (root / "masks" / "P01_L_vessels.png").unlink()
    rc, out, _ = _run(capsys, vessels)
    assert rc == 3
    errors = _errors(out)
    assert len(errors) == 2 and any("task fit:" in e for e in errors) and any("mask missing" in e for e in errors)


def test_pipeline_files_training_would_refuse_are_errors_alongside_file_checks(copy, capsys):
    root, vessels, _ = copy
    base = vessels.parent
    (base / "no_load.toml").write_text('[[transform]]\nname = "FundusFOVCropd"\nkeys = ["image", "label"]\n')
    (base / "bad_augment.toml").write_text('[[transform]]\nname = "RandFlipd"\nkeys = ["image"]\nprob = 0.5\n'
                                           '[[transform]]\nname = "NoSuchTransform"\nkeys = ["image"]\n')
    vessels.write_text(vessels.read_text().replace("image_size = 32\n", 'image_size = 32\npipeline = "no_load.toml"\n'
                                                                       'augment = "bad_augment.toml"\n'))
    (root / "masks" / "P01_L_vessels.png").unlink()
    rc, out, _ = _run(capsys, vessels)
    assert rc == 3
    errors = _errors(out)
    errors = [e.removeprefix("  - ") for e in errors]
    assert any(e.startswith("data.pipeline:") and "no LoadSampled step" in e for e in errors), errors
    assert any(e.startswith("data.augment:") and "NoSuchTransform" in e for e in errors), errors
    assert any("mask missing" in e for e in errors)  # the data is still checked
    # the TOML to paste keeps its lines, indented under the error
    assert '\n      [[transform]]\n      name = "LoadSampled"\n' in out, out  # no blank lines inside an item


def test_phantom_site_reports_task_and_counts(capsys):
    rc, out, _ = _run(capsys, REPO / "sites" / "phantom-vessels.toml")
    assert rc == 0 and "phantom task 'vessels'" in out and "split 'train': 256 images" in out


def test_real_chase_db1_checks_clean(capsys, monkeypatch, tmp_path):
    """Real data from the default data root; fails (does not skip) if the data is missing."""
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    assert (default_data_root() / "chase_db1").is_dir(), f"CHASE_DB1 missing under {default_data_root()}"
    report = tmp_path / "chase.json"
    rc, out, err = _run(capsys, REPO / "sites" / "chase-db1-vessels.toml", "--json", str(report))
    assert rc == 0, out + err
    assert "errors: none" in out
    splits = json.loads(report.read_text())["stats"]["splits"]
    assert {k: (v["images"], v["subjects"]) for k, v in splits.items()} == {"train": (14, 7), "val": (14, 7)}


def test_npz_keys_shapes_dtypes_and_label_range(tmp_path, capsys):
    root = tmp_path / "arrays"
    root.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (8, 12, 12, 3), dtype=np.uint8)
    val = train[:2].copy()  # leaks train -> val
    np.savez(root / "d.npz", train_images=train, train_labels=np.array([0, 1, 2, 3, 4, 0, 1, 9])[:, None],
             val_images=val, val_labels=np.zeros(2, np.int64), bad_images=rng.random((2, 12, 12)) * 3)
    (tmp_path / "m.toml").write_text(
        f'[dataset]\nname = "arrays"\nkind = "classification"\nroot = "{root.as_posix()}"\n[dataset.npz]\n'
        'file = "d.npz"\nsplits = { train = ["train_images", "train_labels"], val = ["val_images", "val_labels"], '
        'test = ["test_images", "test_labels"], bad = ["bad_images", "val_labels"] }\n'
    )
    site = tmp_path / "site.toml"
    site.write_text('name = "arrays"\nmodality = "fundus"\n[data]\nsource = "manifest"\nmanifest = "m.toml"\n'
                    '[task]\ntype = "classification"\nnum_classes = 5\n')
    rc, out, _ = _run(capsys, site)
    assert rc == 3
    errors = _errors(out)
    for check in ["npz keys: ['test_images', 'test_labels']", "label range: 1 label(s) outside 0..4",
                  "value range:", "duplicate images across splits"]:
        assert sum(check in e for e in errors) == 1, (check, out)
    assert len(errors) == 4 and "split 'train': 8 images" in out


# --------------------------------------------------------------------------- OCT volumes
PATIENT_ID = "SECRET-ID-4711"
BSCAN_MANIFEST = REPO / "pipelines" / "datasets" / "oct_edema_bscans.toml"


def _oct_layers_site(base: Path, root: Path, fmt: str) -> Path:
    """4 eyes of 2 patients as OCT volumes (NIfTI or DICOM OPT) with NIfTI layer label volumes."""
    from fedbone_med.data.phantom_io import write_oct_dicom, write_oct_label_nifti, write_oct_nifti
    from fedbone_med.data.phantoms import make_oct_volume

    ext = "nii.gz" if fmt == "nifti" else "dcm"
    rows = ["image,split"]
    for i in range(4):
        name = f"S{i // 2}_{'LR'[i % 2]}"
        vol = make_oct_volume(400 + i, 3, size=32, label=i % 3)
        if fmt == "nifti":
            write_oct_nifti(vol, root / "volumes" / f"{name}.{ext}")
        else:
            write_oct_dicom(vol, root / "volumes" / f"{name}.{ext}", patient_id=PATIENT_ID)
        write_oct_label_nifti(vol, root / "labels" / f"{name}_layers.nii.gz")
        rows.append(f"{name}.{ext},{'val' if i // 2 else 'train'}")
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    (base / "m.toml").write_text(
        f'[dataset]\nname = "oct"\nkind = "segmentation"\nroot = "{root.name}"\n'
        f'[dataset.volumes]\nfolder = "volumes"\npattern = "*.{ext}"\nsubject = "S(\\\\d+)_"\n'
        '[[dataset.masks]]\nfolder = "labels"\nname = "{stem}_layers.nii.gz"\nkind = "index"\n'
        '[dataset.split]\nfile = "split.csv"\n'
    )
    site = base / "site.toml"
    site.write_text(
        'name = "oct-layers"\nmodality = "oct"\n[data]\nsource = "manifest"\nmanifest = "m.toml"\nimage_size = 32\n'
        '[task]\ntype = "segmentation"\nmode = "multiclass"\nnum_classes = 9\n[model]\nhead = "segmentation"\n'
    )
    return site


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_oct_volume_segmentation_clean_with_data_root(tmp_path, capsys, monkeypatch, fmt):
    site = _oct_layers_site(tmp_path, tmp_path / "data" / "oct", fmt)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "nowhere"))
    rc, out, _ = _run(capsys, site)
    assert rc == 3 and "data root:" in out and "folder not found" in out
    report = tmp_path / "r.json"
    rc, out, err = _run(capsys, site, "--data-root", str(tmp_path / "data"), "--json", str(report))
    assert rc == 0, out + err
    assert "split 'train': 6 B-scans in 2 volumes, 1 subjects" in out and "class pixel fractions: 0:" in out
    stats = json.loads(report.read_text())["stats"]
    assert stats["files_checked"] == 8 and stats["splits"]["val"]["volumes"] == 2
    assert stats["image_sizes"]["median"] == [32, 32]
    assert sum(stats["splits"]["train"]["class_pixel_fraction"].values()) == pytest.approx(1, abs=1e-4)


def test_oct_volume_problems_all_reported_without_patient_data(tmp_path, capsys):
    import nibabel as nib
    import pydicom

    from fedbone_med.data.phantom_io import write_oct_label_nifti
    from fedbone_med.data.phantoms import make_oct_volume

    root = tmp_path / "data" / "oct"
    site = _oct_layers_site(tmp_path, root, "dicom")
    (root / "labels" / "S0_L_layers.nii.gz").unlink()  # missing label volume
    write_oct_label_nifti(make_oct_volume(9, 2, size=32), root / "labels" / "S0_R_layers.nii.gz")  # 2 B-scans, not 3
    lab = root / "labels" / "S1_L_layers.nii.gz"
    img = nib.load(lab)
    arr = np.asarray(img.dataobj).copy()
    arr[:2, :3, 0] = 12  # 6 voxels beyond the 9 classes
    nib.save(nib.Nifti1Image(arr, img.affine), lab)
    ds = pydicom.dcmread(root / "volumes" / "S1_R.dcm")
    del ds.PixelData  # a DICOM without pixel data
    ds.save_as(root / "volumes" / "S1_R.dcm")
    write_oct_label_nifti(make_oct_volume(9, 3, size=32), root / "labels" / "S7_X_layers.nii.gz")  # orphan
    rc, out, err = _run(capsys, site, "--data-root", str(tmp_path / "data"))
    assert rc == 3
    errors = _errors(out)
    checks = ["S0_L_layers.nii.gz: label volume missing (volume S0_L.dcm)",
              "S0_R_layers.nii.gz: label volume shape: 2x32x32 (B-scans x rows x columns) differs from its "
              "volume's 3x32x32",
              "S1_L_layers.nii.gz: class range: 6 voxel(s) have class ids outside 0..8",
              "S1_R.dcm: volume read: DICOM file has no pixel data"]
    for check in checks:
        assert sum(check in e for e in errors) == 1, (check, out)
    assert len(errors) == len(checks), out
    assert "S7_X_layers.nii.gz: orphan mask" in out
    assert PATIENT_ID not in out + err and "PHANTOM^" not in out + err and "20000101" not in out + err


def test_nifti_with_wrong_dimensions_and_truncated_volume(tmp_path, capsys):
    import nibabel as nib

    root = tmp_path / "data" / "oct"
    site = _oct_layers_site(tmp_path, root, "nifti")
    four_d = np.zeros((32, 32, 3, 2), np.uint8)
    nib.save(nib.Nifti1Image(four_d, np.eye(4)), root / "volumes" / "S0_L.nii.gz")
    v = root / "volumes" / "S1_R.nii.gz"
    v.write_bytes(v.read_bytes()[:-400])  # header intact, voxel data cut short
    rc, out, _ = _run(capsys, site, "--data-root", str(tmp_path / "data"))
    assert rc == 3
    errors = _errors(out)
    assert sum("S0_L.nii.gz: volume read: expected a 3-D volume with B-scans along axis 2, got 4 dimension(s)" in e
               for e in errors) == 1, out
    assert sum("S1_R.nii.gz: volume read: unreadable NIfTI file" in e for e in errors) == 1, out
    assert len(errors) == 2, out


def _bscan_site(tmp_path: Path) -> tuple[Path, Path]:
    """The repo's per-B-scan oedema manifest on phantom NIfTI volumes written here."""
    from fedbone_med.data.phantom_io import write_oct_nifti
    from fedbone_med.data.phantoms import make_oct_volume

    root = tmp_path / "data" / "oct_edema"
    rows = ["volume,bscan,label"]
    for p in range(4):
        for eye in "LR":
            vol = make_oct_volume(500 + 2 * p + (eye == "R"), 3, size=32, label=p % 2)
            write_oct_nifti(vol, root / "volumes" / f"P{p}_{eye}.nii.gz")
            rows += [f"P{p}_{eye}.nii.gz,{k},{'edema' if vol[k].fluid.any() else 'normal'}" for k in range(3)]
    (root / "bscan_labels.csv").write_text("\n".join(rows) + "\n")
    site = tmp_path / "site.toml"
    site.write_text(
        f'name = "oct-edema"\nmodality = "oct"\n[data]\nsource = "manifest"\nmanifest = "{BSCAN_MANIFEST.as_posix()}"\n'
        '[task]\ntype = "classification"\nnum_classes = 2\n[model]\nhead = "classification"\n'
    )
    return root, site


def test_per_bscan_labels_clean_and_every_problem(tmp_path, capsys):
    root, site = _bscan_site(tmp_path)
    report = tmp_path / "r.json"
    rc, out, err = _run(capsys, site, "--data-root", str(tmp_path / "data"), "--json", str(report))
    assert rc == 0, out + err
    splits = json.loads(report.read_text())["stats"]["splits"]
    assert splits["train"]["images"] + splits["val"]["images"] == 24 and splits["val"]["subjects"] == 1
    assert splits["train"]["labels"]["0"] > 0 and splits["train"]["labels"]["1"] > 0

    csv_path = root / "bscan_labels.csv"
    text = csv_path.read_text().replace("P0_L.nii.gz,1,normal", "P0_L.nii.gz,1,cyst")  # unknown class (row 3)
    text = "\n".join(x for x in text.splitlines() if not x.startswith("P3_R")) + "\n"  # P3_R unlabelled
    csv_path.write_text(text + "P0_R.nii.gz,5,normal\n")  # B-scan 5 of 3
    shutil.copyfile(root / "volumes" / "P0_L.nii.gz", root / "volumes" / "P2_L.nii.gz")  # leaks into val
    csv_path.write_text(csv_path.read_text().replace("P2_L.nii.gz,0,normal", "P2_L.nii.gz,0,edema")
                        .replace("P2_L.nii.gz,1,normal", "P2_L.nii.gz,1,edema")
                        .replace("P2_L.nii.gz,2,normal", "P2_L.nii.gz,2,edema"))
    rc, out, _ = _run(capsys, site, "--data-root", str(tmp_path / "data"))
    assert rc == 3
    errors = _errors(out)
    checks = ["row 3: label: not one of the declared classes", "B-scan index: outside the volume's 3 B-scan(s)",
              "P3_R.nii.gz: labels: the volume has no row", "duplicate images across splits"]
    for check in checks:
        assert sum(check in e for e in errors) == 1, (check, out)
    assert len(errors) == len(checks), out
    assert "cyst" not in out, "label values are not echoed"


# --------------------------------------------------------------------------- labels CSV, class folders, colour masks
def _classification_site(base: Path, manifest_body: str, num_classes: int = 3) -> Path:
    (base / "mc.toml").write_text(f'[dataset]\nname = "graded"\nkind = "classification"\n{manifest_body}')
    site = base / "site_cls.toml"
    site.write_text('name = "graded"\nmodality = "fundus"\n[data]\nsource = "manifest"\nmanifest = "mc.toml"\n'
                    f'[task]\ntype = "classification"\nnum_classes = {num_classes}\n')
    return site


def test_labels_csv_problems_are_all_listed(copy, capsys, tmp_path):
    root, _, _ = copy
    rows = ["file,grade,patient", "images/P00_L.png,0,P00", "images/P00_R.png,1,P00", "images/P01_L.png,2,P01",
            "images/P01_R.png,7,P01",  # outside the 3 classes
            "images/P02_L.png,two,P02",  # not an integer
            "images/P02_R.png,1,P02", "images/P03_L.png,1,P03",  # no such file
            "images/P00_L.png,0,P00"]  # listed twice
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    site = _classification_site(tmp_path, f'root = "{root.as_posix()}"\n[dataset.labels_csv]\nfile = "labels.csv"\n'
                                'image_column = "file"\nlabel_column = "grade"\nsubject_column = "patient"\n'
                                "[dataset.split]\nval_fraction = 0.3\nseed = 0\n")
    rc, out, _ = _run(capsys, site)
    assert rc == 3
    errors = _errors(out)
    checks = ["P01_R.png: label range: label outside 0..2", "row 6: label: not an integer class id",
              "P03_L.png: image missing (named on row 8 of labels.csv)",
              "row 9: labels: the same image is already labelled on row 2"]
    for check in checks:
        assert sum(check in e for e in errors) == 1, (check, out)
    assert len(errors) == len(checks), out
    assert "labels: 0: " in out


def test_class_folders_empty_folder_and_corrupt_jpeg(tmp_path, capsys):
    root = tmp_path / "graded"
    for label in ("0", "1"):
        for i in range(3):
            p = root / label / f"P{i}{label}_a.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(make_fundus(10 * i + int(label), SIZE).image * 255, np.uint8)).save(p)
    (root / "2").mkdir()  # an empty class folder
    jpg = root / "1" / "P11_a.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])  # truncated JPEG
    site = _classification_site(tmp_path, f'root = "{root.as_posix()}"\nclass_folders = ["0", "1", "2"]\n'
                                '[dataset.images]\nfolder = "."\npattern = "*.jpg"\nsubject = "P(\\\\d)"\n'
                                "[dataset.split]\nval_fraction = 0.34\nseed = 0\n")
    rc, out, _ = _run(capsys, site)
    assert rc == 3
    errors = _errors(out)
    assert sum("graded/2: class 2 folder: no files matching '*.jpg' (empty folder?)" in e for e in errors) == 1, out
    assert sum("P11_a.jpg: image read: unreadable image" in e for e in errors) == 1, out
    assert len(errors) == 2, out


def test_colour_mask_off_palette_orphan_mask_and_size_outlier(copy, capsys, tmp_path):
    root, _, _ = copy
    for i in range(6):
        name = f"P{i // 2:02d}_{'LR'[i % 2]}"
        vessels = np.asarray(Image.open(root / "masks" / f"{name}_vessels.png"), bool)
        rgb = np.zeros((*vessels.shape, 3), np.uint8)
        rgb[vessels] = (255, 0, 0)
        if i == 3:
            rgb[:7, :1] = (0, 200, 0)  # 7 off-palette pixels
        Image.fromarray(rgb).save(root / "masks" / f"{name}_colour.png")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "masks" / "P99_X_colour.png")  # no image
    big = np.asarray(Image.open(root / "images" / "P02_R.png").resize((SIZE * 3, SIZE * 3)))
    Image.fromarray(big).save(root / "images" / "P02_R.png")  # three times the others' size ...
    Image.fromarray(np.zeros((SIZE * 3, SIZE * 3, 3), np.uint8)).save(root / "masks" / "P02_R_colour.png")  # ... fits
    (tmp_path / "mcol.toml").write_text(
        f'[dataset]\nname = "clinic"\nkind = "segmentation"\nroot = "{root.as_posix()}"\n'
        '[dataset.images]\nfolder = "images"\npattern = "*.png"\nsubject = "P(\\\\d+)_"\n'
        '[[dataset.masks]]\nfolder = "masks"\nname = "{stem}_colour.png"\nkind = "color"\n'
        'colors = { "0,0,0" = 0, "255,0,0" = 1 }\n[dataset.split]\nfile = "split.csv"\n'
    )
    site = tmp_path / "site_col.toml"
    site.write_text('name = "col"\nmodality = "fundus"\n[data]\nsource = "manifest"\nmanifest = "mcol.toml"\n'
                    '[task]\ntype = "segmentation"\nmode = "multiclass"\nnum_classes = 2\n')
    rc, out, _ = _run(capsys, site)
    assert rc == 3
    errors = _errors(out)
    assert len(errors) == 1 and "P01_R_colour.png: mask read: 7 of 2304 pixels have 1 colour(s) not in the colour map" \
        in errors[0], out
    assert "P99_X_colour.png: orphan mask" in out
    assert "P02_R.png: size outlier: 144x144 pixels, the median is 48x48" in out
    assert "200" not in "\n".join(errors), "no pixel values in messages"


def test_dicom_photographs_are_checked_without_patient_data(tmp_path, capsys, monkeypatch):
    from fedbone_med.data.phantom_io import write_fundus_dicom

    root = tmp_path / "dcm"
    rows = ["image,split"]
    for i in range(4):
        ph = make_fundus(600 + i, SIZE)
        name = f"P{i:02d}_L"
        write_fundus_dicom(ph, root / "images" / f"{name}.dcm", patient_id=PATIENT_ID)
        write_fundus_png(ph, tmp_path / "tmp" / f"{name}.png", root / "masks")
        rows.append(f"{name}.dcm,{'val' if i == 3 else 'train'}")
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    site = _write_site(tmp_path, root, "vessels")
    (tmp_path / "m_vessels.toml").write_text((tmp_path / "m_vessels.toml").read_text().replace("*.png", "*.dcm"))
    rc, out, err = _run(capsys, site)
    assert rc == 0 and "split 'train': 3 images" in out, out + err
    dcm = root / "images" / "P01_L.dcm"
    dcm.write_bytes(dcm.read_bytes()[:-100])  # pixel data cut short
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    monkeypatch.setattr(get_decoder(JPEGLosslessSV1), "_available", {})  # none here anyway; so also elsewhere
    ds = pydicom.dcmread(root / "images" / "P02_L.dcm")
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    ds.save_as(root / "images" / "P02_L.dcm")
    rc, out, err = _run(capsys, site)
    assert rc == 3
    errors = _errors(out)
    assert sum("P01_L.dcm: image read: pixel data is truncated" in e for e in errors) == 1, out
    assert sum("P02_L.dcm: image read: cannot decode pixel data with transfer syntax 'JPEG Lossless, Non-Hierarchical,"
               in e and "install one of:" in e and "pylibjpeg-libjpeg" in e for e in errors) == 1, out
    assert len(errors) == 2, out
    assert PATIENT_ID not in out + err and "PHANTOM^" not in out + err


# ----------------------------------------------------------- training: the same message, or counted skips
def _break_corrupt_image(root: Path) -> None:
    img = root / "images" / "P00_R.png"
    img.write_bytes(img.read_bytes()[:200])


def _break_mask_size(root: Path) -> None:
    Image.fromarray(np.zeros((20, 30), bool)).save(root / "masks" / "P01_L_vessels.png")


@pytest.mark.parametrize(("damage", "check"), [(_break_corrupt_image, "image read"), (_break_mask_size, "mask size")])
def test_training_stops_with_the_check_data_message_or_counts_the_skip(copy, capsys, damage, check):
    from fedbone_med.config import load_site
    from fedbone_med.data.pipeline import LOAD_STEPS, load_manifest, load_manifest_splits
    from fedbone_med.data.sources import load_site_data

    root, vessels, _ = copy
    damage(root)
    rc, out, _ = _run(capsys, vessels)
    (error,) = _errors(out)
    with pytest.raises(DataError) as e:
        load_site_data(load_site(vessels))
    assert f"  - {e.value}" == error, "training stops with the message check-data gives"
    m = load_manifest(vessels.parent / "m_vessels.toml")
    train, val, record = load_manifest_splits(m, LOAD_STEPS, skip_bad=True)
    assert record["skipped"] == {"listing": {"total": 0}, "train": {"total": 1, check: 1}, "val": {"total": 0}}
    assert (len(train), len(val), record["train_images"]) == (3, 2, 3)
    assert "P0" not in json.dumps(record), "no file names in the run output"
    # with data.skip_bad_files the site trains, and every round's results carry the count
    from fedbone_med.site.runtime import SiteRuntime

    cfg = load_site(vessels, {"data": {"skip_bad_files": True}})
    runtime = SiteRuntime(cfg, None, load_site_data(cfg), seed=0)  # type: ignore[arg-type]  # no transport needed
    assert runtime.skipped_files() == {"skipped_files_listing": 0.0, "skipped_files_train": 1.0,
                                       "skipped_files_val": 0.0}


def test_training_on_a_bad_oct_volume_gives_the_check_data_message(tmp_path, capsys, monkeypatch):
    from fedbone_med.config import load_site
    from fedbone_med.data.phantom_io import write_oct_label_nifti
    from fedbone_med.data.phantoms import make_oct_volume
    from fedbone_med.data.sources import load_site_data

    root = tmp_path / "data" / "oct"
    site = _oct_layers_site(tmp_path, root, "nifti")
    write_oct_label_nifti(make_oct_volume(9, 2, size=32), root / "labels" / "S0_R_layers.nii.gz")  # 2 B-scans, not 3
    rc, out, _ = _run(capsys, site, "--data-root", str(tmp_path / "data"))
    (error,) = _errors(out)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "data"))
    with pytest.raises(DataError) as e:
        load_site_data(load_site(site))
    assert f"  - {e.value}" == error
