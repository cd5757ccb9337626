"""Turn one file into numpy arrays: raster images and masks, DICOM, NIfTI volumes, NumPy archives.

Every reader takes a path and returns numpy arrays; images are float32 in [0, 1] (unless
``raw=True``), masks and labels are integer arrays. Anything wrong with a file raises
:class:`~fedbone_med.errors.DataError` naming the file and the check that failed; messages never
contain pixel values or DICOM header values (see :mod:`fedbone_med.errors`).

* :func:`read_image` -- JPEG, PNG, TIFF, GIF, PPM/PGM/PBM, BMP through Pillow (tifffile for
  TIFFs Pillow cannot open); 8- and 16-bit; palette images become RGB. The EXIF orientation
  tag is *not* applied (masks drawn on the stored pixels stay aligned); a multi-frame GIF or
  TIFF gives its first frame. 16-bit colour TIFFs go through tifffile (Pillow would reduce them
  to 8 bits); 16-bit colour PNGs are read at 8-bit precision (a Pillow limitation).
* :func:`read_mask` -- binary (1-bit, greyscale > threshold, palette index > 0), index (palette
  indices / grey values kept as class ids) or colour (RGB colour -> class id via ``color_map``).
* :func:`read_dicom` -- see :mod:`fedbone_med.data.dicom`.
* :func:`read_nifti` / :func:`read_nifti_labels` -- a volume as (N, H, W) slices along ``axis``.
* :func:`read_npz` -- images and labels from a NumPy archive, never unpickling.

:data:`READERS` maps a format name to its reader and :func:`detect_format` finds the format
from magic bytes, then the file extension. pydicom, nibabel and tifffile are imported lazily.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedbone_med.data.dicom import DicomImage, read_dicom
from fedbone_med.errors import DataError

__all__ = [
    "READERS",
    "DicomImage",
    "check_same_shape",
    "detect_format",
    "read_color_map",
    "read_dicom",
    "read_image",
    "read_mask",
    "read_nifti",
    "read_nifti_labels",
    "read_npz",
]

Color = tuple[int, int, int]
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as Pillow's "L" conversion
NIFTI_PERCENTILES = (0.5, 99.5)


def _require_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    return p


# --------------------------------------------------------------------------- raster files
def _load_raster(p: Path, *, palette_to_rgb: bool) -> tuple[np.ndarray, str]:
    """(first frame as a native-byte-order array, Pillow mode or "" when tifffile read it).

    Pillow first; tifffile for TIFFs Pillow cannot open or would reduce to 8 bits.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im.seek(0)
            im.load()
            if not _pil_reduced_tiff(im):
                return _native(_pil_array(im, palette_to_rgb=palette_to_rgb)), im.mode
        pil_error = "Pillow reduces colour TIFFs of more than 8 bits per sample to 8 bits"
    except Image.DecompressionBombError:
        raise DataError(f"{p}: image is larger than Pillow's decompression-bomb limit; check the file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        pil_error = f"{type(exc).__name__}: {exc}"
    if p.suffix.lower() in (".tif", ".tiff") or _magic(p) == "tiff":
        try:
            import tifffile

            arr = np.asarray(tifffile.imread(p, key=0))
        except Exception as exc:
            raise DataError(
                f"{p}: unreadable TIFF (Pillow: {pil_error}; tifffile: {type(exc).__name__}: {exc})"
            ) from None
        if arr.size == 0:
            raise DataError(f"{p}: unreadable TIFF (Pillow: {pil_error}; tifffile: no image data)")
        return _native(arr), ""
    raise DataError(f"{p}: unreadable image (Pillow check failed: {pil_error})")


def _pil_reduced_tiff(im: Any) -> bool:
    """True for a colour TIFF with > 8 bits per sample, which Pillow silently reads as 8-bit."""
    if im.format != "TIFF" or im.mode not in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
        return False
    bits = im.tag_v2.get(258, (8,))  # BitsPerSample
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(int(b) for b in bits) > 8


def _scale_array(a: np.ndarray, p: Path) -> np.ndarray:
    """Integer / bool / float array -> float32 [0, 1] by its dtype's range."""
    if a.dtype == bool:
        return a.astype(np.float32)
    if a.dtype in (np.uint8, np.uint16):
        return (a.astype(np.float32) / float(np.iinfo(a.dtype).max)).astype(np.float32)
    if a.dtype.kind in "iu":  # Pillow mode "I" (32-bit) holds 16-bit PNG/TIFF data
        lo, hi = int(a.min(initial=0)), int(a.max(initial=0))
        if lo < 0 or hi > 65535:
            raise DataError(f"{p}: {a.dtype} image has values outside 0..65535; convert it to 8 or 16 bit")
        return (a.astype(np.float32) / 65535.0).astype(np.float32)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or float(a.min(initial=0.0)) < 0.0 or float(a.max(initial=0.0)) > 1.0:
            raise DataError(f"{p}: floating-point image has values outside [0, 1] or non-finite values")
        return a.astype(np.float32)
    raise DataError(f"{p}: unsupported pixel type {a.dtype}")


def _native(a: np.ndarray) -> np.ndarray:
    """The same values in native byte order (Pillow "I;16B" and big-endian TIFFs are not)."""
    return a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder not in ("=", "|") else a


def _pil_array(im: Any, *, palette_to_rgb: bool) -> np.ndarray:
    """PIL image -> ndarray; palette (and exotic) modes converted to RGB if asked."""
    mode = im.mode
    if mode in ("P", "PA") and palette_to_rgb:
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    a = np.asarray(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBX", "RGBa", "La"):  # drop alpha / padding
        a = a[..., :-1] if im.mode != "PA" else a[..., 0]
    return a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a


def read_image(path: str | Path, *, mode: Literal["rgb", "grey", "keep"] = "rgb", raw: bool = False) -> np.ndarray:
    """A raster image as (H, W, 3) (``rgb``), (H, W) (``grey``, BT.601 luma) or as stored (``keep``).

    float32 in [0, 1] scaled by the bit depth (8 or 16 bit); ``raw=True`` keeps the stored dtype
    (uint8 / uint16 / bool; for ``grey`` from colour, float32 luma in stored units).
    """
    if mode not in ("rgb", "grey", "keep"):
        raise DataError(f"read_image mode must be 'rgb', 'grey' or 'keep', got {mode!r}")
    p = _require_file(path)
    a, _ = _load_raster(p, palette_to_rgb=True)
    if a.ndim == 3 and a.shape[2] == 4:  # tifffile RGBA
        a = a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise DataError(f"{p}: expected a 2-D grey or 3-channel colour image, got array shape {a.shape}")
    out = a if raw else _scale_array(a, p)
    if mode == "rgb" and out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)  # (H, W, 3)
    elif mode == "grey" and out.ndim == 3:
        out = (out.astype(np.float32) @ _LUMA).astype(np.float32)  # (H, W)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------- masks
def _check_color_map(color_map: object) -> dict[Color, int]:
    if not isinstance(color_map, dict) or not color_map:
        raise DataError("kind='color' needs a non-empty color_map {(r, g, b): class_id}")
    out: dict[Color, int] = {}
    for key, cls in color_map.items():
        ok = isinstance(key, tuple) and len(key) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in key)
        if not ok or not isinstance(cls, int) or isinstance(cls, bool) or not 0 <= cls <= 255:
            raise DataError(f"color_map entry {key!r}: {cls!r} must map an (r, g, b) tuple of 0..255 to a class 0..255")
        out[key] = cls
    return out


