"""``fedbone-site check-data``: find every problem in a site's data before training starts.

:func:`check_site_data` walks a site's dataset once, one file at a time, and collects every
problem instead of stopping at the first. The file list comes from the manifest's own listing
(:func:`~fedbone_med.data.manifest.list_samples` with a ``problems`` list), so check-data and
training agree on what the data set is: missing images, masks and label volumes, bad label-CSV
rows (unknown class, not an integer, duplicate, B-scan index out of range, volume without
labels), files the split file does not place and subjects in more than one split are all
listing problems. Then every file is read: unreadable or corrupt images, DICOM and NIfTI files
(wrong number of dimensions, no pixel data, undecodable compression), masks whose size differs
from their image, label volumes whose shape differs from their volume, "binary" masks that are
not binary, class ids and labels out of range, the same pixels in two splits (content hash; an
error) are errors; blank images, empty masks, duplicates within a split, size outliers and
masks without an image are warnings. Every manifest kind is covered: image folders with masks,
labels CSVs, class folders, npz archives and OCT volumes (NIfTI or multi-frame DICOM, with
label volumes or per-volume / per-B-scan labels). It also gathers per-split counts, label and
class-pixel distributions and image sizes. Messages name the file and the check that failed;
they never hold pixel values, label values or DICOM header values.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SiteConfig
from ..errors import ConfigError, DataError
from .manifest import (
    Manifest,
    MaskSpec,
    Sample,
    assign_splits,
    empty_split_message,
    list_unsplit,
    orphan_masks,
    reason,
    resolve_root,
)


@dataclass
class DataReport:
    """Everything ``check-data`` found: errors block training, warnings do not."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": list(self.errors), "warnings": list(self.warnings), "stats": self.stats}

    def format(self) -> str:
        """A readable summary: problems first, then the per-split statistics."""
        s = self.stats
        lines = [f"check-data: site '{s.get('site')}' ({s.get('source')} data)"]
        if s.get("source") == "phantom":
            lines.append(f"  phantom task '{s.get('phantom_task')}': {s.get('description', '?')}")
        elif s.get("dataset"):
            lines.append(f"  dataset '{s['dataset']}' ({s.get('kind')}), {s.get('files_checked', 0)} file(s) checked")
        lines.append(f"ERRORS ({len(self.errors)}):" if self.errors else "errors: none")
        lines += [_item(e) for e in self.errors]
        lines.append(f"WARNINGS ({len(self.warnings)}):" if self.warnings else "warnings: none")
        lines += [_item(w) for w in self.warnings]
        for name, sp in s.get("splits", {}).items():
            if "volumes" in sp:
                parts = [f"{sp.get('images', 0)} B-scans in {sp['volumes']} volumes"]
            else:
                parts = [f"{sp.get('images', 0)} images"]
            if "subjects" in sp:
                parts.append(f"{sp['subjects']} subjects")
            for key in ("blank_images", "empty_masks"):
                if key in sp:
                    parts.append(f"{sp[key]} {key.replace('_', ' ')}")
            lines.append(f"split '{name}': " + ", ".join(parts))
            if sp.get("labels"):
                lines.append("    labels: " + ", ".join(f"{k}: {v}" for k, v in sp["labels"].items()))
            if sp.get("class_pixel_fraction"):
                lines.append(
                    "    class pixel fractions: "
                    + ", ".join(f"{k}: {v:.4f}" for k, v in sp["class_pixel_fraction"].items())
                )
            if sp.get("foreground_fraction"):
                lines.append(
                    "    foreground fractions: "
                    + ", ".join(f"{k}: {v:.4f}" for k, v in sp["foreground_fraction"].items())
                )
        if s.get("image_sizes"):
            size = s["image_sizes"]
            lines.append("image sizes (width x height): " + ", ".join(
                f"{k} {v[0]:g}x{v[1]:g}" for k, v in size.items()))
        if s.get("duplicate_groups"):
            lines.append(f"duplicate image groups: {s['duplicate_groups']}")
        verdict = "FAILED" if self.errors else "OK"
        lines.append(f"result: {verdict} ({len(self.errors)} error(s), {len(self.warnings)} warning(s))")
        return "\n".join(lines)


