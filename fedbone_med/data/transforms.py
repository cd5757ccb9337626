"""Declarative MONAI transform chains for site pipelines (data, never code).

A pipeline file lists transforms by name with keyword arguments::

    [[transform]]
    name = "RandFlipd"
    keys = ["image", "label"]
    prob = 0.5
    spatial_axis = 1

Names resolve through :data:`TRANSFORMS`, an allow-list of MONAI dictionary transforms
plus this project's own (the load step :class:`LoadSampled`, field-of-view crop, an
albumentations bridge, OCT speckle). A name that is not on the list, or an argument the
transform does not take, is a ConfigError naming it; nothing is imported or evaluated from
the file.

A site's ``data.pipeline`` starts with ``LoadSampled`` (read the sample's files) and MONAI's
``EnsureChannelFirstd`` (channel-first layout); see :mod:`fedbone_med.data.pipeline`. After
them arrays are channel-first (C, H, W) numpy/torch, as MONAI expects. Geometric transforms
must be given every spatial key (image and masks) so masks stay aligned; masks use
nearest-neighbour interpolation (``mode``) so class ids are never blended.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.transforms import MapTransform, Randomizable

from ..errors import ConfigError, DataError
from ..registry import Registry
from .loading import SAMPLE_KEY, ArchiveItem, FileItem, VolumeCache, load_item

TRANSFORMS: Registry = Registry("transform")

# MONAI dictionary transforms a pipeline may use. Deterministic ones first, random after.
_MONAI_ALLOWED = (
    "EnsureChannelFirstd",
    "ScaleIntensityd",
    "ScaleIntensityRanged",
    "ScaleIntensityRangePercentilesd",
    "NormalizeIntensityd",
    "Resized",
    "SpatialPadd",
    "CenterSpatialCropd",
    "ResizeWithPadOrCropd",
    "CastToTyped",
    "EnsureTyped",
    "RandFlipd",
    "RandRotate90d",
    "RandRotated",
    "RandZoomd",
    "RandAffined",
    "RandSpatialCropd",
    "RandAdjustContrastd",
    "RandGaussianNoised",
    "RandGaussianSmoothd",
    "RandScaleIntensityd",
    "RandShiftIntensityd",
)

for _name in _MONAI_ALLOWED:
    TRANSFORMS.register(_name)(getattr(mt, _name))


@TRANSFORMS.register("LoadSampled")
class LoadSampled(MapTransform):
    """The load step: read the files a sample record names into MONAI MetaTensors.

    A record (built by the site's loader, :func:`~fedbone_med.data.loading.sample_record`) names
    the image file in ``"image"``, the mask files in ``"label"`` and how to read them in
    ``"sample"``. The step reads them with this project's readers (raster, DICOM, NIfTI B-scans,
    npz items; :func:`~fedbone_med.data.loading.load_item`), so that check-data and training
    read files with one implementation, and returns the arrays in their stored layout with
    ``original_channel_dim`` in their metadata, as MONAI's ``LoadImaged`` does, for the
    ``EnsureChannelFirstd`` step that follows. A file that fails a check raises
    :class:`~fedbone_med.data.loading.SampleError` with check-data's message.

    ``keys`` must list ``"image"``, and ``"label"`` if the data set has masks (a record of a
    classification sample has no ``"label"`` entry: its class is attached after the chain).
    The last OCT volume read is kept, since a volume's B-scans are consecutive samples.
    """

    def __init__(self, keys: Sequence[str] = ("image", "label"), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        names = {str(k) for k in self.keys}
        if "image" not in names or not names <= {"image", "label"}:
            raise ConfigError(f"LoadSampled: keys must be ['image'] or ['image', 'label'], got {sorted(names)}")
        self._cache = VolumeCache()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        item = d.pop(SAMPLE_KEY, None)
        if not isinstance(item, FileItem | ArchiveItem):
            raise ConfigError("LoadSampled: the record names no sample to read; LoadSampled must be the first step "
                              "of a data.pipeline, and cannot run in a data.augment chain")
        loaded = load_item(item, self._cache)
        d["image"] = MetaTensor(torch.from_numpy(np.ascontiguousarray(loaded.image)),
                                meta={"original_channel_dim": loaded.channel_dim})
        if loaded.label is not None:
            if "label" not in self.keys:
                raise ConfigError("LoadSampled: the data set has masks; list 'label' in its keys")
            d["label"] = MetaTensor(torch.from_numpy(loaded.label), meta={"original_channel_dim": 0})
        return d


@TRANSFORMS.register("FundusFOVCropd")
class FundusFOVCropd(MapTransform):
    """Crop every key to the bounding box of the fundus camera's circular field of view.

    The field of view is where the mean over channels of ``source_key`` exceeds
    ``threshold`` (fundus photographs are black outside it). A square box centred on the
    field is taken (padded with zeros where it leaves the image), so a later resize keeps
    the disc round. An image with no field of view (all dark) is a DataError.
    """

    def __init__(self, keys: Sequence[str], source_key: str = "image", threshold: float = 0.04,
                 margin: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key, self.threshold, self.margin = source_key, threshold, margin

    def _box(self, image: np.ndarray) -> tuple[int, int, int]:
        fov = np.asarray(image, dtype=np.float32).mean(axis=0) > self.threshold  # (H, W)
        rows, cols = np.flatnonzero(fov.any(axis=1)), np.flatnonzero(fov.any(axis=0))
        if rows.size == 0:
            raise DataError("field-of-view crop: the image has no pixel above the threshold (all dark?)")
        cy, cx = (rows[0] + rows[-1]) // 2, (cols[0] + cols[-1]) // 2
        half = max(rows[-1] - rows[0], cols[-1] - cols[0]) // 2 + self.margin
        return int(cy), int(cx), int(half)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        cy, cx, half = self._box(np.asarray(d[self.source_key]))
        for key in self.key_iterator(d):
            arr = np.asarray(d[key])
            c, h, w = arr.shape
            out = np.zeros((c, 2 * half, 2 * half), dtype=arr.dtype)
            y0, x0 = cy - half, cx - half
            sy0, sx0 = max(0, y0), max(0, x0)
            sy1, sx1 = min(h, cy + half), min(w, cx + half)
            out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[:, sy0:sy1, sx0:sx1]
            d[key] = out
        return d


@TRANSFORMS.register("SpeckleNoised")
class SpeckleNoised(Randomizable, MapTransform):
    """OCT-style multiplicative speckle: x * g, g ~ Gamma(looks, 1/looks) (mean 1), clipped to [0, 1]."""

    def __init__(self, keys: Sequence[str], prob: float = 0.5, looks: float = 8.0,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not 0.0 <= prob <= 1.0 or looks <= 0:
            raise ConfigError("SpeckleNoised: prob must be in [0, 1] and looks > 0")
        self.prob, self.looks = prob, looks

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.R.random_sample() >= self.prob:
            return d
        for key in self.key_iterator(d):
            arr = np.asarray(d[key], dtype=np.float32)
            gain = self.R.gamma(self.looks, 1.0 / self.looks, size=arr.shape).astype(np.float32)
            d[key] = np.clip(arr * gain, 0.0, 1.0)
        return d


# Albumentations transforms a pipeline may use through the bridge below.
_ALBU_ALLOWED = (
    "HorizontalFlip",
    "VerticalFlip",
    "Rotate",
    "Affine",
    "RandomRotate90",
    "RandomBrightnessContrast",
    "CLAHE",
    "GaussNoise",
    "HueSaturationValue",
    "RandomGamma",
)


@TRANSFORMS.register("Albumentationsd")
class Albumentationsd(Randomizable, MapTransform):
    """Run an albumentations pipeline on an image and its masks, aligned, inside MONAI.

    ``ops`` is a list of ``{name = "...", ...kwargs}`` tables naming albumentations
    transforms from an allow-list. The image (C, H, W) float in [0, 1] is handed to
    albumentations as (H, W, C) uint8 (CLAHE and colour ops need 8-bit) and returned as
    float32 in [0, 1]; masks (C, H, W) integer go as (H, W) per channel, transformed with
    the same random parameters and nearest-neighbour interpolation. Randomness comes from
    MONAI's ``set_random_state``, so a seeded pipeline is reproducible.
    """

    def __init__(self, keys: Sequence[str], ops: Sequence[Mapping[str, Any]], image_key: str = "image",
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        import albumentations as A  # lazy: pulls in OpenCV

        built = []
        for i, op in enumerate(ops):
            spec = dict(op)
            name = spec.pop("name", None)
            if name not in _ALBU_ALLOWED:
                raise ConfigError(
                    f"Albumentationsd.ops[{i}]: {name!r} is not an allowed albumentations transform; "
                    f"allowed: {', '.join(_ALBU_ALLOWED)}"
                )
            built.append(_construct(getattr(A, name), spec, f"Albumentationsd.ops[{i}] ({name})"))
        self.image_key = image_key
        self.compose = A.Compose(built, strict=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.compose.set_random_seed(int(self.R.randint(0, 2**31 - 1)))
        image = np.asarray(d[self.image_key], dtype=np.float32)  # (C, H, W)
        hwc = np.ascontiguousarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0))
        mask_keys = [k for k in self.key_iterator(d) if k != self.image_key]
        masks = [np.asarray(d[k]) for k in mask_keys]
        flat = [m[c] for m in masks for c in range(m.shape[0])]  # each (H, W)
        out = self.compose(image=hwc, masks=flat) if flat else self.compose(image=hwc)
        d[self.image_key] = out["image"].transpose(2, 0, 1).astype(np.float32) / 255.0
        i = 0
        for k, m in zip(mask_keys, masks, strict=True):
            d[k] = np.stack(out["masks"][i : i + m.shape[0]]).astype(m.dtype)
            i += m.shape[0]
        return d


def _construct(factory: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> Any:
    for key, value in kwargs.items():
        if not _is_plain(value):
            raise ConfigError(f"{where}: argument {key!r} must be a number, string, boolean or list of them")
    try:
        return factory(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid arguments ({exc})") from None


def _is_plain(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):  # nested tables, e.g. Albumentationsd ops
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def build_transforms(chain: Sequence[Mapping[str, Any]], *, seed: int | None = None) -> mt.Compose:
    """A MONAI ``Compose`` from a list of ``{name, **kwargs}`` tables (see the module docstring)."""
    built = []
    for i, entry in enumerate(chain):
        spec = dict(entry)
        name = spec.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"transform[{i}]: needs a 'name'")
        factory = TRANSFORMS.get(name)
        spec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()}
        built.append(_construct(factory, spec, f"transform[{i}] ({name})"))
    compose = mt.Compose(built)
    if seed is not None:
        compose.set_random_state(seed=seed)
    return compose


def to_tensor_pair(d: Mapping[Hashable, Any], image_key: str = "image", label_key: str = "label") -> tuple[
    torch.Tensor, torch.Tensor
]:
    """(image float32 (C, H, W), label tensor) from a transformed sample dict."""
    image = torch.as_tensor(np.asarray(d[image_key]), dtype=torch.float32)
    label = torch.as_tensor(np.asarray(d[label_key]))
    return image, label