def read_mask(
    path: str | Path,
    *,
    kind: Literal["binary", "index", "color"] = "binary",
    threshold: float | int = 0.5,
    color_map: dict[Color, int] | None = None,
    unknown: Literal["error", "background"] = "error",
) -> np.ndarray:
    """A mask as (H, W) uint8.

    * ``binary``: 1-bit -> {0, 1}; palette -> index > 0; grey/colour -> value > ``threshold``
      (a float is a fraction of full scale, an int compares stored values; colour uses the
      largest channel).
    * ``index``: palette indices or grey values kept as class ids (palettes are not applied).
    * ``color``: each RGB colour mapped through ``color_map``; pixels of other colours raise
      DataError with their count, or become 0 with ``unknown="background"``.
    """
    if kind not in ("binary", "index", "color"):
        raise DataError(f"read_mask kind must be 'binary', 'index' or 'color', got {kind!r}")
    if unknown not in ("error", "background"):
        raise DataError(f"unknown must be 'error' or 'background', got {unknown!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise DataError(f"threshold must be a number, got {type(threshold).__name__}")
    cmap = _check_color_map(color_map) if kind == "color" else None
    p = _require_file(path)
    a, pil_mode = _load_raster(p, palette_to_rgb=kind == "color")
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise DataError(f"{p}: expected a 2-D or RGB mask, got array shape {a.shape}")

    if kind == "color":
        if cmap is None or a.ndim != 3 or a.dtype != np.uint8:
            raise DataError(f"{p}: kind='color' needs an 8-bit RGB or palette mask, got {a.dtype} shape {a.shape}")
        return _map_colors(a, cmap, p, unknown)
    if kind == "index":
        if a.ndim == 3:
            raise DataError(f"{p}: colour mask cannot be read as class indices; use kind='color' with a color_map")
        if a.dtype != bool and (a.dtype.kind not in "iu" or int(a.min(initial=0)) < 0 or int(a.max(initial=0)) > 255):
            raise DataError(f"{p}: class ids must be integers 0..255, got {a.dtype} data outside that range")
        return np.ascontiguousarray(a.astype(np.uint8))
    # binary
    if a.dtype == bool:
        return a.astype(np.uint8)
    if pil_mode in ("P", "PA"):
        return (a > 0).astype(np.uint8)
    if a.ndim == 3:
        a = a.max(axis=2)  # (H, W)
    if isinstance(threshold, float):
        if not 0.0 <= threshold < 1.0:
            raise DataError(f"a float threshold is a fraction of full scale and must be in [0, 1), got {threshold}")
        return (_scale_array(a, p) > threshold).astype(np.uint8)
    return (a > threshold).astype(np.uint8)


def _map_colors(a: np.ndarray, cmap: dict[Color, int], p: Path, unknown: str) -> np.ndarray:
    key = (a[..., 0].astype(np.uint32) << 16) | (a[..., 1].astype(np.uint32) << 8) | a[..., 2]  # (H, W)
    keys = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in cmap), np.uint32)
    classes = np.array([cmap[((k >> 16) & 255, (k >> 8) & 255, k & 255)] for k in keys.tolist()], np.uint8)
    pos = np.clip(np.searchsorted(keys, key), 0, len(keys) - 1)
    known = keys[pos] == key
    out = np.where(known, classes[pos], 0).astype(np.uint8)
    n_bad = int(known.size - np.count_nonzero(known))
    if n_bad and unknown == "error":
        n_colors = len(np.unique(key[~known]))
        raise DataError(
            f"{p}: {n_bad} of {known.size} pixels have {n_colors} colour(s) not in the colour map "
            f"({len(cmap)} colours); fix the mask or pass unknown='background' to map them to class 0"
        )
    return out


