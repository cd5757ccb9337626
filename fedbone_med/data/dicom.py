"""Read one DICOM file (ophthalmic photography, ophthalmic tomography) into a float array.

:func:`read_dicom` returns a :class:`DicomImage`: the pixels scaled to [0, 1] plus the few
header fields a pipeline needs (modality, SOP class name, photometric interpretation, frame
count, bits stored). It never returns or reports patient attributes (names, IDs, dates): error
messages name the file, the check that failed and attribute *names*, never header values or
pixel values.

Supported pixel encodings:

* ``RGB`` (Ophthalmic Photography 8/16 bit), ``YBR_FULL`` and ``YBR_FULL_422`` (converted to RGB
  with :func:`pydicom.pixels.convert_color_space`; pydicom expands native 4:2:2 data to full
  resolution first), ``PALETTE COLOR`` (through :func:`pydicom.pixels.apply_color_lut`);
* ``MONOCHROME2`` and ``MONOCHROME1`` (inverted so that bright is always 1), one or many frames
  (Ophthalmic Tomography: one frame per B-scan), 8 to 16 bits stored, unsigned or signed.

Compressed transfer syntaxes are decoded by whatever pydicom pixel-data plugin is installed;
when none is, the error names the transfer syntax and the packages to install (taken from
pydicom's own decoder registry). Modality/rescale LUTs are *not* applied: photographs and OCT
frames carry display values, and scaling uses ``BitsStored``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbone_med.errors import DataError

_REQUIRED = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PhotometricInterpretation")
_PIP_NAMES = {"gdcm": "python-gdcm"}  # pydicom names the import, pip wants the distribution


@dataclass(frozen=True)
class DicomImage:
    """Pixels and non-identifying header fields of one DICOM instance."""

    pixels: np.ndarray  # float32 [0, 1]: (H, W) | (F, H, W) grey, (H, W, 3) | (F, H, W, 3) colour
    modality: str  # e.g. "OP", "OPT"; "" if absent
    sop_class: str  # SOP class *name*, e.g. "Ophthalmic Tomography Image Storage"
    sop_class_uid: str
    photometric: str  # of the stored data, e.g. "YBR_FULL_422" (pixels are always RGB or grey)
    frames: int  # frames in the file (not in ``pixels`` when one frame was requested)
    bits_stored: int
    transfer_syntax: str  # name, e.g. "Explicit VR Little Endian"


def _require_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    return p


def _install_hint(ts: Any) -> str | None:
    """None if a decoder for transfer syntax ``ts`` is installed, else what to install."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return "pydicom has no decoder for it at all; convert the file to an uncompressed transfer syntax"
    if decoder.is_available:
        return None
    options = []
    for dep in decoder.missing_dependencies:  # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"
        plugin, _, need = dep.partition(" - requires ")
        need = (need or plugin).strip()
        for imp, pip_name in _PIP_NAMES.items():
            if need.startswith(imp + ">") or need == imp:
                need = pip_name + need[len(imp) :]
        options.append(need)
    if not options:
        return "no pydicom plugin can decode it; convert the file to an uncompressed transfer syntax"
    return "install one of: " + "; ".join(options)


def _expected_bytes(ds: Any, frames: int) -> int:
    rows, cols, spp, bits = int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel), int(ds.BitsAllocated)
    if str(ds.PhotometricInterpretation) == "YBR_FULL_422":
        per_frame_bits = rows * cols * 2 * bits  # 4:2:2 -> two samples per pixel on average
    else:
        per_frame_bits = rows * cols * spp * bits
    if bits == 1:
        return (per_frame_bits * frames + 7) // 8
    return per_frame_bits * frames // 8


def _scale(arr: np.ndarray, photometric: str, bits_stored: int, signed: bool) -> np.ndarray:
    """Stored values -> float32 [0, 1]; MONOCHROME1 inverted."""
    top = float(2**bits_stored - 1)
    out = arr.astype(np.float32)
    if signed:
        out += float(2 ** (bits_stored - 1))
    out = np.clip(out / top, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32, copy=False)


