"""Write phantoms as real files so that file readers can be tested without real data.

* PNG (Pillow): 8-bit RGB fundus image; 1-bit masks; an 8-bit palette PNG whose
  pixel indices are the lesion classes (and OCT layer classes).
* DICOM (pydicom 3, explicit VR little endian, with a file meta header):
  Ophthalmic Photography 8 Bit Image (RGB) and Ophthalmic Tomography Image
  (multi-frame MONOCHROME2, one frame per B-scan, 8-bit).
* NIfTI-1 (nibabel): a volume of stacked B-scans and the matching label volumes.

Images are quantised to 8 bits with ``round(255 * value)`` (:func:`to_uint8`), so a
round trip through any of these formats is exact on the quantised data.

All metadata is synthetic and obviously non-identifying: patient name
``PHANTOM^<kind>``, a caller-chosen ID (default ``PHANTOM``), dates 2000-01-01,
sex ``O``, "Patient Identity Removed" = YES. UIDs are derived from the pixel data, so
the same phantom always gives byte-identical files. Not written: DICOM compression,
ICC profiles, real device geometry or en-face/fundus references for OCT.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from fedbone_med.data.phantom_fundus import LESION_CLASSES, FundusPhantom
from fedbone_med.data.phantom_oct import LAYER_CLASSES, OCTPhantom
from fedbone_med.errors import DataError

OP_8BIT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OPT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as used by generate_uid
_DATE, _TIME = "20000101", "000000"
OCT_WIDTH_MM, OCT_DEPTH_MM, OCT_SLOW_SPAN_MM = 6.0, 2.0, 6.0 * 0.6  # nominal scan geometry

# palette: lesion classes 0..4 then OCT layer classes 0..8 reuse the first entries
_PALETTE = [
    (0, 0, 0),
    (220, 30, 30),
    (150, 0, 80),
    (255, 230, 0),
    (180, 220, 255),
    (0, 160, 255),
    (0, 200, 120),
    (255, 128, 0),
    (255, 0, 255),
]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float image in [0, 1] -> uint8 with round(255 * value)."""
    return np.round(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _write_palette_png(labels: np.ndarray, path: Path) -> None:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    flat = [c for rgb in _PALETTE for c in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    im.save(path)


def write_fundus_png(ph: FundusPhantom, image_path: str | Path, masks_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``image_path`` (8-bit RGB PNG) and, if ``masks_dir`` is given, masks named
    ``<stem>_{fov,vessels,disc,cup,neovascular}.png`` (1-bit) and ``<stem>_lesions.png``
    (8-bit palette PNG; pixel index = lesion class, see LESION_CLASSES).

    Returns the written paths by name (``image``, ``vessels``, ...).
    """
    from PIL import Image

    image_path = Path(image_path)
    if ph.image.ndim != 3 or ph.image.shape[2] != 3:
        raise DataError(f"fundus image must be (H, W, 3), got shape {ph.image.shape}")
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(ph.image)).save(image_path)
    out = {"image": image_path}
    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        masks_dir.mkdir(parents=True, exist_ok=True)
        stem = image_path.stem
        masks = {"fov": ph.fov, "vessels": ph.vessels, "disc": ph.disc, "cup": ph.cup}
        if ph.neovascular is not None:
            masks["neovascular"] = ph.neovascular
        for name, m in masks.items():
            p = masks_dir / f"{stem}_{name}.png"
            Image.fromarray(np.asarray(m).astype(bool)).save(p)
            out[name] = p
        p = masks_dir / f"{stem}_lesions.png"
        if int(ph.lesions.max(initial=0)) >= len(LESION_CLASSES):
            raise DataError("lesion map holds a class outside LESION_CLASSES")
        _write_palette_png(ph.lesions, p)
        out["lesions"] = p
    return out


def write_label_png(labels: np.ndarray, path: str | Path) -> Path:
    """Any (H, W) class map with values < 9 (e.g. OCT layers) as an 8-bit palette PNG."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or int(labels.max(initial=0)) >= len(LAYER_CLASSES):
        raise DataError("label map must be 2-D with classes 0..8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_palette_png(labels, path)
    return path


# --------------------------------------------------------------------------- DICOM
def _uid(pixels: bytes, role: str) -> str:
    digest = hashlib.sha256(role.encode() + pixels).hexdigest()
    return _UID_PREFIX + str(int(digest[:24], 16))[:30]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _base_dataset(sop_class: str, pixels: bytes, modality: str, patient_id: str, kind: str) -> FileDataset:
    if not isinstance(patient_id, str) or not 0 < len(patient_id) <= 64:
        raise DataError("patient_id must be a non-empty string of at most 64 characters")
    sop_uid = _uid(pixels, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(_UID_PREFIX + "1")
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    # patient and study: synthetic values only
    ds.PatientName, ds.PatientID = f"PHANTOM^{kind}", patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "SYNTHETIC PHANTOM - NO PATIENT DATA"
    ds.StudyInstanceUID = _uid(pixels, "study")
    ds.StudyDate, ds.StudyTime, ds.StudyID = _DATE, _TIME, "PHANTOM"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.SeriesInstanceUID = _uid(pixels, "series")
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.ContentDate, ds.ContentTime = _DATE, _TIME
    ds.AcquisitionDateTime = _DATE + _TIME
    ds.SynchronizationFrameOfReferenceUID = "1.2.840.10008.15.1.1"  # universal coordinated time
    ds.SynchronizationTrigger, ds.AcquisitionTimeSynchronized = "NO TRIGGER", "N"
    ds.Manufacturer = "fedbone_med synthetic phantom"
    ds.ManufacturerModelName, ds.DeviceSerialNumber, ds.SoftwareVersions = "PHANTOM", "0", "1"
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    ds.AcquisitionContextSequence = []
    ds.AnatomicRegionSequence = [_code("81745001", "SCT", "Eye")]
    ds.PupilDilated, ds.EmmetropicMagnification, ds.IntraOcularPressure = "", None, None
    ds.RefractiveStateSequence = []
    ds.HorizontalFieldOfView = None
    return ds


def write_fundus_dicom(ph: FundusPhantom, path: str | Path, patient_id: str = "PHANTOM") -> Path:
    """Ophthalmic Photography 8 Bit Image (RGB, explicit VR little endian)."""
    img = to_uint8(ph.image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"fundus image must be (H, W, 3), got shape {img.shape}")
    pixels = img.tobytes()
    ds = _base_dataset(OP_8BIT_SOP_CLASS, pixels, "OP", patient_id, "FUNDUS")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageLaterality = ph.laterality if ph.laterality in ("R", "L") else "U"
    ds.PatientOrientation = ""
    ds.PatientEyeMovementCommanded = "NO"
    ds.HorizontalFieldOfView = 45
    ds.AcquisitionDeviceTypeCodeSequence = [_code("409898007", "SCT", "Fundus Camera")]
    ds.IlluminationTypeCodeSequence = []
    ds.LightPathFilterTypeStackCodeSequence = []
    ds.ImagePathFilterTypeStackCodeSequence = []
    ds.LensesCodeSequence = []
    ds.DetectorType = "CCD"
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = img.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels
    return _save(ds, path)


def write_oct_dicom(
    phantoms: Sequence[OCTPhantom], path: str | Path, patient_id: str = "PHANTOM", laterality: str = "R"
) -> Path:
    """Ophthalmic Tomography Image: multi-frame MONOCHROME2, 8 bit, one frame per B-scan
    (frame k is ``phantoms[k]``, In-Stack Position Number k + 1), with pixel measures
    and plane positions from the nominal 6 mm x 2 mm scan; ``laterality`` "R" or "L"."""
    frames = _stack_oct(phantoms)  # (N, H, W)
    n, h, w = frames.shape
    pixels = frames.tobytes()
    ds = _base_dataset(OPT_SOP_CLASS, pixels, "OPT", patient_id, "OCT")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if laterality not in ("R", "L"):
        raise DataError(f"laterality must be 'R' or 'L', got {laterality!r}")
    ds.ImageLaterality = laterality
    ds.FrameOfReferenceUID = _uid(pixels, "for")
    ds.PositionReferenceIndicator = ""
    ds.NumberOfFrames = n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = h, w
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionDuration = 0.0
    ds.AcquisitionNumber = 1
    # Type 1 in the OPT Image module; this instance is not split, so no Concatenation UID
    ds.ConcatenationFrameOffsetNumber, ds.InConcatenationNumber, ds.InConcatenationTotalNumber = 0, 1, 1
    ds.AxialLengthOfTheEye = None
    ds.IlluminationWaveLength = 840.0
    ds.AcquisitionDeviceTypeCodeSequence = [_code("392012008", "SCT", "Optical Coherence Tomography Scanner")]
    ds.LightPathFilterTypeStackCodeSequence = []
    ds.DetectorType = "CCD"
    ds.DimensionOrganizationSequence = [Dataset()]
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = _uid(pixels, "dim")
    idx = Dataset()
    idx.DimensionOrganizationUID = ds.DimensionOrganizationSequence[0].DimensionOrganizationUID
    idx.DimensionIndexPointer = 0x00209057  # In-Stack Position Number
    idx.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    ds.DimensionIndexSequence = [idx]
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [round(OCT_DEPTH_MM / h, 6), round(OCT_WIDTH_MM / w, 6)]
    measures.SliceThickness = round(OCT_SLOW_SPAN_MM * 2 / max(n, 1), 6)
    shared.PixelMeasuresSequence = [measures]
    orient, anatomy = Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 0, 1]  # rows run laterally, columns in depth
    shared.PlaneOrientationSequence = [orient]
    anatomy.AnatomicRegionSequence = [_code("81745001", "SCT", "Eye")]
    anatomy.FrameLaterality = laterality
    shared.FrameAnatomySequence = [anatomy]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in range(n):
        fg, content, pos = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, round(k * float(measures.SliceThickness), 6), 0.0]
        fg.PlanePositionSequence = [pos]
        content.StackID, content.InStackPositionNumber = "1", k + 1
        content.FrameAcquisitionDateTime = _DATE + _TIME
        content.FrameReferenceDateTime = _DATE + _TIME
        content.FrameAcquisitionDuration = 1.0
        content.DimensionIndexValues = [k + 1]
        fg.FrameContentSequence = [content]
        per_frame.append(fg)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = pixels
    return _save(ds, path)


def _save(ds: FileDataset, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- NIfTI
def _stack_oct(phantoms: Sequence[OCTPhantom], what: str = "image") -> np.ndarray:
    """(N, H, W) uint8: quantised images or a label map of every B-scan."""
    if not phantoms:
        raise DataError("need at least one OCT B-scan to write a volume")
    shapes = {p.image.shape for p in phantoms}
    if len(shapes) != 1:
        raise DataError(f"all B-scans of a volume must have the same shape, got {sorted(shapes)}")
    if what == "image":
        return np.stack([to_uint8(p.image) for p in phantoms])
    return np.stack([np.asarray(getattr(p, what), np.uint8) for p in phantoms])


def _write_nifti(vol: np.ndarray, path: str | Path, description: str) -> Path:
    import nibabel as nib

    n, h, w = vol.shape
    data = np.ascontiguousarray(vol.transpose(1, 2, 0))  # (H, W, N): depth, lateral, B-scan
    spacing = (OCT_DEPTH_MM / h, OCT_WIDTH_MM / w, OCT_SLOW_SPAN_MM * 2 / max(n, 1))
    img = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description[:79].encode()
    img.set_qform(np.diag([*spacing, 1.0]), code=1)
    img.set_sform(np.diag([*spacing, 1.0]), code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def write_oct_nifti(phantoms: Sequence[OCTPhantom], path: str | Path) -> Path:
    """NIfTI-1 uint8 volume of quantised B-scans, array axes (depth, lateral, B-scan):
    ``volume[:, :, k] == to_uint8(phantoms[k].image)``; voxel sizes from the nominal
    6 mm x 2 mm scan. Use a ``.nii`` or ``.nii.gz`` path."""
    return _write_nifti(_stack_oct(phantoms), path, "fedbone_med OCT phantom; axes depth,lateral,bscan")


def write_oct_label_nifti(phantoms: Sequence[OCTPhantom], path: str | Path, which: str = "layers") -> Path:
    """The matching label volume (same axes and geometry as :func:`write_oct_nifti`):
    ``which`` = ``"layers"`` (classes of LAYER_CLASSES, fluid = 8), ``"fluid"`` or ``"drusen"``."""
    if which not in ("layers", "fluid", "drusen"):
        raise DataError(f"which must be 'layers', 'fluid' or 'drusen', got {which!r}")
    return _write_nifti(_stack_oct(phantoms, which), path, f"fedbone_med OCT phantom {which}; depth,lateral,bscan")
