"""Dataset manifests: which files make up a site's data set, and how they are split.

A manifest is a TOML table (data only) in ``pipelines/datasets/``. It names image files
and their labels in one of the layouts hospital data arrives in:

* segmentation: an image folder and one or more mask folders matched by file name
  (``{stem}`` is the image name without extension), each mask binary, palette-indexed or
  colour-coded;
* classification: a labels CSV, one folder per class, or arrays in a NumPy archive.

Every sample carries a *subject* (patient) id, taken from the file name by a regular
expression or from a CSV column, so that a split never puts one patient in two parts.
A manifest yields :class:`Sample` records (paths and ids, no pixels); reading and
transforming them is the pipeline's job (:mod:`fedbone_med.data.pipeline`).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import ConfigError, DataError

DATA_ROOT_ENV = "FEDBONE_DATA_ROOT"


def default_data_root() -> Path:
    """``$FEDBONE_DATA_ROOT``, else ``shared/data`` beside this checkout (``../shared/data``)."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class ImagesSpec:
    folder: str
    pattern: str = "*"
    subject: str | None = None  # regex on the file name; group 1 is the subject id


@dataclass(frozen=True)
class VolumeSpec:
    """OCT volumes (NIfTI, or multi-frame DICOM Ophthalmic Tomography); each B-scan is a sample.

    ``axis`` is the NIfTI array axis that indexes B-scans; masks of a volume manifest are
    label volumes of the same geometry (``kind = "index"``).
    """

    folder: str
    pattern: str = "*"
    subject: str | None = None
    axis: int = 2


@dataclass(frozen=True)
class MaskSpec:
    folder: str
    name: str = "{stem}.png"
    kind: Literal["binary", "index", "color"] = "binary"
    threshold: int = 0  # binary: pixel > threshold is foreground
    colors: dict[str, int] = field(default_factory=dict)  # color: "R,G,B" -> class id
    unknown: Literal["error", "background"] = "error"


@dataclass(frozen=True)
class LabelsCSV:
    file: str
    image_column: str
    label_column: str
    subject_column: str | None = None


@dataclass(frozen=True)
class NpzSpec:
    file: str
    splits: dict[str, list[str]]  # split name -> [images key, labels key]


@dataclass(frozen=True)
class SplitSpec:
    """A split file (CSV: image name or subject, split) or a seeded split grouped by subject."""

    file: str | None = None
    file_column: str = "image"
    split_column: str = "split"
    rename: dict[str, str] = field(default_factory=dict)  # e.g. {"training" = "train", "test" = "val"}
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0

    def validate(self) -> list[str]:
        v, t = self.val_fraction, self.test_fraction
        if not (0 <= v < 1 and 0 <= t < 1 and v + t < 1):
            return ["val_fraction/test_fraction: must be in [0, 1) and sum to < 1"]
        return []


@dataclass(frozen=True)
class Manifest:
    name: str
    kind: Literal["segmentation", "classification"]
    root: str
    images: ImagesSpec | None = None
    volumes: VolumeSpec | None = None
    masks: tuple[MaskSpec, ...] = ()
    labels_csv: LabelsCSV | None = None
    class_folders: tuple[str, ...] = ()
    npz: NpzSpec | None = None
    split: SplitSpec = field(default_factory=SplitSpec)

    def validate(self) -> list[str]:
        sources = sum(x is not None and x != () for x in (self.labels_csv, self.class_folders or None, self.npz))
        out = []
        if self.images is not None and self.volumes is not None:
            out.append("a manifest lists either [images] (2-D files) or [volumes] (OCT volumes), not both")
        if self.kind == "segmentation" and ((self.images is None and self.volumes is None) or not self.masks):
            out.append("segmentation manifests need [images] or [volumes] and at least one [[masks]]")
        if self.kind == "classification" and sources != 1:
            out.append("classification manifests need exactly one of labels_csv, class_folders or npz")
        if self.volumes is not None and any(m.kind == "color" for m in self.masks):
            out.append("label volumes hold class ids: use kind = 'index' or 'binary' for their masks")
        if self.volumes is not None and self.kind == "classification" and self.labels_csv is None:
            out.append("classification of volumes takes its labels from labels_csv (one label per volume)")
        return out