# --------------------------------------------------------------------------- entry point
def check_site_data(cfg: SiteConfig, data_root: str | Path | None = None) -> DataReport:
    """Check a site's data and return every problem found (never raises for data problems)."""
    report = DataReport(stats={"site": cfg.name, "source": cfg.data.source})
    _check_chains(cfg, report)
    if cfg.data.source == "phantom":
        _check_phantom(cfg, report)
        return report
    if cfg.data.manifest is None:
        report.errors.append("data.manifest: a 'manifest' source needs manifest = 'PATH'")
        return report
    from .pipeline import load_manifest

    try:
        m = load_manifest(cfg.data.manifest)
    except (ConfigError, DataError) as exc:
        report.errors.append(f"{cfg.data.manifest}: manifest: {exc}")
        return report
    report.stats.update({"dataset": m.name, "kind": m.kind, "manifest": str(cfg.data.manifest)})
    _check_task(cfg, m, report)
    try:
        root = resolve_root(m, data_root)
    except DataError as exc:
        report.errors.append(f"data root: {exc}")
        return report
    if m.npz is not None:
        _check_npz(cfg, m, root, report)
    else:
        _check_files(cfg, m, root, report)
    _check_split_names(cfg, report)
    return report


def _item(text: str) -> str:
    """A list item; the lines after the first (e.g. a TOML snippet to paste) indented under it."""
    first, *rest = text.splitlines() or [""]
    return "\n".join([f"  - {first}", *(f"      {line}" for line in rest if line.strip())])


def _check_chains(cfg: SiteConfig, report: DataReport) -> None:
    """The site's data.pipeline and data.augment files: the errors training would stop with."""
    from .pipeline import load_augment, load_pipeline, split_head
    from .transforms import build_transforms

    for key, path, load in (("data.pipeline", cfg.data.pipeline, load_pipeline),
                              ("data.augment", cfg.data.augment, load_augment)):
        if path is None:
            continue
        try:
            chain = load(path)
            build_transforms(split_head(chain, path)[1] if key == "data.pipeline" else chain)
        except (ConfigError, DataError, OSError) as exc:
            report.errors.append(f"{key}: {str(exc).strip()}")  # a TOML snippet to paste keeps its lines


def _check_task(cfg: SiteConfig, m: Manifest, report: DataReport) -> None:
    from .manifest_data import check_manifest_fits

    try:
        check_manifest_fits(cfg, m)
    except (ConfigError, DataError) as exc:
        report.errors.append(f"{cfg.data.manifest}: task fit: {exc}")


def _check_split_names(cfg: SiteConfig, report: DataReport) -> None:
    splits = report.stats.get("splits", {})
    for name in ("train", cfg.data.val_split):
        if not splits.get(name, {}).get("images"):
            report.errors.append(empty_split_message(name, list(splits)))


def _check_phantom(cfg: SiteConfig, report: DataReport) -> None:
    from .sources import PHANTOM_TASKS, check_task_fits

    d = cfg.data
    spec = PHANTOM_TASKS.get(d.task)
    report.stats.update({"phantom_task": d.task, "image_size": d.image_size, "seed": d.seed})
    report.stats["splits"] = {"train": {"images": d.n_train}, "val": {"images": d.n_val}}
    if spec is None:
        report.errors.append(f"data.task: unknown phantom task {d.task!r}; known: {', '.join(sorted(PHANTOM_TASKS))}")
        return
    report.stats["description"] = spec.description
    try:
        check_task_fits(cfg, spec)
    except ConfigError as exc:
        report.errors.append(f"task fit: {exc}")


