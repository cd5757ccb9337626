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
    block = []
    for x in lines[start + 1 :]:
        if not x.startswith("  - "):
            break
        block.append(x)
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
    assert "P01_R.png: blank image" in out and "duplicate images (identical files)" in out
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