@dataclass(frozen=True)
class Sample:
    """One record: paths and ids only (no pixels)."""

    image: Path
    subject: str
    masks: tuple[Path, ...] = ()
    label: int | None = None
    split: str = "train"
    frame: int | None = None  # B-scan index within an OCT volume


def resolve_root(manifest: Manifest, data_root: str | Path | None = None) -> Path:
    root = Path(manifest.root)
    if not root.is_absolute():
        root = Path(data_root) if data_root is not None else default_data_root()
        root = root / manifest.root
    if not root.is_dir():
        raise DataError(
            f"dataset '{manifest.name}': folder not found: {root}. Put the data there, set "
            f"{DATA_ROOT_ENV} to the folder that holds '{manifest.root}', or give an absolute root"
        )
    return root


def subject_of(name: str, regex: str | None) -> str:
    """The subject (patient) id in a file name: group 1 of ``regex``, or the stem without one."""
    if regex is None:
        return Path(name).stem
    m = re.search(regex, name)
    if m is None:
        raise DataError(f"file name {name!r} does not match the subject pattern {regex!r}")
    return m.group(1) if m.groups() else m.group(0)


def _segmentation_samples(m: Manifest, root: Path) -> list[Sample]:
    if m.images is None:
        raise ConfigError(f"dataset '{m.name}': a segmentation manifest needs [dataset.images]")
    folder = root / m.images.folder
    files = sorted(p for p in folder.glob(m.images.pattern) if p.is_file())
    if not files:
        raise DataError(f"dataset '{m.name}': no images matching {m.images.pattern!r} in {folder}")
    samples, missing = [], []
    for f in files:
        masks = tuple(root / spec.folder / spec.name.format(stem=f.stem, name=f.name) for spec in m.masks)
        missing += [p for p in masks if not p.is_file()]
        samples.append(Sample(f, subject_of(f.name, m.images.subject), masks))
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise DataError(f"dataset '{m.name}': {len(missing)} mask file(s) missing, e.g. {shown}")
    return samples


def _classification_samples(m: Manifest, root: Path) -> list[Sample]:
    if m.labels_csv is not None:
        spec = m.labels_csv
        path = root / spec.file
        if not path.is_file():
            raise DataError(f"dataset '{m.name}': labels file not found: {path}")
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        cols = set(rows[0]) if rows else set()
        need = {spec.image_column, spec.label_column} | ({spec.subject_column} if spec.subject_column else set())
        if not need <= cols:
            raise DataError(f"{path}: missing column(s) {sorted(need - cols)}; the file has {sorted(cols)}")
        base = path.parent
        out = []
        for i, row in enumerate(rows):
            try:
                label = int(row[spec.label_column])
            except ValueError:
                raise DataError(f"{path}: row {i + 2}: label is not an integer") from None
            subject = row[spec.subject_column] if spec.subject_column else Path(row[spec.image_column]).stem
            out.append(Sample(base / row[spec.image_column], subject, label=label))
        return out
    out = []
    for label, name in enumerate(m.class_folders):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"dataset '{m.name}': class folder not found: {folder}")
        regex = m.images.subject if m.images else None
        pattern = m.images.pattern if m.images else "*"
        out += [Sample(p, subject_of(p.name, regex), label=label) for p in sorted(folder.glob(pattern)) if p.is_file()]
    return out


