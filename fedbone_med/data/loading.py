"""What the pipeline's load step reads: the files (or archive item) one sample record names.

A site's loader turns every sample of a manifest into a MONAI *record*, a dictionary whose
``"image"`` (and, for masks, ``"label"``) entries name files, as MONAI's ``LoadImaged``
expects, plus a ``"sample"`` entry saying how to read them (:class:`FileItem`: a manifest
sample; :class:`ArchiveItem`: one item of an npz split). The ``LoadSampled`` transform
(:mod:`fedbone_med.data.transforms`), declared first in every pipeline file, calls
:func:`load_item` to turn the record into arrays in their stored layout, with the channel
axis recorded for MONAI's ``EnsureChannelFirstd``, the step declared after it:

* a photograph (raster or single-frame DICOM): (H, W, 3) float32 in [0, 1], channel axis -1;
* a B-scan of an OCT volume (NIfTI or multi-frame DICOM): (H, W) float32 in [0, 1], no channel;
* an npz item: (H, W, C) or (H, W) float32 in [0, 1], as the archive holds it;
* masks / label volumes: one (H, W) uint8 plane per ``[[masks]]`` entry, stacked on axis 0.

Intensities are scaled to [0, 1] by the readers (:mod:`fedbone_med.data.readers`): by the
file's bit depth, and for NIfTI volumes by the whole volume's 0.5th-99.5th percentiles, which
a per-B-scan step could not compute.

A file that fails a check raises :class:`SampleError` with the message ``fedbone-site
check-data`` gives for it (check-data reads volumes with the same :func:`read_volume`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .manifest import Manifest, Sample, reason

SAMPLE_KEY = "sample"  # the record entry that says how to read the sample


@dataclass(frozen=True)
class FileItem:
    """A manifest sample to read from its files: a photograph, or one B-scan of a volume."""

    manifest: Manifest
    sample: Sample


@dataclass(frozen=True, eq=False)
class ArchiveItem:
    """Item ``index`` of an npz split; ``images`` is the split as :func:`~.readers.read_npz`
    read it, once for all its items (an archive is read whole, not item by item)."""

    path: Path
    images: np.ndarray  # (N, H, W) or (N, H, W, C) float32 in [0, 1]
    index: int


def sample_record(m: Manifest, sample: Sample) -> dict[str, Any]:
    """The MONAI record of a manifest sample, before the load step: file names, no pixels.

    A classification label is not part of the record: it is attached after the transform
    chain, so that steps listing ``"label"`` (with ``allow_missing_keys``) leave it alone.
    """
    record: dict[str, Any] = {"image": sample.image, SAMPLE_KEY: FileItem(m, sample)}
    if m.kind == "segmentation":
        record["label"] = sample.masks
    return record


def archive_record(path: Path, images: np.ndarray, index: int) -> dict[str, Any]:
    """The MONAI record of item ``index`` of an npz split (see :class:`ArchiveItem`)."""
    return {"image": path, SAMPLE_KEY: ArchiveItem(path, images, index)}


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


def color_map(colors: Mapping[str, int]) -> dict[tuple[int, int, int], int]:
    """A manifest's ``colors`` table (``"R,G,B" = class``) as the readers' colour map."""
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


@dataclass(frozen=True)
class Loaded:
    """A sample's arrays in their stored layout, as the load step hands them on.

    ``channel_dim`` is the image's channel axis (-1) or ``"no_channel"`` (a grey 2-D array),
    MONAI's ``original_channel_dim``; ``label`` (masks, (C, H, W) uint8) has its channels on
    axis 0 already, or is None for classification.
    """

    image: np.ndarray
    channel_dim: int | str
    label: np.ndarray | None = None


def load_item(item: FileItem | ArchiveItem, cache: VolumeCache) -> Loaded:
    """Read what a record's ``"sample"`` entry names (see the module docstring)."""
    if isinstance(item, ArchiveItem):
        image = np.asarray(item.images[item.index], dtype=np.float32)
        return Loaded(image, -1 if image.ndim == 3 else "no_channel")
    if item.sample.frame is not None:
        return _load_bscan(item.manifest, item.sample, cache)
    return _load_photo(item.manifest, item.sample)


def _load_bscan(m: Manifest, sample: Sample, cache: VolumeCache) -> Loaded:
    """One B-scan of an OCT volume, (H, W), and its label planes, (C, H, W) class ids or binary."""
    volume, *labels = cache.get(m, sample)
    k = int(sample.frame or 0)
    if not 0 <= k < volume.shape[0]:
        raise SampleError(f"{sample.image}: B-scan index: B-scan {k} is beyond the volume's {volume.shape[0]}",
                          "B-scan index")
    image = volume[k].astype(np.float32)
    if m.kind == "classification":
        return Loaded(image, "no_channel")
    planes = [lab[k] > spec.threshold if spec.kind == "binary" else lab[k]
              for spec, lab in zip(m.masks, labels, strict=True)]
    return Loaded(image, "no_channel", np.stack(planes).astype(np.uint8))


def _load_photo(m: Manifest, sample: Sample) -> Loaded:
    """A photograph, (H, W, 3), and its masks, one (H, W) plane per ``[[masks]]`` entry."""
    from .readers import read_mask

    try:
        image = read_photo(sample.image)  # (H, W, 3)
    except DataError as exc:
        raise _failed(sample.image, "image read", exc) from None
    if m.kind == "classification":
        return Loaded(image, -1)
    masks = []
    for spec, path in zip(m.masks, sample.masks, strict=True):
        try:
            if spec.kind == "color":
                mask = read_mask(path, kind="color", color_map=color_map(spec.colors), unknown=spec.unknown)
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
    return Loaded(image, -1, np.stack(masks).astype(np.uint8))