# --------------------------------------------------------------------------- file-based manifests
@dataclass
class _SplitStats:
    images: int = 0  # samples: images, or B-scans of volumes
    volumes: set[Path] = field(default_factory=set)
    subjects: set[str] = field(default_factory=set)
    blank: int = 0
    empty: int = 0
    labels: Counter[int] = field(default_factory=Counter)
    pixels: np.ndarray | None = None  # per-class pixel counts (binary / multiclass)
    foreground: list[int] | None = None  # per-mask foreground pixel counts (multilabel)
    total_pixels: int = 0


def _digest(a: np.ndarray) -> str:
    """Content hash of decoded pixels (so a re-saved or re-exported copy is still found)."""
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _read_photo_raw(path: Path) -> np.ndarray:
    """The pixels of one 2-D image (raster, or a single-frame DICOM), in stored units for raster."""
    from .readers import detect_format, read_dicom, read_image

    if detect_format(path) == "dicom":
        image = read_dicom(path)
        if image.frames > 1:
            raise DataError(f"{path}: a multi-frame DICOM holds a volume; list its B-scans with [dataset.volumes]")
        return image.pixels
    return read_image(path, mode="keep", raw=True)


def _read_failure(path: Path, check: str, exc: Exception) -> str:
    if isinstance(exc, DataError):
        return f"{path}: {check}: {reason(exc, path)}"
    # not one of the readers' own messages, which might quote file content: name the type only
    return f"{path}: {check}: unexpected {type(exc).__name__} from the reader; the file may be corrupt"


def _distinct(a: np.ndarray) -> int:
    if a.dtype == np.uint8:
        return int(np.count_nonzero(np.bincount(a.ravel(), minlength=2)))
    return len(np.unique(a))


