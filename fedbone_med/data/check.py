"""``fedbone-site check-data``: find every problem in a site's data before training starts.

:func:`check_site_data` walks a site's dataset once, one file at a time, and collects every
problem instead of stopping at the first: the manifest against the site's ``[task]`` table,
files that are missing or unreadable, masks of the wrong size, "binary" masks that are not
binary, class ids and labels out of range, blank images and empty masks (warnings), identical
image files (a warning; an error across splits, which leaks between them) and subjects found in
more than one split (an error). It also gathers per-split counts and label / class-pixel
distributions. Messages name the file and the check that failed; they never hold pixel values,
label values or patient data beyond the file paths the administrator configured.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import file_sha256
from ..config import SiteConfig
from ..errors import ConfigError, DataError
from .manifest import Manifest, Sample, resolve_root, seeded_subject_split, subject_of


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
        lines += [f"  - {e}" for e in self.errors]
        lines.append(f"WARNINGS ({len(self.warnings)}):" if self.warnings else "warnings: none")
        lines += [f"  - {w}" for w in self.warnings]
        for name, sp in s.get("splits", {}).items():
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
        if s.get("duplicate_groups"):
            lines.append(f"duplicate image groups: {s['duplicate_groups']}")
        verdict = "FAILED" if self.errors else "OK"
        lines.append(f"result: {verdict} ({len(self.errors)} error(s), {len(self.warnings)} warning(s))")
        return "\n".join(lines)


# --------------------------------------------------------------------------- entry point
def check_site_data(cfg: SiteConfig, data_root: str | Path | None = None) -> DataReport:
    """Check a site's data and return every problem found (never raises for data problems)."""
    report = DataReport(stats={"site": cfg.name, "source": cfg.data.source})
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
            report.errors.append(
                f"split '{name}': no images (splits found: {', '.join(sorted(splits)) or 'none'}); "
                "training needs a non-empty 'train' split and the site's data.val_split"
            )


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
def _list_samples(m: Manifest, root: Path, report: DataReport) -> list[Sample]:
    """Every sample the manifest names, recording (not raising) per-file problems."""
    if m.kind == "classification":
        from .manifest import _classification_samples

        try:
            return _classification_samples(m, root)
        except (ConfigError, DataError) as exc:
            report.errors.append(f"labels: {exc}")
            return []
    if m.images is None:
        report.errors.append(f"dataset '{m.name}': a segmentation manifest needs [dataset.images]")
        return []
    folder = root / m.images.folder
    files = sorted(p for p in folder.glob(m.images.pattern) if p.is_file())
    if not files:
        report.errors.append(f"{folder}: image listing: no images matching {m.images.pattern!r}")
    out = []
    for f in files:
        try:
            subject = subject_of(f.name, m.images.subject)
        except DataError as exc:
            report.errors.append(f"{f}: subject: {exc}")
            subject = f.stem
        masks = tuple(root / spec.folder / spec.name.format(stem=f.stem, name=f.name) for spec in m.masks)
        out.append(Sample(f, subject, masks))
    return out


def _assign_splits(m: Manifest, root: Path, samples: list[Sample], report: DataReport) -> list[Sample]:
    s = m.split
    if s.file is None:
        table = seeded_subject_split([x.subject for x in samples], s.val_fraction, s.test_fraction, s.seed)
        return [Sample(x.image, x.subject, x.masks, x.label, table[x.subject]) for x in samples]
    path = root / s.file
    if not path.is_file():
        report.errors.append(f"{path}: split file: not found")
        return []
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {s.file_column, s.split_column} <= set(rows[0]):
        report.errors.append(f"{path}: split file: needs columns {s.file_column!r} and {s.split_column!r}")
        return []
    split_of = {r[s.file_column]: s.rename.get(r[s.split_column], r[s.split_column]) for r in rows}
    out = []
    for x in samples:
        split = split_of.get(x.image.name, split_of.get(x.subject))
        if split is None:
            report.errors.append(f"{x.image}: split: the image (and its subject) is not in the split file {path}")
            continue
        out.append(Sample(x.image, x.subject, x.masks, x.label, split))
    return out


def _check_subject_leaks(samples: list[Sample], report: DataReport) -> None:
    by_subject: dict[str, dict[str, Path]] = {}
    for x in samples:
        by_subject.setdefault(x.subject, {}).setdefault(x.split, x.image)
    for per_split in by_subject.values():
        if len(per_split) > 1:
            files = "; ".join(f"{k}: {v}" for k, v in sorted(per_split.items()))
            report.errors.append(
                f"subject leak: one subject's images are in {len(per_split)} splits ({files}); "
                "fix the split file or split by subject"
            )


@dataclass
class _SplitStats:
    images: int = 0
    subjects: set[str] = field(default_factory=set)
    blank: int = 0
    empty: int = 0
    labels: Counter[int] = field(default_factory=Counter)
    pixels: np.ndarray | None = None  # per-class pixel counts (binary / multiclass)
    foreground: list[int] | None = None  # per-mask foreground pixel counts (multilabel)
    total_pixels: int = 0


