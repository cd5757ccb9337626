"""From a manifest and a transform chain to the tensors a site trains on.

A pipeline file (``pipelines/transforms/*.toml``, data only) is a ``[[transform]]`` list of
allow-listed MONAI dictionary transforms (see :mod:`fedbone_med.data.transforms`), run once
per sample when the site loads its data. Every step is declared in the file, starting with
the two that turn a sample into arrays::

    [[transform]]
    name = "LoadSampled"            # read the sample's files (raster, DICOM, NIfTI B-scan, npz)
    keys = ["image", "label"]
    allow_missing_keys = true

    [[transform]]
    name = "EnsureChannelFirstd"    # MONAI's: (H, W, 3) -> (3, H, W), (H, W) -> (1, H, W)
    keys = ["image", "label"]
    allow_missing_keys = true

then any deterministic preprocessing (field-of-view crop, intensity transforms ...); the loader
appends the resize to the site's ``data.image_size``. A pipeline file without these two first
steps is refused with a ConfigError that names the file and the missing step and shows the
tables to add (:func:`split_head`); a site without a ``data.pipeline`` uses :data:`LOAD_STEPS`
alone. A ``data.augment`` chain runs on loaded tensors and must not load.

The loader builds one MONAI record per sample (file names, :mod:`fedbone_med.data.loading`),
runs the two load steps on it (:func:`read_sample`; a file that fails a check raises
:class:`~fedbone_med.data.loading.SampleError` with check-data's message), then the rest of
the chain. Images are float32 in [0, 1], scaled by the readers (:mod:`fedbone_med.data.readers`).

Labels follow :mod:`fedbone_med.models.losses`: one binary mask -> (1, H, W) float;
several binary masks -> (C, H, W) float (multilabel); an index or colour mask -> (H, W)
int64 class ids (multiclass); classification -> int64 class. The conversion to tensors of
these types is done here, after the chain, since it depends on the manifest's mask kinds.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configtools import from_mapping, read_toml
from ..errors import ConfigError, DataError
from .loading import SampleError, archive_record, sample_record
from .manifest import Manifest, Sample, empty_split_message, list_samples, resolve_root
from .sources import ArraySplit
from .transforms import build_transforms

log = logging.getLogger(__name__)

LOAD_STEP = "LoadSampled"
CHANNEL_FIRST_STEP = "EnsureChannelFirstd"
# The head every data.pipeline declares, in this order (and what a site without one runs).
LOAD_STEPS: tuple[dict[str, Any], ...] = (
    {"name": LOAD_STEP, "keys": ["image", "label"], "allow_missing_keys": True},
    {"name": CHANNEL_FIRST_STEP, "keys": ["image", "label"], "allow_missing_keys": True},
)
_PURPOSE = {LOAD_STEP: "reads the sample's files", CHANNEL_FIRST_STEP: "puts channels first"}


def load_manifest(path: str | Path) -> Manifest:
    data = read_toml(path)
    if "dataset" not in data or len(data) != 1:
        raise DataError(f"{path}: a manifest file holds exactly one [dataset] table")
    return from_mapping(Manifest, data["dataset"], where=Path(path).name)


def load_chain(path: str | Path) -> list[dict[str, Any]]:
    """The ``[[transform]]`` list of a pipeline or augmentation file, unchecked."""
    data = read_toml(path)
    chain = data.get("transform", [])
    if set(data) - {"transform"} or not isinstance(chain, list):
        raise DataError(f"{path}: a pipeline file holds only a [[transform]] list")
    return chain


def _step_toml(step: Mapping[str, Any]) -> str:
    keys = ", ".join(f'"{k}"' for k in step["keys"])
    return (f'[[transform]]\nname = "{step["name"]}"\nkeys = [{keys}]\n'
            f"allow_missing_keys = {str(step['allow_missing_keys']).lower()}")


def split_head(chain: Sequence[Mapping[str, Any]], where: str | Path) -> tuple[list[dict[str, Any]],
                                                                                list[dict[str, Any]]]:
    """(the load and channel-first steps, the rest) of a data.pipeline chain.

    Protects against a pipeline that does not say how its samples are read: the chain must
    start with ``LoadSampled`` then ``EnsureChannelFirstd``, both listing ``"image"``, and load
    nowhere else. Otherwise a ConfigError names ``where`` (the file), the missing or misplaced
    step, and gives the TOML tables to put at the head of the file.
    """
    names = [entry.get("name") if isinstance(entry, Mapping) else None for entry in chain]
    for i, (step, default) in enumerate(zip((LOAD_STEP, CHANNEL_FIRST_STEP), LOAD_STEPS, strict=True)):
        if step not in names:
            place = "at the head of the file" if i == 0 else f"right after the {LOAD_STEP} step"
            raise ConfigError(
                f"{where}: the pipeline has no {step} step (it {_PURPOSE[step]}); every data.pipeline starts "
                f"with {LOAD_STEP} then {CHANNEL_FIRST_STEP}. Add {place}:\n\n"
                + "\n\n".join(_step_toml(s) for s in LOAD_STEPS[i:])
            )
        if names.index(step) != i:
            raise ConfigError(
                f"{where}: {step} is step {names.index(step)} of the pipeline; it must be step {i} "
                f"({LOAD_STEP} first, then {CHANNEL_FIRST_STEP}, before any other transform)"
            )
        keys = chain[i].get("keys", default["keys"])
        if "image" not in (keys if isinstance(keys, list | tuple) else [keys]):
            raise ConfigError(f"{where}: transform[{i}] ({step}): keys must include \"image\"")
    if LOAD_STEP in names[2:]:
        raise ConfigError(f"{where}: {LOAD_STEP} appears again at step {names.index(LOAD_STEP, 2)}; load once, first")
    return [dict(e) for e in chain[:2]], [dict(e) for e in chain[2:]]


def load_pipeline(path: str | Path) -> list[dict[str, Any]]:
    """A site's ``data.pipeline`` file, checked to start with the load steps (:func:`split_head`)."""
    chain = load_chain(path)
    split_head(chain, path)
    return chain