class _FileChecker:
    """One pass over the samples of a file-based manifest, one file in memory at a time."""

    def __init__(self, cfg: SiteConfig, m: Manifest, report: DataReport) -> None:
        self.cfg, self.m, self.report = cfg, m, report
        self.stats: dict[str, _SplitStats] = {}
        self.hashes: dict[str, list[tuple[Path, str]]] = {}  # content hash -> [(file, split)]
        self.sizes: list[tuple[str, int, int]] = []  # (file, height, width)
        self.checked = 0

    def error(self, msg: str) -> None:
        self.report.errors.append(msg)

    def warn(self, msg: str) -> None:
        self.report.warnings.append(msg)

    def split(self, x: Sample) -> _SplitStats:
        st = self.stats.setdefault(x.split, _SplitStats())
        st.images += 1
        st.subjects.add(x.subject)
        return st

    # ------------------------------------------------------------------ shared checks
    def label_ok(self, x: Sample, st: _SplitStats) -> bool:
        if x.label is None:
            return True
        st.labels[x.label] += 1
        return 0 <= x.label < self.cfg.task.num_classes

    def tally(self, i: int, spec: MaskSpec, mask: np.ndarray, where: str, st: _SplitStats) -> int | None:
        """Class-range check and class statistics of one (H, W) mask; None if it failed the check."""
        t = self.cfg.task
        n_fg = int(np.count_nonzero(mask))
        if spec.kind in ("index", "color"):
            counts = np.bincount(mask.ravel(), minlength=t.num_classes)
            n_bad = int(counts[t.num_classes :].sum()) if t.mode == "multiclass" else 0
            if n_bad:
                self.error(f"{where}: class range: {n_bad} pixel(s) have class ids outside 0..{t.num_classes - 1} "
                           "(task.num_classes)")
                return None
            if st.pixels is None:
                st.pixels = np.zeros(max(t.num_classes, len(counts)), np.int64)
            elif len(counts) > len(st.pixels):
                st.pixels = np.pad(st.pixels, (0, len(counts) - len(st.pixels)))
            st.pixels[: len(counts)] += counts
        elif len(self.m.masks) > 1:
            if st.foreground is None:
                st.foreground = [0] * len(self.m.masks)
            st.foreground[i] += n_fg
        else:
            if st.pixels is None:
                st.pixels = np.zeros(2, np.int64)
            st.pixels += (mask.size - n_fg, n_fg)
        if i == 0:
            st.total_pixels += mask.size
        return n_fg

    def remember(self, digest: str, path: Path, split: str) -> None:
        self.hashes.setdefault(digest, []).append((path, split))

    # ------------------------------------------------------------------ 2-D images
    def photo(self, x: Sample) -> None:

        st = self.split(x)
        if not self.label_ok(x, st):
            t = self.cfg.task
            self.error(f"{x.image}: label range: label outside 0..{t.num_classes - 1} (task.num_classes)")
        shape: tuple[int, ...] | None = None
        try:
            img = _read_photo_raw(x.image)
        except Exception as exc:  # a reader bug or an odd file must not stop check-data
            self.error(_read_failure(x.image, "image read", exc))
        else:
            self.checked += 1
            shape = img.shape[:2]
            self.sizes.append((str(x.image), shape[0], shape[1]))
            if img.size == 0 or img.min() == img.max():
                st.blank += 1
                self.warn(f"{x.image}: blank image: every pixel has the same value")
            else:
                self.remember(_digest(img), x.image, x.split)
            del img
        if self.m.kind == "segmentation":
            self.masks_2d(x, shape, st)

    def read_mask_2d(self, spec: MaskSpec, path: Path) -> np.ndarray | None:
        from .loading import color_map
        from .readers import read_image, read_mask

        try:
            if spec.kind == "color":
                return read_mask(path, kind="color", color_map=color_map(spec.colors), unknown=spec.unknown)
            if spec.kind == "index":
                return read_mask(path, kind="index")
            raw = read_image(path, mode="keep", raw=True)
            n_values = _distinct(raw.max(axis=2) if raw.ndim == 3 else raw)
            del raw
            if n_values > 2:
                self.error(f"{path}: binary mask: holds {n_values} distinct values, expected at most 2 "
                           "(background and foreground); re-export it as a 0/1 or 0/255 mask")
                return None
            return read_mask(path, kind="binary", threshold=spec.threshold)
        except Exception as exc:  # a reader bug or an odd file must not stop check-data
            self.error(_read_failure(path, "mask read", exc))
            return None

    def masks_2d(self, x: Sample, image_shape: tuple[int, ...] | None, st: _SplitStats) -> None:
        read_all, empty_all = True, True
        for i, (spec, path) in enumerate(zip(self.m.masks, x.masks, strict=True)):
            if not path.is_file():  # reported by the listing
                read_all = False
                continue
            self.checked += 1
            mask = self.read_mask_2d(spec, path)
            if mask is None:
                read_all = False
                continue
            if image_shape is not None and mask.shape != image_shape:
                self.error(f"{path}: mask size: mask is {mask.shape[1]}x{mask.shape[0]} pixels, "
                           f"its image {x.image.name} is {image_shape[1]}x{image_shape[0]}")
                read_all = False
                continue
            n_fg = self.tally(i, spec, mask, str(path), st)
            if n_fg is None:
                read_all = False
                continue
            empty_all = empty_all and n_fg == 0
        if read_all and empty_all and x.masks:
            st.empty += 1
            self.warn(f"{x.masks[0]}: empty mask: no foreground pixels (image {x.image.name})")

    # ------------------------------------------------------------------ OCT volumes
    def label_volume(self, spec: MaskSpec, path: Path, shape: tuple[int, ...] | None) -> np.ndarray | None:
        from .readers import read_nifti_labels

        assert self.m.volumes is not None
        if not path.is_file():  # reported by the listing
            return None
        self.checked += 1
        try:
            lab = read_nifti_labels(path, axis=self.m.volumes.axis)
        except Exception as exc:  # a reader bug or an odd file must not stop check-data
            self.error(_read_failure(path, "label volume read", exc))
            return None
        if shape is not None and lab.shape != shape:
            self.error(f"{path}: label volume shape: {'x'.join(map(str, lab.shape))} (B-scans x rows x columns) "
                       f"differs from its volume's {'x'.join(map(str, shape))}")
            return None
        t = self.cfg.task
        if spec.kind == "binary":
            n_values = _distinct(lab)
            if n_values > 2:
                self.error(f"{path}: binary mask: holds {n_values} distinct values, expected at most 2 "
                           "(background and foreground)")
                return None
        elif t.mode == "multiclass":
            n_bad = int(np.count_nonzero(lab >= t.num_classes))
            if n_bad:
                self.error(f"{path}: class range: {n_bad} voxel(s) have class ids outside 0..{t.num_classes - 1} "
                           "(task.num_classes)")
                return None
        return lab

    def volume(self, path: Path, samples: list[Sample]) -> None:
        from .loading import read_volume

        assert self.m.volumes is not None
        vol: np.ndarray | None = None
        try:
            vol = read_volume(path, self.m.volumes.axis)  # (N, H, W)
        except Exception as exc:  # a reader bug or an odd file must not stop check-data
            self.error(_read_failure(path, "volume read", exc))
        else:
            self.checked += 1
            self.sizes.append((str(path), vol.shape[1], vol.shape[2]))
        labels = [self.label_volume(spec, p, None if vol is None else vol.shape)
                  for spec, p in zip(self.m.masks, samples[0].masks, strict=True)]
        have_labels = self.m.kind == "segmentation" and all(lab is not None for lab in labels)
        bad_labels, outside, blank, empty = 0, 0, 0, 0
        for x in samples:
            st = self.split(x)
            st.volumes.add(path)
            bad_labels += not self.label_ok(x, st)
            k = int(x.frame or 0)
            if vol is None:
                continue
            if k >= vol.shape[0]:
                outside += 1
                continue
            scan = vol[k]
            if scan.min() == scan.max():
                blank += 1
                st.blank += 1
            else:
                self.remember(_digest(scan), path, x.split)
            if not have_labels:
                continue
            n_fg = 0
            for i, (spec, lab) in enumerate(zip(self.m.masks, labels, strict=True)):
                assert lab is not None
                plane = (lab[k] > spec.threshold).astype(np.uint8) if spec.kind == "binary" else lab[k]
                n_fg += self.tally(i, spec, plane, f"{path} B-scan {k}", st) or 0
            if n_fg == 0:
                empty += 1
                st.empty += 1
        n = len(samples)
        if bad_labels:
            t = self.cfg.task
            self.error(f"{path}: label range: {bad_labels} of {n} B-scan label(s) outside 0..{t.num_classes - 1} "
                       "(task.num_classes)")
        if outside and vol is not None:
            self.error(f"{path}: B-scan index: {outside} labelled B-scan(s) beyond the volume's {vol.shape[0]}")
        if blank:
            self.warn(f"{path}: blank B-scans: {blank} of {n} B-scan(s) have every pixel the same value")
        if have_labels and empty == n:
            self.warn(f"{path}: empty labels: no foreground in any of the volume's {n} B-scan(s)")

    # ------------------------------------------------------------------ across files
    def finish(self) -> None:
        # one message per set of files that share pixels (for volumes: how many B-scans they share)
        shared: dict[tuple[tuple[Path, str], ...], int] = {}
        for group in self.hashes.values():
            if len(group) > 1:  # for volumes, may be one file (identical B-scans within it)
                files = tuple(sorted(set(group)))
                shared[files] = shared.get(files, 0) + 1
        for files, n in shared.items():
            splits = sorted({s for _, s in files})
            listing = ", ".join(f"{f} ({s})" for f, s in files)
            if self.m.volumes is not None:
                listing += f": {n} identical B-scan(s)"
            if len(splits) > 1:
                self.error(f"duplicate images across splits (leaks between {' and '.join(splits)}): {listing}")
            else:
                self.warn(f"duplicate images (identical pixels): {listing}")
        if len(self.sizes) >= 3:
            mh = float(np.median([h for _, h, _ in self.sizes]))
            mw = float(np.median([w for _, _, w in self.sizes]))
            for f, h, w in self.sizes:
                if not (0.5 <= h / mh <= 2 and 0.5 <= w / mw <= 2):
                    self.warn(f"{f}: size outlier: {w}x{h} pixels, the median is {mw:g}x{mh:g}; check it is the "
                              "right kind of image")
        r = self.report.stats
        if self.sizes:
            hs, ws = [h for _, h, _ in self.sizes], [w for _, _, w in self.sizes]
            r["image_sizes"] = {"min": [min(ws), min(hs)], "median": [float(np.median(ws)), float(np.median(hs))],
                               "max": [max(ws), max(hs)]}
        r["files_checked"] = self.checked
        r["duplicate_groups"] = len(shared)
        r["splits"] = {name: _split_dict(self.cfg, self.m, st) for name, st in sorted(self.stats.items())}