def _mask_problems(cfg: SiteConfig, m: Manifest, sample: Sample, image_shape: tuple[int, ...] | None,
                   st: _SplitStats, report: DataReport) -> None:
    from .pipeline import _color_map
    from .readers import read_image, read_mask

    t = cfg.task
    multilabel = len(m.masks) > 1
    empty_all = True
    read_all = True
    for i, (spec, path) in enumerate(zip(m.masks, sample.masks, strict=True)):
        if not path.is_file():
            report.errors.append(f"{path}: mask missing (image {sample.image.name})")
            read_all = False
            continue
        try:
            if spec.kind == "color":
                mask = read_mask(path, kind="color", color_map=_color_map(spec.colors), unknown=spec.unknown)
            elif spec.kind == "index":
                mask = read_mask(path, kind="index")
            else:
                raw = read_image(path, mode="keep", raw=True)
                flat = raw.max(axis=2) if raw.ndim == 3 else raw
                n_values = (np.count_nonzero(np.bincount(flat.ravel(), minlength=2)) if flat.dtype.kind in "bu"
                            and flat.dtype.itemsize == 1 else len(np.unique(flat)))
                del raw, flat
                if n_values > 2:
                    report.errors.append(
                        f"{path}: binary mask: holds {n_values} distinct values, expected at most 2 "
                        "(background and foreground); re-export it as a 0/1 or 0/255 mask"
                    )
                    read_all = False
                    continue
                mask = read_mask(path, kind="binary", threshold=spec.threshold)
        except DataError as exc:
            report.errors.append(f"{path}: mask read: {exc}")
            read_all = False
            continue
        if image_shape is not None and mask.shape != image_shape:
            report.errors.append(
                f"{path}: mask size: mask is {mask.shape[1]}x{mask.shape[0]} pixels, "
                f"its image {sample.image.name} is {image_shape[1]}x{image_shape[0]}"
            )
            read_all = False
            continue
        n_fg = int(np.count_nonzero(mask))
        if spec.kind in ("index", "color"):
            counts = np.bincount(mask.ravel(), minlength=t.num_classes)
            n_bad = int(counts[t.num_classes:].sum()) if t.mode == "multiclass" else 0
            if n_bad:
                report.errors.append(
                    f"{path}: class range: {n_bad} pixel(s) have class ids outside 0..{t.num_classes - 1} "
                    "(task.num_classes)"
                )
                read_all = False
                continue
            if st.pixels is None:
                st.pixels = np.zeros(max(t.num_classes, len(counts)), np.int64)
            st.pixels[: len(counts)] += counts
        elif multilabel:
            if st.foreground is None:
                st.foreground = [0] * len(m.masks)
            st.foreground[i] += n_fg
        else:
            if st.pixels is None:
                st.pixels = np.zeros(2, np.int64)
            st.pixels += (mask.size - n_fg, n_fg)
        if i == 0:
            st.total_pixels += mask.size
        empty_all = empty_all and n_fg == 0
        del mask
    if read_all and empty_all and sample.masks:
        st.empty += 1
        report.warnings.append(f"{sample.masks[0]}: empty mask: no foreground pixels (image {sample.image.name})")


def _check_files(cfg: SiteConfig, m: Manifest, root: Path, report: DataReport) -> None:
    from .readers import read_image

    samples = _assign_splits(m, root, _list_samples(m, root, report), report)
    _check_subject_leaks(samples, report)
    stats: dict[str, _SplitStats] = {}
    hashes: dict[str, list[Sample]] = {}
    t = cfg.task
    checked = 0
    for x in samples:
        st = stats.setdefault(x.split, _SplitStats())
        st.images += 1
        st.subjects.add(x.subject)
        shape: tuple[int, ...] | None = None
        if not x.image.is_file():
            report.errors.append(f"{x.image}: image missing")
        else:
            checked += 1
            hashes.setdefault(file_sha256(x.image), []).append(x)
            try:
                img = read_image(x.image, mode="keep", raw=True)
                shape = img.shape[:2]
                if img.size == 0 or img.min() == img.max():
                    st.blank += 1
                    report.warnings.append(f"{x.image}: blank image: every pixel has the same value")
                del img
            except DataError as exc:
                report.errors.append(f"{x.image}: image read: {exc}")
        if m.kind == "classification":
            if x.label is not None:
                st.labels[x.label] += 1
                if not 0 <= x.label < t.num_classes:
                    report.errors.append(
                        f"{x.image}: label range: label outside 0..{t.num_classes - 1} (task.num_classes)"
                    )
        else:
            checked += sum(p.is_file() for p in x.masks)
            _mask_problems(cfg, m, x, shape, st, report)
    for group in hashes.values():
        if len(group) < 2:
            continue
        splits = sorted({x.split for x in group})
        listing = ", ".join(f"{x.image} ({x.split})" for x in group)
        if len(splits) > 1:
            report.errors.append(f"duplicate images across splits (leaks between {' and '.join(splits)}): {listing}")
        else:
            report.warnings.append(f"duplicate images (identical files): {listing}")
    report.stats["files_checked"] = checked
    report.stats["duplicate_groups"] = sum(len(g) > 1 for g in hashes.values())
    report.stats["splits"] = {name: _split_dict(cfg, m, st) for name, st in sorted(stats.items())}


def _split_dict(cfg: SiteConfig, m: Manifest, st: _SplitStats) -> dict[str, Any]:
    out: dict[str, Any] = {"images": st.images, "subjects": len(st.subjects), "blank_images": st.blank}
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
