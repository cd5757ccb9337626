"""A site's data from a dataset manifest and a pipeline (real files), checked against its task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import SiteConfig
from ..errors import ConfigError, DataError
from .manifest import Manifest
from .pipeline import LOAD_STEPS, load_manifest, load_manifest_splits, load_pipeline, split_head
from .sources import ArraySplit, SiteData


def _resize(keys: list[str], size: int, label_mode: str) -> dict[str, Any]:
    modes = ["area", label_mode][: len(keys)]
    return {"name": "Resized", "keys": keys, "spatial_size": [size, size], "mode": modes, "allow_missing_keys": True}


def _provided_task(m: Manifest) -> tuple[str, int, str | None]:
    """(type, num_classes, segmentation mode) that a manifest's labels provide."""
    if m.kind == "classification":  # named classes (CSV class names, class folders) fix the count
        named = len(m.labels_csv.classes) if m.labels_csv is not None else len(m.class_folders)
        return "classification", named, None  # 0: integer labels, checked against the labels themselves
    if len(m.masks) == 1 and m.masks[0].kind == "color":
        return "segmentation", max(m.masks[0].colors.values()) + 1, "multiclass"
    if len(m.masks) == 1 and m.masks[0].kind == "index":
        return "segmentation", 0, "multiclass"
    if all(s.kind == "binary" for s in m.masks):
        return "segmentation", len(m.masks), "binary" if len(m.masks) == 1 else "multilabel"
    raise ConfigError(f"dataset '{m.name}': mix binary masks only with binary masks")


def check_manifest_fits(cfg: SiteConfig, m: Manifest) -> None:
    kind, n, mode = _provided_task(m)
    t = cfg.task
    if kind != t.type or (n and n != t.num_classes) or (mode and mode != t.mode):
        got = f"{kind}" + (f", num_classes = {n}" if n else "") + (f", mode = {mode!r}" if mode else "")
        raise ConfigError(
            f"site '{cfg.name}': dataset '{m.name}' provides {got}; the [task] table says {t.type} with "
            f"num_classes = {t.num_classes}" + (f", mode = {t.mode!r}" if t.type == "segmentation" else "")
        )


def _check_labels(cfg: SiteConfig, split: ArraySplit, name: str) -> None:
    t = cfg.task
    y = split.targets
    if t.type == "classification" or t.mode == "multiclass":
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= t.num_classes:
            raise DataError(
                f"site '{cfg.name}': {name} labels range {lo}..{hi}, outside 0..{t.num_classes - 1} (task.num_classes)"
            )
    elif not bool(((y == 0) | (y == 1)).all()):
        raise DataError(f"site '{cfg.name}': {name} masks are not binary after the pipeline")
    if not bool(torch.isfinite(split.images).all()):
        raise DataError(f"site '{cfg.name}': {name} images contain NaN or Inf after the pipeline")


def site_pipeline(cfg: SiteConfig, m: Manifest) -> list[dict[str, Any]]:
    """The whole deterministic chain a site applies once per sample when it loads its data:
    its ``data.pipeline`` (load steps first; without a pipeline file, :data:`LOAD_STEPS`),
    then the resize to ``data.image_size``."""
    chain = load_pipeline(cfg.data.pipeline) if cfg.data.pipeline else [dict(s) for s in LOAD_STEPS]
    keys = ["image"] if m.kind == "classification" else ["image", "label"]
    return [*chain, _resize(keys, cfg.data.image_size, "nearest")]


def site_chain(cfg: SiteConfig, m: Manifest) -> list[dict[str, Any]]:
    """The part of :func:`site_pipeline` after the load steps: what runs on a sample that
    :func:`~fedbone_med.data.pipeline.read_sample` has read (channel-first arrays)."""
    chain = site_pipeline(cfg, m)
    return split_head(chain, cfg.data.pipeline or "the default load steps")[1]


def load_manifest_site_data(cfg: SiteConfig, data_root: str | Path | None = None) -> SiteData:
    d = cfg.data
    if d.manifest is None:
        raise ConfigError(f"site '{cfg.name}': data.manifest is required for source = 'manifest'")
    m = load_manifest(d.manifest)
    check_manifest_fits(cfg, m)
    chain = site_pipeline(cfg, m)
    # data.skip_bad_files: leave out and count samples with a problem of their own (listing or
    # reading) instead of stopping; the counts go into the split record of the run output.
    train, val, record = load_manifest_splits(m, chain, data_root, val_split=d.val_split, skip_bad=d.skip_bad_files)
    if cfg.modality == "oct" and train.images.shape[1] == 3:  # grey B-scans read as RGB
        train, val = ArraySplit(train.images[:, :1], train.targets), ArraySplit(val.images[:, :1], val.targets)
    _check_labels(cfg, train, "training")
    _check_labels(cfg, val, "validation")
    return SiteData(train, val, record)