def load_augment(path: str | Path) -> list[dict[str, Any]]:
    """A site's ``data.augment`` file: it runs on loaded tensors at batch time, so it must not load."""
    chain = load_chain(path)
    if any(entry.get("name") == LOAD_STEP for entry in chain):
        raise ConfigError(f"{path}: a data.augment chain runs on loaded images; {LOAD_STEP} belongs at the head "
                          "of the site's data.pipeline")
    return chain


def build_head(head: Sequence[Mapping[str, Any]] = LOAD_STEPS) -> list[Callable[[Any], Any]]:
    """The load steps as transform objects, to run one record at a time (:func:`read_sample`).

    They are called directly, not through ``Compose``, so that a bad file's
    :class:`SampleError` reaches the loader as such (``Compose`` re-raises as RuntimeError).
    """
    return list(build_transforms(head).transforms)


def _run_head(steps: Sequence[Callable[[Any], Any]], record: dict[str, Any]) -> dict[str, Any]:
    """A record through the load steps: ``{"image": (C, H, W)}`` and, for masks, ``"label"``
    (C, H, W) uint8, as contiguous numpy arrays (what the rest of the chain always received)."""
    d = record
    for step in steps:
        d = step(d)
    out: dict[str, Any] = {"image": np.ascontiguousarray(np.asarray(d["image"]))}
    if "label" in d:
        out["label"] = np.ascontiguousarray(np.asarray(d["label"]))
    return out


