"""Dataset manifests: which files make up a site's data set, and how they are split.

A manifest is a TOML table (data only) in ``pipelines/datasets/``. It names image files
and their labels in one of the layouts hospital data arrives in:

* segmentation: an image folder and one or more mask folders matched by file name
  (``{stem}`` is the image name without extension), each mask binary, palette-indexed or
  colour-coded;
* classification: a labels CSV (integer class ids or class names), one folder per class, or
  arrays in a NumPy archive;
* OCT volumes (``[volumes]``: NIfTI, or multi-frame DICOM Ophthalmic Tomography), each B-scan
  a sample: segmentation from label volumes of the same geometry, classification from a labels
  CSV with one row per volume or, with ``bscan_column``, one row per B-scan
  (``volume,bscan,label``; only B-scans with a row are samples).

Every sample carries a *subject* (patient) id, taken from the file name by a regular
expression or from a CSV column, so that a split never puts one patient in two parts.
A manifest yields :class:`Sample` records (paths and ids, no pixels); reading and
transforming them is the pipeline's job (:mod:`fedbone_med.data.pipeline`).

:func:`list_samples` raises at the first problem (training) or, given a ``problems`` list,
collects every problem and lists what it can (``fedbone-site check-data``, which reuses it).
Given a ``skipped`` list instead (training with ``data.skip_bad_files``), a problem that
concerns one sample (a missing mask, a labels-CSV row naming a missing file or an unknown
class, ...) leaves that sample out and is recorded there with its check; a problem with the
data set as a whole (an empty folder, an unusable labels or split file, a subject leak) still
raises. The messages are the same in all three modes.
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
    """A CSV of labels: one row per image, per OCT volume, or per B-scan of a volume.

    ``image_column`` names the file (relative to the CSV's folder; for volumes, the volume's
    file name). With ``bscan_column`` (volume manifests only) each row labels one B-scan
    (0-based index along the volume's B-scan axis) and only the B-scans with a row become
    samples. Labels are integer class ids, or names from ``classes`` (class id = position).
    """

    file: str
    image_column: str
    label_column: str
    subject_column: str | None = None
    bscan_column: str | None = None
    classes: tuple[str, ...] = ()

    def validate(self) -> list[str]:
        if len(set(self.classes)) != len(self.classes):
            return ["classes: class names must be unique"]
        return []


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
            out.append(
                "classification of volumes takes its labels from labels_csv (one row per volume, or one per "
                "B-scan with bscan_column)"
            )
        if self.labels_csv is not None and self.labels_csv.bscan_column is not None and self.volumes is None:
            out.append("labels_csv.bscan_column labels B-scans of OCT volumes: it needs [volumes]")
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


# --------------------------------------------------------------------------- listing
class Problems:
    """Where listing problems go: raised at the first one (``out`` None: training, so a bad
    data set stops the run with the message check-data gives), or collected into ``out``
    (``fedbone-site check-data``, which lists every problem at once).

    A problem reported with a ``check`` concerns one sample only. With ``skipped`` (training
    with ``data.skip_bad_files``) such a problem is recorded there as ``(check, message)`` and
    the caller leaves the sample out (:attr:`keeps_flawed` is False); problems without a check
    are structural and still raise.

    Messages read ``WHERE: CHECK: REASON`` and name files, rows and checks, never pixel or
    label values or DICOM header values.
    """

    def __init__(self, out: list[str] | None = None, skipped: list[tuple[str, str]] | None = None) -> None:
        self.out = out
        self.skipped = skipped

    def __call__(self, message: str, check: str | None = None) -> None:
        if self.out is not None:
            self.out.append(message)
        elif check is not None and self.skipped is not None:
            self.skipped.append((check, message))
        else:
            raise DataError(message)

    @property
    def keeps_flawed(self) -> bool:
        """Whether a sample with a reported problem stays listed: only for check-data, which then
        still checks the files it has (e.g. the image of a missing mask)."""
        return self.out is not None


def empty_split_message(name: str, found: set[str] | list[str]) -> str:
    """What check-data and training say when the split ``name`` has no samples."""
    return (f"split '{name}': no images (splits found: {', '.join(sorted(found)) or 'none'}); "
            "training needs a non-empty 'train' split and the site's data.val_split")


def reason(exc: BaseException, path: Path) -> str:
    """An exception's message without the leading ``PATH: `` that the readers put first."""
    msg = str(exc)
    prefix = f"{path}: "
    return msg[len(prefix) :] if msg.startswith(prefix) else msg


def subject_of(name: str, regex: str | None) -> str:
    """The subject (patient) id in a file name: group 1 of ``regex``, or the stem without one."""
    if regex is None:
        return Path(name).stem
    m = re.search(regex, name)
    if m is None:
        raise DataError(f"file name {name!r} does not match the subject pattern {regex!r}")
    return m.group(1) if m.groups() else m.group(0)


def _subject(path: Path, regex: str | None, report: Problems) -> str | None:
    """The subject of a file; None when it does not match and the sample is to be left out."""
    try:
        return subject_of(path.name, regex)
    except DataError:
        report(f"{path}: subject: the file name does not match the subject pattern {regex!r}", check="subject")
        return Path(path.name).stem if report.keeps_flawed else None


def _glob(folder: Path, pattern: str, what: str, report: Problems) -> list[Path]:
    if not folder.is_dir():
        report(f"{folder}: {what} folder: not found")
        return []
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not files:
        report(f"{folder}: {what} folder: no files matching {pattern!r} (empty folder?)")
    return files


def volume_stem(path: Path) -> str:
    """A volume's name without its extension(s): ``S01_L.nii.gz`` -> ``S01_L``."""
    return path.name.split(".")[0]


def mask_paths(m: Manifest, root: Path, image: Path) -> tuple[Path, ...]:
    """The mask (or label volume) files that belong to ``image``, one per ``[[masks]]`` entry."""
    stem = volume_stem(image) if m.volumes is not None else image.stem
    return tuple(root / spec.folder / spec.name.format(stem=stem, name=image.name) for spec in m.masks)


def orphan_masks(m: Manifest, root: Path) -> list[Path]:
    """Files in the mask folders that fit a mask name pattern but belong to no image (or volume)
    of the image folder."""
    source = m.volumes or m.images
    if source is None or not m.masks:
        return []
    folder = root / source.folder
    images = [p for p in folder.glob(source.pattern) if p.is_file()] if folder.is_dir() else []
    expected = {p for image in images for p in mask_paths(m, root, image)}
    out = []
    for spec in m.masks:
        folder = root / spec.folder
        if not folder.is_dir():
            continue
        regex = re.compile(re.escape(spec.name).replace(r"\{stem\}", ".+").replace(r"\{name\}", ".+") + r"\Z")
        out += [p for p in sorted(folder.iterdir()) if p.is_file() and regex.match(p.name) and p not in expected]
    return out


@dataclass(frozen=True)
class LabelRow:
    row: int  # line number in the CSV (the header is line 1)
    image: str
    label: int
    subject: str | None = None
    bscan: int | None = None


def _parse_label(value: str | None, spec: LabelsCSV) -> int | None:
    v = (value or "").strip()
    if spec.classes:
        return spec.classes.index(v) if v in spec.classes else None
    try:
        return int(v)
    except ValueError:
        return None


def read_labels_csv(m: Manifest, root: Path, report: Problems) -> tuple[Path, list[LabelRow]]:
    """The rows of a manifest's labels CSV that parse; every bad row is reported."""
    spec = m.labels_csv
    if spec is None:
        raise ConfigError(f"dataset '{m.name}': no labels_csv")
    path = root / spec.file
    if not path.is_file():
        report(f"{path}: labels file: not found")
        return path, []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        report(f"{path}: labels file: unreadable CSV ({type(exc).__name__})")
        return path, []
    if not rows:
        report(f"{path}: labels file: no rows under the header")
        return path, []
    cols = set(rows[0])
    need = {spec.image_column, spec.label_column} | {c for c in (spec.subject_column, spec.bscan_column) if c}
    if not need <= cols:
        has = sorted(c for c in cols if c)
        report(f"{path}: labels file: missing column(s) {sorted(need - cols)}; the file has {has}")
        return path, []
    out: list[LabelRow] = []
    seen: dict[tuple[str, int | None], int] = {}
    for i, row in enumerate(rows):
        line = i + 2
        where = f"{path}: row {line}"
        image = (row.get(spec.image_column) or "").strip()
        if not image:
            report(f"{where}: labels: the {spec.image_column!r} cell is empty", check="labels")
            continue
        label = _parse_label(row.get(spec.label_column), spec)
        if label is None:
            what = "not one of the declared classes (labels_csv.classes)" if spec.classes else "not an integer class id"
            report(f"{where}: label: {what}", check="label")
            continue
        bscan: int | None = None
        if spec.bscan_column:
            try:
                bscan = int((row.get(spec.bscan_column) or "").strip())
            except ValueError:
                bscan = -1
            if bscan < 0:
                report(f"{where}: B-scan index: not a non-negative integer", check="B-scan index")
                continue
        key = (Path(image).name if m.volumes is not None else image, bscan)
        if key in seen:
            what = "B-scan" if bscan is not None else ("volume" if m.volumes is not None else "image")
            report(f"{where}: labels: the same {what} is already labelled on row {seen[key]}", check="labels")
            continue
        seen[key] = line
        subject = (row.get(spec.subject_column) or "").strip() or None if spec.subject_column else None
        out.append(LabelRow(line, image, label, subject, bscan))
    return path, out


def _segmentation_samples(m: Manifest, root: Path, report: Problems) -> list[Sample]:
    if m.images is None:
        raise ConfigError(f"dataset '{m.name}': a segmentation manifest needs [dataset.images]")
    out = []
    for f in _glob(root / m.images.folder, m.images.pattern, "image", report):
        masks = mask_paths(m, root, f)
        missing = [p for p in masks if not p.is_file()]
        for p in missing:
            report(f"{p}: mask missing (image {f.name})", check="mask missing")
        subject = _subject(f, m.images.subject, report)
        if subject is None or (missing and not report.keeps_flawed):
            continue
        out.append(Sample(f, subject, masks))
    return out


def _classification_samples(m: Manifest, root: Path, report: Problems) -> list[Sample]:
    regex = m.images.subject if m.images else None
    out = []
    if m.labels_csv is not None:
        path, rows = read_labels_csv(m, root, report)
        for r in rows:
            f = path.parent / r.image
            if not f.is_file():
                report(f"{f}: image missing (named on row {r.row} of {path.name})", check="image missing")
                continue
            subject = r.subject or _subject(f, regex, report)
            if subject is not None:
                out.append(Sample(f, subject, label=r.label))
        return out
    pattern = m.images.pattern if m.images else "*"
    for label, name in enumerate(m.class_folders):
        for f in _glob(root / name, pattern, f"class {label}", report):
            subject = _subject(f, regex, report)
            if subject is not None:
                out.append(Sample(f, subject, label=label))
    return out


def count_bscans(path: Path, axis: int) -> int:
    """Number of B-scans in an OCT volume, from its header only (no pixel data read)."""
    from .readers import detect_format

    if detect_format(path) == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # pydicom raises many types; its messages may quote header bytes
            raise DataError(f"{path}: DICOM header could not be parsed; the file may be corrupt") from None
        try:
            return max(1, int(ds.get("NumberOfFrames", 1) or 1))
        except (TypeError, ValueError):
            raise DataError(f"{path}: DICOM NumberOfFrames is not an integer") from None
    import nibabel

    try:
        shape = tuple(nibabel.load(str(path)).header.get_data_shape())  # type: ignore[attr-defined]
    except Exception as exc:
        raise DataError(f"{path}: not a readable NIfTI volume ({type(exc).__name__})") from None
    while len(shape) > 3 and shape[-1] == 1:  # a trailing singleton axis, as read_nifti drops it
        shape = shape[:-1]
    if len(shape) != 3 or not 0 <= axis < 3:
        raise DataError(
            f"{path}: expected a 3-D volume with B-scans along axis {axis}, got {len(shape)} dimension(s)"
        )
    return int(shape[axis])


def _volume_samples(m: Manifest, root: Path, report: Problems) -> list[Sample]:
    spec = m.volumes
    if spec is None:
        raise ConfigError(f"dataset '{m.name}': no [dataset.volumes] table")
    folder = root / spec.folder
    files = _glob(folder, spec.pattern, "volume", report)
    by_volume: dict[str, list[LabelRow]] = {}
    labels_path = root
    if m.kind == "classification":
        labels_path, rows = read_labels_csv(m, root, report)
        if not rows:  # the labels file's problem is reported; no volume can be labelled
            return []
        for r in rows:
            by_volume.setdefault(Path(r.image).name, []).append(r)
        names = {f.name for f in files}
        for name, rs in by_volume.items():
            if name not in names:
                report(f"{labels_path}: row {rs[0].row}: volume missing: no file of that name matches "
                       f"{spec.pattern!r} in {folder}", check="volume missing")
    per_bscan = m.labels_csv is not None and m.labels_csv.bscan_column is not None
    out: list[Sample] = []
    for f in files:
        masks = mask_paths(m, root, f)
        missing = [p for p in masks if not p.is_file()]
        for p in missing:
            report(f"{p}: label volume missing (volume {f.name})", check="label volume missing")
        try:
            n = count_bscans(f, spec.axis)
        except DataError as exc:
            report(f"{f}: volume read: {reason(exc, f)}", check="volume read")
            continue
        if missing and not report.keeps_flawed:
            continue
        if m.kind != "classification":
            subject = _subject(f, spec.subject, report)
            if subject is not None:
                out += [Sample(f, subject, masks, frame=k) for k in range(n)]
            continue
        rs = by_volume.get(f.name, [])
        if not rs:
            report(f"{f}: labels: the volume has no row in {labels_path.name}", check="labels")
            continue
        subjects = {r.subject for r in rs}
        if len(subjects) > 1:  # this volume's rows are inconsistent: the volume (not the data set) is bad
            report(f"{labels_path}: rows {rs[0].row}..{rs[-1].row}: subject: one volume's rows name different "
                   f"subjects ({f.name})", check="subject")
            if not report.keeps_flawed:
                continue
        subject = rs[0].subject or _subject(f, spec.subject, report)
        if subject is None:
            continue
        if not per_bscan:
            out += [Sample(f, subject, masks, rs[0].label, frame=k) for k in range(n)]
            continue
        for r in sorted(rs, key=lambda r: r.bscan or 0):
            if r.bscan is None or r.bscan >= n:
                report(f"{labels_path}: row {r.row}: B-scan index: outside the volume's {n} B-scan(s) ({f.name})",
                       check="B-scan index")
                continue
            out.append(Sample(f, subject, masks, r.label, frame=r.bscan))
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


def assign_splits(m: Manifest, root: Path, samples: list[Sample], problems: list[str] | None = None,
                  skipped: list[tuple[str, str]] | None = None) -> list[Sample]:
    """Apply the split file, or a seeded split by subject (one patient, one split).

    Samples the split file does not place are reported and left out (with ``skipped``, only
    recorded there); a subject found in more than one split is reported once per subject (its
    files are named, not its id).
    """
    report = Problems(problems, skipped)
    s = m.split
    if s.file is not None:
        path = root / s.file
        if not path.is_file():
            report(f"{path}: split file: not found")
            return []
        try:
            with path.open(newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        except (UnicodeDecodeError, csv.Error) as exc:
            report(f"{path}: split file: unreadable CSV ({type(exc).__name__})")
            return []
        if not rows or not {s.file_column, s.split_column} <= set(rows[0]):
            has = sorted(c for c in rows[0] if c) if rows else []
            report(f"{path}: split file: needs columns {s.file_column!r} and {s.split_column!r}; has {has}")
            return []
        table = {(r[s.file_column] or "").strip(): s.rename.get(r[s.split_column], r[s.split_column]) for r in rows}
        out, unplaced = [], set()
        for x in samples:
            split = table.get(x.image.name, table.get(x.subject))
            if split is None:
                if x.image not in unplaced:
                    unplaced.add(x.image)
                    report(f"{x.image}: split: neither the file nor its subject is in the split file {path.name}",
                           check="split")
                continue
            out.append(_with_split(x, split))
    else:
        table = seeded_subject_split([x.subject for x in samples], s.val_fraction, s.test_fraction, s.seed)
        out = [_with_split(x, table[x.subject]) for x in samples]
    by_subject: dict[str, dict[str, Path]] = {}
    for x in out:
        by_subject.setdefault(x.subject, {}).setdefault(x.split, x.image)
    for per_split in by_subject.values():
        if len(per_split) > 1:
            files = "; ".join(f"{k}: {v}" for k, v in sorted(per_split.items()))
            report(f"subject leak: one subject's files are in {len(per_split)} splits ({files}); "
                   "fix the split file or split by subject")
    return out


def _with_split(x: Sample, split: str) -> Sample:
    return Sample(x.image, x.subject, x.masks, x.label, split, x.frame)


def list_samples(m: Manifest, data_root: str | Path | None = None, problems: list[str] | None = None,
                 skipped: list[tuple[str, str]] | None = None) -> list[Sample]:
    """Every sample of a file-based manifest, with its split (npz manifests are read directly).

    Without ``problems`` the first problem raises :class:`DataError` (what training does).
    With a list, every problem found while listing is appended to it (missing files, bad
    label rows, unreadable volume headers, unplaced files, subject leaks) and the samples
    that could be listed are returned (a sample whose mask is missing is kept, so that its
    image can still be checked). With ``skipped`` (and no ``problems``), a problem that
    concerns one sample leaves it out and is appended there as ``(check, message)``; other
    problems raise (see :class:`Problems`).
    """
    if m.npz is not None:
        raise ConfigError(f"dataset '{m.name}': an npz manifest has no file list; use the pipeline loader")
    if problems is None:
        root = resolve_root(m, data_root)
    else:
        try:
            root = resolve_root(m, data_root)
        except DataError as exc:
            problems.append(f"data root: {exc}")
            return []
    return assign_splits(m, root, list_unsplit(m, root, problems, skipped), problems, skipped)


def list_unsplit(m: Manifest, root: Path, problems: list[str] | None = None,
                 skipped: list[tuple[str, str]] | None = None) -> list[Sample]:
    """The samples of a file-based manifest before the split is applied (see :func:`list_samples`)."""
    report = Problems(problems, skipped)
    if m.volumes is not None:
        return _volume_samples(m, root, report)
    if m.kind == "segmentation":
        return _segmentation_samples(m, root, report)
    return _classification_samples(m, root, report)
