"""From a manifest and a transform chain to the tensors a site trains on.

A pipeline file (``pipelines/*.toml``, data only) has a ``[[transform]]`` list (see
:mod:`fedbone_med.data.transforms`) applied once per sample when the site loads its data:
reading, channel-first layout, field-of-view crop, resizing, intensity scaling. Samples
are read with :mod:`fedbone_med.data.readers` (raster, DICOM, NIfTI, npz) into MONAI's
dictionary format ``{"image": (C, H, W), "label": ...}``.

Labels follow :mod:`fedbone_med.models.losses`: one binary mask -> (1, H, W) float;
several binary masks -> (C, H, W) float (multilabel); an index or colour mask -> (H, W)
int64 class ids (multiclass); classification -> int64 class.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configtools import from_mapping, read_toml
from ..errors import DataError
from .manifest import Manifest, Sample, list_samples, reason, resolve_root
from .sources import ArraySplit
from .transforms import build_transforms


def load_manifest(path: str | Path) -> Manifest:
    data = read_toml(path)
    if "dataset" not in data or len(data) != 1:
        raise DataError(f"{path}: a manifest file holds exactly one [dataset] table")
    return from_mapping(Manifest, data["dataset"], where=Path(path).name)


def load_chain(path: str | Path) -> list[dict[str, Any]]:
    data = read_toml(path)
    chain = data.get("transform", [])
    if set(data) - {"transform"} or not isinstance(chain, list):
        raise DataError(f"{path}: a pipeline file holds only a [[transform]] list")
    return chain


def _color_map(colors: Mapping[str, int]) -> dict[tuple[int, int, int], int]:
    out = {}
    for key, cls in colors.items():
        parts = [int(p) for p in key.split(",")]
        if len(parts) != 3:
            raise DataError(f"mask colour {key!r}: expected 'R,G,B'")
        out[(parts[0], parts[1], parts[2])] = int(cls)
    return out


def read_photo(path: Path) -> np.ndarray:
    """One 2-D image as (H, W, 3) float32 in [0, 1]: raster files, or a single-frame DICOM
    (Ophthalmic Photography, or one OCT B-scan); grey images are repeated over 3 channels."""
    from .readers import detect_format, read_dicom, read_image

    if detect_format(path) == "dicom":
        pixels = read_dicom(path).pixels
        if pixels.ndim == 3 and pixels.shape[-1] != 3:
            if pixels.shape[0] != 1:
                raise DataError(f"{path}: a multi-frame DICOM holds a volume; list its B-scans with an OCT manifest")
            pixels = pixels[0]
    else:
        return read_image(path, mode="rgb")
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


def read_volume(path: Path, axis: int) -> np.ndarray:
    """An OCT volume as (N, H, W) float32 grey B-scans in [0, 1]: a NIfTI volume sliced along
    ``axis``, or a DICOM (Ophthalmic Tomography) file, one B-scan per frame."""
    from .readers import detect_format, read_dicom, read_nifti

    if detect_format(path) != "dicom":
        return read_nifti(path, axis=axis)  # (N, H, W)
    image = read_dicom(path)
    if not image.photometric.startswith("MONOCHROME"):
        raise DataError(f"{path}: OCT volume: the frames are colour; B-scans must be greyscale (MONOCHROME)")
    pixels = image.pixels  # (F, H, W) or (H, W)
    return pixels if pixels.ndim == 3 else pixels[None]


class SampleError(DataError):
    """One sample's file failed a check while it was read for training. The message is the one
    ``fedbone-site check-data`` gives for the same problem (``PATH: CHECK: REASON``)."""

    def __init__(self, message: str, check: str) -> None:
        super().__init__(message)
        self.check = check


def _failed(path: Path, check: str, exc: DataError) -> SampleError:
    return SampleError(f"{path}: {check}: {reason(exc, path)}", check)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


class VolumeCache:
    """Keeps the last OCT volume (and its label volumes) read, since a volume's B-scans
    are consecutive samples; one volume in memory at a time. A volume that failed to read
    fails again for its other B-scans without being re-read."""

    def __init__(self) -> None:
        self._key: tuple[Path, ...] | None = None
        self._arrays: list[np.ndarray] = []
        self._error: SampleError | None = None

    def get(self, m: Manifest, sample: Sample) -> list[np.ndarray]:
        key = (sample.image, *sample.masks)
        if key != self._key:
            self._key, self._arrays, self._error = key, [], None
            try:
                self._arrays = self._read(m, sample)
            except SampleError as exc:
                self._error = exc
        if self._error is not None:
            raise SampleError(str(self._error), self._error.check)
        return self._arrays

    @staticmethod
    def _read(m: Manifest, sample: Sample) -> list[np.ndarray]:
        from .readers import read_nifti_labels

        axis = m.volumes.axis if m.volumes is not None else 2
        try:
            volume = read_volume(sample.image, axis)
        except DataError as exc:
            raise _failed(sample.image, "volume read", exc) from None
        arrays = [volume]
        for p in sample.masks:
            try:
                lab = read_nifti_labels(p, axis=axis)
            except DataError as exc:
                raise _failed(p, "label volume read", exc) from None
            if lab.shape != volume.shape:
                raise SampleError(f"{p}: label volume shape: {_shape_text(lab.shape)} (B-scans x rows x columns) "
                                  f"differs from its volume's {_shape_text(volume.shape)}", "label volume shape")
            arrays.append(lab)
        return arrays


def read_bscan(m: Manifest, sample: Sample, cache: VolumeCache) -> dict[str, Any]:
    """One B-scan of an OCT volume: image (1, H, W), label (1, H, W) class ids or the volume's label."""
    volume, *labels = cache.get(m, sample)
    k = int(sample.frame or 0)
    if not 0 <= k < volume.shape[0]:
        raise SampleError(f"{sample.image}: B-scan index: B-scan {k} is beyond the volume's {volume.shape[0]}",
                          "B-scan index")
    d: dict[str, Any] = {"image": volume[k][None].astype(np.float32)}
    if m.kind == "classification":
        d["label"] = sample.label
        return d
    planes = [lab[k] > spec.threshold if spec.kind == "binary" else lab[k]
              for spec, lab in zip(m.masks, labels, strict=True)]
    d["label"] = np.stack(planes).astype(np.uint8)  # (C, H, W)
    return d