def read_dicom(path: str | Path, *, frame: int | None = None) -> DicomImage:
    """Read a DICOM file; ``frame`` selects one frame (0-based) of a multi-frame instance.

    Raises :class:`DataError` for a missing file, a file without the ``DICM`` preamble, no or
    truncated pixel data, a missing image attribute, an undecodable transfer syntax or an
    unsupported photometric interpretation.
    """
    import pydicom
    from pydicom.pixels import apply_color_lut, convert_color_space, get_decoder

    p = _require_file(path)
    with p.open("rb") as fh:
        head = fh.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise DataError(f"{p}: not a DICOM file (no DICM preamble at byte 128)")
    try:
        ds = pydicom.dcmread(p)
    except Exception as exc:  # pydicom raises many types; its messages may quote header bytes
        raise DataError(f"{p}: DICOM header could not be parsed ({type(exc).__name__}); file may be corrupt") from None
    if "PixelData" not in ds:
        raise DataError(f"{p}: DICOM file has no pixel data (no PixelData element; the file may be truncated)")
    missing = [k for k in _REQUIRED if k not in ds or ds[k].value in (None, "")]
    if missing:
        raise DataError(f"{p}: DICOM image attribute(s) missing: {', '.join(missing)}")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise DataError(f"{p}: DICOM file meta has no TransferSyntaxUID")
    ts = meta.TransferSyntaxUID
    ts_name = ts.name
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.PhotometricInterpretation).strip()
    bits_stored = int(ds.get("BitsStored", ds.BitsAllocated))
    if frame is not None and not 0 <= frame < frames:
        raise DataError(f"{p}: frame {frame} requested but the file has {frames} frame(s)")

    if ts.is_compressed:
        hint = _install_hint(ts)
        if hint is not None:
            raise DataError(f"{p}: cannot decode pixel data with transfer syntax {ts_name!r} ({ts}): {hint}")
    else:
        expected, found = _expected_bytes(ds, frames), len(ds.PixelData)
        if found < expected:
            raise DataError(f"{p}: pixel data is truncated: expected {expected} bytes, found {found}")
    try:
        decoder = get_decoder(ts)
        opts: dict[str, Any] = {"as_rgb": False}  # colour conversion is done below, explicitly
        arr, info = decoder.as_array(ds, index=frame, **opts)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{p}: pixel data could not be decoded with transfer syntax {ts_name!r} ({type(exc).__name__}); "
            "the compressed stream may be corrupt"
        ) from None
    decoded_pi = str(info.get("photometric_interpretation", photometric))
    signed = int(ds.get("PixelRepresentation", 0)) == 1

    if decoded_pi in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, "YBR_FULL", "RGB", per_frame=frame is None and frames > 1)
        pixels = _scale(arr, "RGB", bits_stored, signed)
    elif decoded_pi in ("RGB", "YBR_ICT", "YBR_RCT"):  # ICT/RCT: the JPEG 2000 codec has already undone them
        pixels = _scale(arr, "RGB", bits_stored, signed)
    elif decoded_pi in ("MONOCHROME1", "MONOCHROME2"):
        pixels = _scale(arr, decoded_pi, bits_stored, signed)
    elif decoded_pi == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:
            raise DataError(f"{p}: PALETTE COLOR lookup table is invalid ({type(exc).__name__})") from None
        lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        pixels = _scale(rgb, "RGB", lut_bits if lut_bits in (8, 16) else 16, False)
    else:
        raise DataError(
            f"{p}: unsupported photometric interpretation {decoded_pi!r}; supported: RGB, YBR_FULL, "
            "YBR_FULL_422, MONOCHROME1, MONOCHROME2, PALETTE COLOR"
        )
    sop_uid = str(ds.get("SOPClassUID", ""))
    return DicomImage(
        pixels=pixels,
        modality=str(ds.get("Modality", "")),
        sop_class=pydicom.uid.UID(sop_uid).name if sop_uid else "",
        sop_class_uid=sop_uid,
        photometric=photometric,
        frames=frames,
        bits_stored=bits_stored,
        transfer_syntax=ts_name,
    )