def read_sample(m: Manifest, sample: Sample, head: Sequence[Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """One sample through the load steps: ``{"image": (C, H, W) float32, "label": ...}`` numpy.

    ``head`` is :func:`build_head` of the site's pipeline (default: :data:`LOAD_STEPS`); pass the
    same one for every sample of a split, since it keeps the last OCT volume read. The label is
    (C, H, W) uint8 masks, or the class id of a classification sample.
    """
    d = _run_head(head if head is not None else build_head(), sample_record(m, sample))
    if m.kind == "classification":
        d["label"] = sample.label
    return d


def _finish_label(m: Manifest, label: Any) -> torch.Tensor:
    if m.kind == "classification":
        return torch.as_tensor(int(label), dtype=torch.int64)
    arr = np.asarray(label)
    if len(m.masks) == 1 and m.masks[0].kind in ("index", "color"):
        return torch.as_tensor(arr[0], dtype=torch.int64)  # (H, W) class ids
    return torch.as_tensor(arr, dtype=torch.float32)  # (C, H, W) {0, 1}


def materialise(m: Manifest, samples: Sequence[Sample], chain: Sequence[Mapping[str, Any]],
                skipped: Counter[str] | None = None, split: str = "train") -> ArraySplit:
    """Read and transform every sample; stack into one in-memory split.

    ``chain`` is a whole data.pipeline chain, load steps first (see :func:`split_head`). A sample
    whose file fails a check raises :class:`SampleError` (the check-data message), unless
    ``skipped`` is given: then the sample is left out, counted under its check and logged.
    """
    head, body = split_head(chain, "transform chain")
    steps = build_head(head)
    transform = build_transforms(body, seed=0)
    images, labels = [], []
    for sample in samples:
        try:
            raw = _run_head(steps, sample_record(m, sample))
        except SampleError as exc:
            if skipped is None:
                raise
            skipped[exc.check] += 1
            log.warning("%s (left out: data.skip_bad_files)", exc)
            continue
        d = transform(raw)  # a class id joins after the chain, which only sees image and masks
        images.append(torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32))
        labels.append(_finish_label(m, sample.label if m.kind == "classification" else d["label"]))
    if not images:
        raise DataError(f"dataset '{m.name}': split '{split}': every one of its {len(samples)} sample(s) failed a "
                        "check and was left out (data.skip_bad_files); run fedbone-site check-data")
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise DataError(f"dataset '{m.name}': images differ in shape after the pipeline {sorted(shapes)}; add a resize")
    return ArraySplit(torch.stack(images), torch.stack(labels))


def materialise_npz(m: Manifest, split: str, chain: Sequence[Mapping[str, Any]],
                    data_root: str | Path | None) -> ArraySplit:
    """A split of an npz manifest (arrays already split by key, e.g. RetinaMNIST).

    The archive is read once (:func:`~fedbone_med.data.readers.read_npz`); each item then goes
    through the chain's load steps like a file sample.
    """
    from .readers import read_npz

    if m.npz is None or split not in m.npz.splits:
        raise DataError(f"dataset '{m.name}': no npz split {split!r}")
    images_key, labels_key = m.npz.splits[split]
    path = resolve_root(m, data_root) / m.npz.file
    images, labels = read_npz(path, images_key=images_key, labels_key=labels_key)
    head, body = split_head(chain, "transform chain")
    steps = build_head(head)
    transform = build_transforms(body, seed=0)
    out = []
    for i in range(len(images)):
        raw = _run_head(steps, archive_record(path, images, i))
        out.append(torch.as_tensor(np.asarray(transform(raw)["image"]), dtype=torch.float32))
    return ArraySplit(torch.stack(out), torch.as_tensor(np.asarray(labels).reshape(-1), dtype=torch.int64))


def load_manifest_splits(m: Manifest, chain: Sequence[Mapping[str, Any]], data_root: str | Path | None = None,
                         val_split: str = "val", skip_bad: bool = False,
                         ) -> tuple[ArraySplit, ArraySplit, dict[str, Any]]:
    """(train, val, record of the split) for a manifest; the record goes into the run output.

    ``chain`` is the site's whole chain, load steps first. A problem with the data set as a
    whole (data root, empty folder, labels or split file unusable, subject leak, an empty
    split) stops the run with the message check-data gives. So does a problem with one
    sample, found while listing (a missing mask, a labels-CSV row naming a missing file or an
    unknown class, ...) or while reading (an unreadable file, a mask of the wrong size), unless
    ``skip_bad``: then the sample is left out and logged, and the record's ``skipped`` counts
    every skip under its check: ``listing`` (found before the split is made) and per split
    (found while reading). Counts only; file names can carry patient identifiers.
    """
    if m.npz is not None:
        tr, va = materialise_npz(m, "train", chain, data_root), materialise_npz(m, val_split, chain, data_root)
        return tr, va, {"dataset": m.name, "method": "npz keys", "train_images": len(tr), "val_images": len(va)}
    listing: list[tuple[str, str]] = []
    samples = list_samples(m, data_root, skipped=listing if skip_bad else None)
    for _, message in listing:
        log.warning("%s (left out: data.skip_bad_files)", message)
    found = {s.split for s in samples}
    for name in ("train", val_split):
        if name not in found:
            raise DataError(empty_split_message(name, found))
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == val_split]
    skipped: dict[str, Counter[str]] = {"listing": Counter(c for c, _ in listing), "train": Counter(),
                                        "val": Counter()}
    tr = materialise(m, train, chain, skipped["train"] if skip_bad else None, "train")
    va = materialise(m, val, chain, skipped["val"] if skip_bad else None, val_split)
    record = split_record(m, train, val)
    if skip_bad:
        record["train_images"], record["val_images"] = len(tr), len(va)
        record["skipped"] = {k: {"total": sum(c.values()), **dict(sorted(c.items()))} for k, c in skipped.items()}
    return tr, va, record


def split_record(m: Manifest, train: Sequence[Sample], val: Sequence[Sample]) -> dict[str, Any]:
    """What the run output records of a split: counts and a digest of the membership.

    File names can carry patient identifiers at a hospital, so they are not written out;
    the SHA-256 over the sorted (split, file name) pairs lets a site prove which split it
    used without disclosing it.
    """
    import hashlib

    members = sorted([("train", s.image.name) for s in train] + [("val", s.image.name) for s in val])
    digest = hashlib.sha256("\n".join(f"{a}\t{b}" for a, b in members).encode()).hexdigest()
    return {
        "dataset": m.name,
        "method": f"split file {m.split.file}" if m.split.file else f"seeded by subject (seed {m.split.seed})",
        "train_images": len(train),
        "val_images": len(val),
        "train_subjects": len({s.subject for s in train}),
        "val_subjects": len({s.subject for s in val}),
        "membership_sha256": digest,
    }