def _check_files(cfg: SiteConfig, m: Manifest, root: Path, report: DataReport) -> None:
    """The manifest's own listing (collecting its problems), then every file it names."""
    problems: list[str] = []
    samples = assign_splits(m, root, list_unsplit(m, root, problems), problems)
    report.errors += problems
    for p in orphan_masks(m, root):
        report.warnings.append(f"{p}: orphan mask: no image in the image folder has this mask name")
    checker = _FileChecker(cfg, m, report)
    if m.volumes is not None:
        by_volume: dict[Path, list[Sample]] = {}
        for x in samples:
            by_volume.setdefault(x.image, []).append(x)
        for path, xs in by_volume.items():
            checker.volume(path, xs)
    else:
        for x in samples:
            checker.photo(x)
    checker.finish()


def _split_dict(cfg: SiteConfig, m: Manifest, st: _SplitStats) -> dict[str, Any]:
    out: dict[str, Any] = {"images": st.images, "subjects": len(st.subjects), "blank_images": st.blank}
    if m.volumes is not None:
        out["volumes"] = len(st.volumes)
    if m.kind == "classification":
        out["labels"] = {str(k): v for k, v in sorted(st.labels.items())}
        return out
    out["empty_masks"] = st.empty
    if st.pixels is not None and st.pixels.sum():
        total = float(st.pixels.sum())
        out["class_pixel_fraction"] = {str(k): round(float(v) / total, 6) for k, v in enumerate(st.pixels)}
    if st.foreground is not None and st.total_pixels:
        names = [f"{i}:{spec.folder}" for i, spec in enumerate(m.masks)]
        out["foreground_fraction"] = {
            n: round(v / st.total_pixels, 6) for n, v in zip(names, st.foreground, strict=True)
        }
    return out