def seeded_subject_split(subjects: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Subject -> split: a seeded shuffle of the sorted subjects, cut at the requested fractions.

    Whole subjects move together, so a patient never lands in two splits. A non-zero
    fraction gets at least one subject while at least one stays for training.
    """
    unique = sorted(set(subjects))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]

    def count(fraction: float) -> int:
        return 0 if fraction <= 0 else max(1, round(fraction * len(unique)))

    n_test = min(count(test_fraction), max(0, len(unique) - 1))
    n_val = min(count(val_fraction), max(0, len(unique) - 1 - n_test))
    split = {s: "test" for s in order[:n_test]}
    split.update({s: "val" for s in order[n_test : n_test + n_val]})
    split.update({s: "train" for s in order[n_test + n_val :]})
    return split


def assign_splits(m: Manifest, root: Path, samples: list[Sample]) -> list[Sample]:
    """Apply the split file, or a seeded split by subject (one patient, one split)."""
    s = m.split
    if s.file is not None:
        path = root / s.file
        if not path.is_file():
            raise DataError(f"dataset '{m.name}': split file not found: {path}")
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and not {s.file_column, s.split_column} <= set(rows[0]):
            raise DataError(f"{path}: needs columns {s.file_column!r} and {s.split_column!r}; has {sorted(rows[0])}")
        table = {r[s.file_column]: s.rename.get(r[s.split_column], r[s.split_column]) for r in rows}
        unknown = [x.image.name for x in samples if x.image.name not in table and x.subject not in table]
        if unknown:
            raise DataError(f"{path}: {len(unknown)} image(s) have no split, e.g. {unknown[0]}")
        out = [_with_split(x, table.get(x.image.name, table.get(x.subject, ""))) for x in samples]
    else:
        table = seeded_subject_split([x.subject for x in samples], s.val_fraction, s.test_fraction, s.seed)
        out = [_with_split(x, table[x.subject]) for x in samples]
    by_subject: dict[str, set[str]] = {}
    for x in out:
        by_subject.setdefault(x.subject, set()).add(x.split)
    leaked = sorted(k for k, v in by_subject.items() if len(v) > 1)
    if leaked:
        raise DataError(
            f"dataset '{m.name}': {len(leaked)} subject(s) appear in more than one split (e.g. subject "
            f"{leaked[0]!r}); fix the split file or split by subject"
        )
    return out


def _with_split(x: Sample, split: str) -> Sample:
    return Sample(x.image, x.subject, x.masks, x.label, split, x.frame)


def count_bscans(path: Path, axis: int) -> int:
    """Number of B-scans in an OCT volume, from its header only (no pixel data read)."""
    from .readers import detect_format

    if detect_format(path) == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # pydicom raises many types; its messages may quote header bytes
            raise DataError(f"{path}: DICOM header could not be parsed") from None
        return int(getattr(ds, "NumberOfFrames", 1) or 1)
    import nibabel

    try:
        shape = tuple(nibabel.load(str(path)).header.get_data_shape())  # type: ignore[attr-defined]
    except Exception as exc:
        raise DataError(f"{path}: not a readable NIfTI volume ({type(exc).__name__})") from None
    if len(shape) != 3 or not 0 <= axis < 3:
        raise DataError(f"{path}: expected a 3-D volume with B-scans along axis {axis}, got {len(shape)} dimensions")
    return int(shape[axis])


def _volume_samples(m: Manifest, root: Path) -> list[Sample]:
    spec = m.volumes
    if spec is None:
        raise ConfigError(f"dataset '{m.name}': no [dataset.volumes] table")
    folder = root / spec.folder
    files = sorted(p for p in folder.glob(spec.pattern) if p.is_file())
    if not files:
        raise DataError(f"dataset '{m.name}': no volumes matching {spec.pattern!r} in {folder}")
    labels: dict[str, int] = {}
    if m.kind == "classification":
        labels = {x.image.name: int(x.label or 0) for x in _classification_samples(m, root)}
    out, missing = [], []
    for f in files:
        stem = f.name.split(".")[0]
        masks = tuple(root / s.folder / s.name.format(stem=stem, name=f.name) for s in m.masks)
        missing += [p for p in masks if not p.is_file()]
        if m.kind == "classification" and f.name not in labels:
            raise DataError(f"dataset '{m.name}': volume {f.name} has no row in the labels file")
        n = count_bscans(f, spec.axis)
        subject = subject_of(f.name, spec.subject)
        out += [Sample(f, subject, masks, labels.get(f.name), frame=k) for k in range(n)]
    if missing:
        raise DataError(f"dataset '{m.name}': {len(missing)} label volume(s) missing, e.g. {missing[0]}")
    return out


def list_samples(m: Manifest, data_root: str | Path | None = None) -> list[Sample]:
    """Every sample of a file-based manifest, with its split (npz manifests are read directly)."""
    if m.npz is not None:
        raise ConfigError(f"dataset '{m.name}': an npz manifest has no file list; use the pipeline loader")
    root = resolve_root(m, data_root)
    if m.volumes is not None:
        samples = _volume_samples(m, root)
    elif m.kind == "segmentation":
        samples = _segmentation_samples(m, root)
    else:
        samples = _classification_samples(m, root)
    return assign_splits(m, root, samples)