def read_color_map(path: str | Path) -> tuple[dict[Color, int], list[str]]:
    """Parse a colour legend with lines ``(r,g,b)  NAME  description``; class ids follow line order.

    Returns ``({(r, g, b): class_id}, [name of class 0, name of class 1, ...])``; other lines are ignored.
    """
    p = _require_file(path)
    cmap: dict[Color, int] = {}
    names: list[str] = []
    for line in p.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)\s+(\S+)", line)
        if not m:
            continue
        rgb = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        if max(rgb) > 255 or rgb in cmap:
            raise DataError(f"{p}: colour legend has an out-of-range or repeated colour on line {line.strip()[:40]!r}")
        cmap[rgb] = len(names)
        names.append(m.group(4))
    if not cmap:
        raise DataError(f"{p}: no '(r,g,b) name' lines found in the colour legend")
    return cmap, names


# --------------------------------------------------------------------------- NIfTI
def _nifti_volume(path: str | Path, axis: int) -> tuple[Path, np.ndarray]:
    """(N, H, W) slices of a 3-D NIfTI volume (a trailing singleton 4th axis is dropped)."""
    p = _require_file(path)
    import nibabel as nib

    try:
        img: Any = nib.load(p)
        vol = np.asanyarray(img.dataobj)  # stored dtype, scl_slope/inter applied when set
    except Exception as exc:
        raise DataError(f"{p}: unreadable NIfTI file (nibabel: {type(exc).__name__}: {exc})") from None
    while vol.ndim > 3 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise DataError(f"{p}: expected a 3-D volume, got {vol.ndim} axes with shape {vol.shape}")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -3 <= axis < 3:
        raise DataError(f"axis must be 0, 1 or 2, got {axis!r}")
    return p, np.ascontiguousarray(np.moveaxis(vol, axis, 0))  # (N, H, W)