# --------------------------------------------------------------------------- npz manifests
def _check_npz(cfg: SiteConfig, m: Manifest, root: Path, report: DataReport) -> None:
    assert m.npz is not None
    path = root / m.npz.file
    report.stats["files_checked"] = 1
    splits: dict[str, Any] = {}
    report.stats["splits"] = splits
    if not path.is_file():
        report.errors.append(f"{path}: npz: file not found")
        return
    t = cfg.task
    seen: dict[str, list[tuple[str, int]]] = {}
    try:
        with path.open("rb") as fh:
            npz = np.load(fh, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                report.errors.append(f"{path}: npz: a single .npy array, not an npz archive")
                return
            present = set(npz.files)
            for split, keys in sorted(m.npz.splits.items()):
                if len(keys) != 2:
                    report.errors.append(f"{path}: npz keys: split {split!r} needs [images key, labels key]")
                    continue
                missing = [k for k in keys if k not in present]
                if missing:
                    report.errors.append(f"{path}: npz keys: {missing} not in the archive (keys: {sorted(present)})")
                    continue
                images, labels = npz[keys[0]], npz[keys[1]]
                splits[split] = _check_npz_split(path, split, keys, images, labels, t.num_classes, report, seen)
                del images, labels
    except ValueError as exc:
        reason = "holds Python objects; refusing to unpickle" if "pickle" in str(exc) else type(exc).__name__
        report.errors.append(f"{path}: npz read: {reason}")
        return
    except (OSError, EOFError) as exc:
        report.errors.append(f"{path}: npz read: unreadable archive ({type(exc).__name__})")
        return
    except Exception as exc:  # zipfile.BadZipFile and friends
        report.errors.append(f"{path}: npz read: unreadable archive ({type(exc).__name__})")
        return
    dup = [g for g in seen.values() if len(g) > 1]
    report.stats["duplicate_groups"] = len(dup)
    cross = [g for g in dup if len({s for s, _ in g}) > 1]
    if cross:
        report.errors.append(
            f"{path}: duplicate images across splits: {len(cross)} group(s) of identical arrays, "
            f"e.g. {', '.join(f'{s}[{i}]' for s, i in cross[0])}; they leak between splits"
        )
    if len(dup) > len(cross):
        g = next(g for g in dup if len({s for s, _ in g}) == 1)
        report.warnings.append(
            f"{path}: duplicate images within a split: {len(dup) - len(cross)} group(s), "
            f"e.g. {', '.join(f'{s}[{i}]' for s, i in g)}"
        )


def _check_npz_split(path: Path, split: str, keys: list[str], images: np.ndarray, labels: np.ndarray,
                     num_classes: int, report: DataReport, seen: dict[str, list[tuple[str, int]]]) -> dict[str, Any]:
    ik, lk = keys
    where = f"{path}: npz split {split!r}"
    out: dict[str, Any] = {"images": int(images.shape[0]) if images.ndim else 0}
    ok = True
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        report.errors.append(f"{where}: shape: {ik!r} must be (N, H, W) or (N, H, W, 1|3), got {images.shape}")
        ok = False
    if images.dtype.kind == "f":
        finite = bool(np.isfinite(images).all())
        if not finite or (images.size and (float(images.min()) < 0 or float(images.max()) > 1)):
            report.errors.append(f"{where}: value range: float {ik!r} must be finite and within [0, 1]")
    elif images.dtype not in (np.uint8, np.uint16, np.bool_):
        report.errors.append(f"{where}: dtype: {ik!r} is {images.dtype}; expected uint8, uint16, bool or float")
        ok = False
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        report.errors.append(f"{where}: shape: {lk!r} must be (N,) or (N, 1), got {labels.shape}")
    elif images.ndim and labels.shape[0] != images.shape[0]:
        report.errors.append(f"{where}: shape: {ik!r} has {images.shape[0]} items, {lk!r} {labels.shape[0]}")
    if labels.dtype.kind not in "iub":
        report.errors.append(f"{where}: dtype: labels {lk!r} are {labels.dtype}; expected integers")
    elif labels.ndim == 1:
        n_bad = int(((labels < 0) | (labels >= num_classes)).sum())
        if n_bad:
            report.errors.append(
                f"{where}: label range: {n_bad} label(s) outside 0..{num_classes - 1} (task.num_classes)"
            )
        values, counts = np.unique(labels, return_counts=True)
        out["labels"] = {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}
    blank = 0
    if ok:
        for i in range(images.shape[0]):
            img = images[i]
            if img.size == 0 or img.min() == img.max():
                blank += 1
            seen.setdefault(hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest(), []).append((split, i))
        if blank:
            report.warnings.append(f"{where}: blank images: {blank} image(s) have every pixel the same value")
    out["blank_images"] = blank
    return out