def read_sample(m: Manifest, sample: Sample, cache: VolumeCache | None = None) -> dict[str, Any]:
    """Read one sample's image and label (channel-first numpy)."""
    from .readers import read_mask

    if sample.frame is not None:
        return read_bscan(m, sample, cache or VolumeCache())
    try:
        image = read_photo(sample.image)  # (H, W, 3)
    except DataError as exc:
        raise _failed(sample.image, "image read", exc) from None
    d: dict[str, Any] = {"image": np.ascontiguousarray(image.transpose(2, 0, 1))}  # (3, H, W)
    if m.kind == "classification":
        d["label"] = sample.label
        return d
    masks = []
    for spec, path in zip(m.masks, sample.masks, strict=True):
        try:
            if spec.kind == "color":
                mask = read_mask(path, kind="color", color_map=_color_map(spec.colors), unknown=spec.unknown)
            else:
                mask = read_mask(path, kind=spec.kind, threshold=spec.threshold)
        except DataError as exc:
            raise _failed(path, "mask read", exc) from None
        if mask.shape != image.shape[:2]:
            raise SampleError(
                f"{path}: mask size: mask is {mask.shape[1]}x{mask.shape[0]} pixels, "
                f"its image {sample.image.name} is {image.shape[1]}x{image.shape[0]}",
                "mask size",
            )
        masks.append(mask)
    d["label"] = np.stack(masks).astype(np.uint8)  # (C, H, W)
    return d


def _finish_label(m: Manifest, label: Any) -> torch.Tensor:
    if m.kind == "classification":
        return torch.as_tensor(int(label), dtype=torch.int64)
    arr = np.asarray(label)
    if len(m.masks) == 1 and m.masks[0].kind in ("index", "color"):
        return torch.as_tensor(arr[0], dtype=torch.int64)  # (H, W) class ids
    return torch.as_tensor(arr, dtype=torch.float32)  # (C, H, W) {0, 1}


def materialise(m: Manifest, samples: Sequence[Sample], chain: list[dict[str, Any]],
                skipped: Counter[str] | None = None) -> ArraySplit:
    """Read and transform every sample; stack into one in-memory split.

    A sample whose file fails a check raises :class:`SampleError` (the check-data message),
    unless ``skipped`` is given: then the sample is left out and counted under its check.
    """
    transform = build_transforms(chain, seed=0)
    images, labels = [], []
    cache = VolumeCache()
    for sample in samples:
        try:
            raw = read_sample(m, sample, cache)
        except SampleError as exc:
            if skipped is None:
                raise
            skipped[exc.check] += 1
            continue
        d = transform(raw)
        images.append(torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32))
        labels.append(_finish_label(m, d["label"]))
    if not images:
        raise DataError(f"dataset '{m.name}': the split is empty")
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise DataError(f"dataset '{m.name}': images differ in shape after the pipeline {sorted(shapes)}; add a resize")
    return ArraySplit(torch.stack(images), torch.stack(labels))


def materialise_npz(m: Manifest, split: str, chain: list[dict[str, Any]], data_root: str | Path | None) -> ArraySplit:
    """A split of an npz manifest (arrays already split by key, e.g. RetinaMNIST)."""
    from .readers import read_npz

    if m.npz is None or split not in m.npz.splits:
        raise DataError(f"dataset '{m.name}': no npz split {split!r}")
    images_key, labels_key = m.npz.splits[split]
    images, labels = read_npz(resolve_root(m, data_root) / m.npz.file, images_key=images_key,
                                      labels_key=labels_key)
    transform = build_transforms(chain, seed=0)
    out = []
    for img in images:
        chw = img.transpose(2, 0, 1) if img.ndim == 3 else img[None]
        out.append(torch.as_tensor(np.asarray(transform({"image": np.ascontiguousarray(chw)})["image"]),
                                   dtype=torch.float32))
    return ArraySplit(torch.stack(out), torch.as_tensor(np.asarray(labels).reshape(-1), dtype=torch.int64))


def load_manifest_splits(m: Manifest, chain: list[dict[str, Any]], data_root: str | Path | None = None,
                         val_split: str = "val", skip_bad: bool = False,
                         ) -> tuple[ArraySplit, ArraySplit, dict[str, Any]]:
    """(train, val, record of the split) for a manifest; the record goes into the run output.

    The file list must be right (a listing problem always stops the run). A listed file that
    fails when read stops the run too, with the message check-data gives for it, unless
    ``skip_bad``: then it is left out, and the record's ``skipped`` counts every skip per split
    and check (counts only; file names can carry patient identifiers).
    """
    if m.npz is not None:
        tr, va = materialise_npz(m, "train", chain, data_root), materialise_npz(m, val_split, chain, data_root)
        return tr, va, {"dataset": m.name, "method": "npz keys", "train_images": len(tr), "val_images": len(va)}
    samples = list_samples(m, data_root)
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == val_split]
    skipped: dict[str, Counter[str]] = {"train": Counter(), "val": Counter()}
    tr = materialise(m, train, chain, skipped["train"] if skip_bad else None)
    va = materialise(m, val, chain, skipped["val"] if skip_bad else None)
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