def read_nifti(
    path: str | Path, *, axis: int = 2, scale: Literal["percentile", "dtype", "minmax"] = "percentile"
) -> np.ndarray:
    """A NIfTI volume as (N, H, W) float32 slices along ``axis`` (B-scans), scaled to [0, 1].

    ``scale``: ``percentile`` (default) maps the 0.5th..99.5th percentile of the whole volume
    to 0..1 and clips, robust to speckle and saturated voxels; ``minmax`` uses the data range;
    ``dtype`` divides unsigned 8/16-bit data by 255 / 65535 (lossless for stored 8-bit scans).
    A constant volume gives zeros.
    """
    if scale not in ("percentile", "dtype", "minmax"):
        raise DataError(f"scale must be 'percentile', 'dtype' or 'minmax', got {scale!r}")
    p, vol = _nifti_volume(path, axis)
    if scale == "dtype":
        if vol.dtype not in (np.uint8, np.uint16):
            raise DataError(f"{p}: scale='dtype' needs uint8 or uint16 data, got {vol.dtype}; use 'percentile'")
        return _scale_array(vol, p)
    data = vol.astype(np.float32)
    if not np.isfinite(data).all():
        raise DataError(f"{p}: volume has NaN or infinite voxels")
    if scale == "percentile":
        lo, hi = (float(v) for v in np.percentile(data, NIFTI_PERCENTILES))
    else:
        lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros_like(data)
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def read_nifti_labels(path: str | Path, axis: int = 2) -> np.ndarray:
    """A NIfTI label volume as (N, H, W) uint8 class ids (float storage allowed if integral)."""
    p, vol = _nifti_volume(path, axis)
    if vol.dtype.kind == "f":
        if not np.isfinite(vol).all() or not np.array_equal(vol, np.round(vol)):
            raise DataError(f"{p}: label volume holds non-integer values; labels must be class ids 0..255")
    elif vol.dtype.kind not in "biu":
        raise DataError(f"{p}: label volume has unsupported type {vol.dtype}")
    if vol.size and (float(vol.min()) < 0 or float(vol.max()) > 255):
        raise DataError(f"{p}: label volume has class ids outside 0..255")
    return vol.astype(np.uint8)


def check_same_shape(*arrays: np.ndarray, names: tuple[str, ...] | list[str] | None = None) -> None:
    """Raise DataError unless all arrays have the same shape (e.g. a volume and its labels)."""
    if names is not None and len(names) != len(arrays):
        raise DataError(f"check_same_shape got {len(arrays)} arrays but {len(names)} names")
    labels = list(names) if names is not None else [f"array {i}" for i in range(len(arrays))]
    shapes = [tuple(np.shape(a)) for a in arrays]
    if len(set(shapes)) > 1:
        listing = ", ".join(f"{n} {s}" for n, s in zip(labels, shapes, strict=True))
        raise DataError(f"shapes do not match: {listing}; images and labels must cover the same voxels")


# --------------------------------------------------------------------------- NumPy archives
def read_npz(path: str | Path, *, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) or (N, H, W, C) float32 [0, 1] and labels from an ``.npz`` archive.

    Never unpickles (``allow_pickle=False``). A labels array of shape (N, 1) is returned as (N,).
    """
    p = _require_file(path)
    try:
        with p.open("rb") as fh:  # we own fh, so it is closed even when numpy fails
            npz = np.load(fh, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DataError(f"{p}: not an npz archive (a single .npy array); save images and labels with np.savez")
            present = sorted(npz.files)
            missing = [k for k in (images_key, labels_key) if k not in present]
            if missing:
                raise DataError(f"{p}: key(s) {missing} not in archive; keys present: {present}")
            images, labels = npz[images_key], npz[labels_key]
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(f"{p}: npz contains Python objects; refusing to unpickle") from None
        raise DataError(f"{p}: unreadable npz ({type(exc).__name__})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{p}: unreadable npz archive ({type(exc).__name__})") from None
    if images.ndim not in (3, 4):
        raise DataError(f"{p}: {images_key!r} must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # (N,)
    if labels.shape[:1] != images.shape[:1]:
        raise DataError(f"{p}: {images_key!r} has {images.shape[0]} items but {labels_key!r} has shape {labels.shape}")
    return _scale_array(images, p), labels


# --------------------------------------------------------------------------- format detection
READERS: dict[str, Callable[..., Any]] = {
    "png": read_image,
    "jpeg": read_image,
    "tiff": read_image,
    "gif": read_image,
    "ppm": read_image,
    "bmp": read_image,
    "dicom": read_dicom,
    "nifti": read_nifti,
    "npz": read_npz,
}
_EXTENSIONS = {
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".gif": "gif",
    ".ppm": "ppm", ".pgm": "ppm", ".pbm": "ppm", ".pnm": "ppm", ".bmp": "bmp", ".dcm": "dicom",
    ".dicom": "dicom", ".nii": "nifti", ".nii.gz": "nifti", ".npz": "npz",
}  # fmt: skip


def _magic(p: Path) -> str | None:
    """Format from the first bytes of the file, or None."""
    with p.open("rb") as fh:
        head = fh.read(352)
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "ppm"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    return None


def detect_format(path: str | Path) -> str:
    """Format name (a key of :data:`READERS`) from magic bytes, else the extension."""
    p = _require_file(path)
    found = _magic(p)
    if found is not None:
        return found
    name = p.name.lower()
    ext = ".nii.gz" if name.endswith(".nii.gz") else p.suffix.lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    raise DataError(
        f"{p}: unrecognised file format; supported: {', '.join(sorted(READERS))} "
        f"(extensions {', '.join(sorted(_EXTENSIONS))})"
    )
