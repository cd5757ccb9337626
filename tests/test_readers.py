"""File readers: phantom files written with ``phantom_io`` read back exactly; corrupt and
unsupported files raise DataError naming the check and never the patient; real data sets load.

The real-data tests read ``$FEDBONE_DATA_ROOT`` (default ``../shared/data`` beside the checkout)
and fail, not skip, when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.uid import (
    JPEG2000,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from fedbone_med.data import readers
from fedbone_med.data.phantom_io import (
    to_uint8,
    write_fundus_dicom,
    write_fundus_png,
    write_label_png,
    write_oct_dicom,
    write_oct_label_nifti,
    write_oct_nifti,
)
from fedbone_med.data.phantoms import make_fundus, make_oct_volume
from fedbone_med.data.readers import (
    READERS,
    check_same_shape,
    detect_format,
    read_color_map,
    read_dicom,
    read_image,
    read_mask,
    read_nifti,
    read_nifti_labels,
    read_npz,
)
from fedbone_med.errors import DataError

PATIENT_ID = "SECRET-ID-4711"


@pytest.fixture(scope="module")
def fundus():
    return make_fundus(seed=3, size=48, grade=3)


@pytest.fixture(scope="module")
def octs():
    return make_oct_volume(seed=5, n_bscans=4, size=(32, 40), label=1)


def _pil_mode(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


def _no_patient(msg: str) -> None:
    assert PATIENT_ID not in msg and "PHANTOM^" not in msg and "20000101" not in msg


# --------------------------------------------------------------------------- raster images and masks
def test_png_round_trip_and_masks(tmp_path: Path, fundus) -> None:
    paths = write_fundus_png(fundus, tmp_path / "img.png", tmp_path / "masks")
    rgb = read_image(paths["image"])
    assert rgb.dtype == np.float32 and rgb.shape == (48, 48, 3)
    np.testing.assert_array_equal(read_image(paths["image"], raw=True), to_uint8(fundus.image))
    np.testing.assert_array_equal(np.round(rgb * 255).astype(np.uint8), to_uint8(fundus.image))
    grey = read_image(paths["image"], mode="grey")
    assert grey.shape == (48, 48) and 0.0 <= grey.min() and grey.max() <= 1.0
    assert read_image(paths["image"], mode="keep").shape == (48, 48, 3)
    # 1-bit PNG masks
    assert _pil_mode(paths["vessels"]) == "1"
    np.testing.assert_array_equal(read_mask(paths["vessels"]), fundus.vessels)
    np.testing.assert_array_equal(read_mask(paths["fov"]), fundus.fov.astype(np.uint8))
    # palette PNG: indices kept as classes, or index > 0 as binary; as an image it becomes RGB
    assert _pil_mode(paths["lesions"]) == "P"
    np.testing.assert_array_equal(read_mask(paths["lesions"], kind="index"), fundus.lesions)
    np.testing.assert_array_equal(read_mask(paths["lesions"], kind="binary"), (fundus.lesions > 0).astype(np.uint8))
    assert read_image(paths["lesions"]).shape == (48, 48, 3)


def test_oct_label_png_index(tmp_path: Path, octs) -> None:
    p = write_label_png(octs[0].layers, tmp_path / "layers.png")
    np.testing.assert_array_equal(read_mask(p, kind="index"), octs[0].layers)


def test_grey_threshold_and_color_masks(tmp_path: Path) -> None:
    grey = np.array([[0, 100, 128, 200]], np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png"), [[0, 0, 1, 1]])  # > 0.5 * 255
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png", threshold=99), [[0, 1, 1, 1]])
    cmap = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 0, 255): 2}
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 1] = (255, 0, 0)
    rgb[1, 2] = (0, 0, 255)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "c.png", kind="color", color_map=cmap), [[0, 1, 0], [0, 0, 2]])
    rgb[1, 0] = (255, 255, 254)  # off-palette, as in a few IDRiD masks
    rgb[0, 2] = (7, 8, 9)
    Image.fromarray(rgb).save(tmp_path / "c2.png")
    with pytest.raises(DataError, match=r"2 of 6 pixels have 2 colour\(s\) not in the colour map") as e:
        read_mask(tmp_path / "c2.png", kind="color", color_map=cmap)
    assert "255" not in str(e.value) and "(1, 0)" not in str(e.value)  # no colours, no positions
    out = read_mask(tmp_path / "c2.png", kind="color", color_map=cmap, unknown="background")
    np.testing.assert_array_equal(out, [[0, 1, 0], [0, 0, 2]])
    with pytest.raises(DataError, match="color_map"):
        read_mask(tmp_path / "c.png", kind="color")
    with pytest.raises(DataError, match="kind='color'"):
        read_mask(tmp_path / "c.png", kind="index")


def test_gif_ppm_bmp(tmp_path: Path, fundus) -> None:
    img = to_uint8(fundus.image)
    Image.fromarray(img).save(tmp_path / "a.ppm")
    np.testing.assert_array_equal(read_image(tmp_path / "a.ppm", raw=True), img)
    Image.fromarray(img).save(tmp_path / "a.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "a.bmp", raw=True), img)
    pal = Image.fromarray(img).quantize(colors=32)
    pal.save(tmp_path / "a.gif")
    expected = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "a.gif", raw=True), expected)
    assert read_mask(tmp_path / "a.gif", kind="index").max() < 32
    assert [detect_format(tmp_path / f"a.{e}") for e in ("ppm", "bmp", "gif")] == ["ppm", "bmp", "gif"]


def test_16bit_png_and_tiff(tmp_path: Path) -> None:
    import tifffile

    a16 = (np.arange(12 * 10, dtype=np.uint32).reshape(12, 10) * 541 % 65536).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png", mode="keep", raw=True), a16)
    np.testing.assert_allclose(read_image(tmp_path / "g16.png", mode="grey"), a16 / 65535.0, atol=1e-6)
    tifffile.imwrite(tmp_path / "g16.tif", a16)
    np.testing.assert_allclose(read_image(tmp_path / "g16.tif", mode="keep"), a16 / 65535.0, atol=1e-6)
    rgb16 = np.stack([a16, a16[::-1], 65535 - a16], axis=2)  # (H, W, 3) -- Pillow cannot open this TIFF
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb16.tif", raw=True), rgb16)
    assert read_image(tmp_path / "rgb16.tif").dtype == np.float32
    tifffile.imwrite(tmp_path / "g16be.tif", a16, byteorder=">")  # Pillow mode "I;16B"
    np.testing.assert_array_equal(read_image(tmp_path / "g16be.tif", mode="keep", raw=True), a16)
    assert read_mask(tmp_path / "g16be.tif", threshold=0.5).sum() == (a16 > 32767).sum()
    assert detect_format(tmp_path / "g16.tif") == "tiff" and detect_format(tmp_path / "g16be.tif") == "tiff"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_image_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found: .*nope.png"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(DataError, match=r"bad.png: unreadable image \(Pillow check failed"):
        read_image(tmp_path / "bad.png")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\xff" * 40)
    with pytest.raises(DataError, match=r"bad.tif: unreadable TIFF \(Pillow: .*tifffile"):
        read_image(tmp_path / "bad.tif")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.jpg"):
        read_image(tmp_path / "trunc.jpg")
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(DataError, match="unrecognised file format; supported: bmp, dicom, gif, jpeg, nifti"):
        detect_format(tmp_path / "x.bin")


# --------------------------------------------------------------------------- DICOM
def test_dicom_op_rgb(tmp_path: Path, fundus) -> None:
    p = write_fundus_dicom(fundus, tmp_path / "op.dcm", patient_id=PATIENT_ID)
    assert detect_format(p) == "dicom" and READERS["dicom"] is read_dicom
    im = read_dicom(p)
    np.testing.assert_array_equal(np.round(im.pixels * 255).astype(np.uint8), to_uint8(fundus.image))
    assert im.pixels.dtype == np.float32 and im.pixels.shape == (48, 48, 3)
    assert (im.modality, im.sop_class, im.photometric, im.frames, im.bits_stored) == (
        "OP", "Ophthalmic Photography 8 Bit Image Storage", "RGB", 1, 8,
    )  # fmt: skip
    assert not any("patient" in f.lower() for f in vars(im))
    _no_patient(repr(im))


def test_dicom_ybr_full_422(tmp_path: Path, fundus) -> None:
    """Native YBR_FULL_422 (Y0 Y1 Cb Cr per pixel pair). The phantom's columns are doubled so
    that 4:2:2 subsampling loses nothing; only the YCbCr<->RGB rounding remains (<= 2 levels)."""
    rgb = np.repeat(to_uint8(fundus.image)[:, ::2], 2, axis=1)  # (H, W, 3), equal column pairs
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    h, w, _ = ybr.shape
    pairs = ybr.reshape(h, w // 2, 2, 3)
    packed = np.concatenate([pairs[..., 0], pairs[:, :, 0, 1:]], axis=2)  # (H, W/2, 4): Y0 Y1 Cb Cr
    p = write_fundus_dicom(fundus, tmp_path / "op.dcm", patient_id=PATIENT_ID)
    ds = pydicom.dcmread(p)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = packed.astype(np.uint8).tobytes()
    ds.save_as(tmp_path / "ybr.dcm")
    im = read_dicom(tmp_path / "ybr.dcm")
    assert im.photometric == "YBR_FULL_422" and im.pixels.shape == (h, w, 3)
    diff = np.abs(np.round(im.pixels * 255).astype(int) - rgb.astype(int))
    assert diff.max() <= 2


def test_dicom_oct_frames_16bit_and_monochrome1(tmp_path: Path, octs) -> None:
    stack = np.stack([to_uint8(o.image) for o in octs])  # (F, H, W)
    p = write_oct_dicom(octs, tmp_path / "oct.dcm", patient_id=PATIENT_ID)
    im = read_dicom(p)
    assert (im.modality, im.sop_class, im.frames) == ("OPT", "Ophthalmic Tomography Image Storage", 4)
    np.testing.assert_array_equal(np.round(im.pixels * 255).astype(np.uint8), stack)
    one = read_dicom(p, frame=2)
    np.testing.assert_array_equal(np.round(one.pixels * 255).astype(np.uint8), stack[2])
    with pytest.raises(DataError, match="frame 4 requested but the file has 4 frame"):
        read_dicom(p, frame=4)
    ds = pydicom.dcmread(p)  # MONOCHROME1: stored inverted, read back bright = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = (255 - stack).tobytes()
    ds.save_as(tmp_path / "m1.dcm")
    np.testing.assert_array_equal(np.round(read_dicom(tmp_path / "m1.dcm").pixels * 255).astype(np.uint8), stack)
    ds = pydicom.dcmread(p)  # 16 bit allocated, 12 stored
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = (stack.astype(np.uint16) * 16).tobytes()
    ds.save_as(tmp_path / "oct16.dcm")
    im16 = read_dicom(tmp_path / "oct16.dcm")
    assert im16.bits_stored == 12
    np.testing.assert_allclose(im16.pixels, stack.astype(np.float64) * 16 / 4095.0, atol=1e-6)


def test_dicom_palette_color_and_signed(tmp_path: Path, fundus) -> None:
    idx = to_uint8(fundus.image)[..., 1]  # (H, W) palette indices
    ds = pydicom.dcmread(write_fundus_dicom(fundus, tmp_path / "op.dcm", patient_id=PATIENT_ID))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
    del ds.PlanarConfiguration
    ramp = np.arange(256, dtype=np.uint16) * 257
    for colour, lut in (("Red", ramp), ("Green", ramp[::-1].copy()), ("Blue", np.zeros(256, np.uint16))):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.tobytes())
    ds.PixelData = idx.tobytes()
    ds.save_as(tmp_path / "pal.dcm")
    im = read_dicom(tmp_path / "pal.dcm")
    assert im.photometric == "PALETTE COLOR" and im.pixels.shape == (48, 48, 3)
    expected = np.stack([idx / 255.0, (255 - idx) / 255.0, np.zeros_like(idx, float)], axis=2)
    np.testing.assert_allclose(im.pixels, expected, atol=1e-6)
    ds = pydicom.dcmread(tmp_path / "pal.dcm")  # signed MONOCHROME2: -128..127 -> 0..1
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 1
    for colour in ("Red", "Green", "Blue"):
        delattr(ds, f"{colour}PaletteColorLookupTableDescriptor")
        delattr(ds, f"{colour}PaletteColorLookupTableData")
    ds.PixelData = (idx.astype(np.int16) - 128).astype(np.int8).tobytes()
    ds.save_as(tmp_path / "signed.dcm")
    np.testing.assert_allclose(read_dicom(tmp_path / "signed.dcm").pixels, idx / 255.0, atol=1e-6)


def _encapsulated(tmp_path: Path, fundus, ts) -> Path:
    p = write_fundus_dicom(fundus, tmp_path / "op.dcm", patient_id=PATIENT_ID)
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])  # dummy codestream header
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(tmp_path / "enc.dcm")
    return tmp_path / "enc.dcm"


def test_dicom_compressed_without_decoder(tmp_path: Path, fundus, monkeypatch) -> None:
    p = _encapsulated(tmp_path, fundus, JPEG2000)
    # this environment decodes JPEG 2000 through Pillow: hide that plugin to simulate a site without one
    monkeypatch.setattr(get_decoder(JPEG2000), "_available", {})
    with pytest.raises(DataError) as e:
        read_dicom(p)
    msg = str(e.value)
    assert "'JPEG 2000 Image Compression'" in msg and "pylibjpeg-openjpeg" in msg and "python-gdcm" in msg
    _no_patient(msg)
    monkeypatch.undo()
    # with the decoder present, the dummy codestream fails to decode: a DataError, not a crash
    with pytest.raises(DataError, match="could not be decoded with transfer syntax 'JPEG 2000 Image Compression'"):
        read_dicom(p)


def test_dicom_jpegls_has_no_decoder_here(tmp_path: Path, fundus) -> None:
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed")
    with pytest.raises(DataError, match="'JPEG-LS Lossless Image Compression'.*pylibjpeg-libjpeg") as e:
        read_dicom(_encapsulated(tmp_path, fundus, JPEGLSLossless))
    _no_patient(str(e.value))


# --------------------------------------------------------------------------- compressed DICOM, built here
def _pillow_frames(frames: np.ndarray, fmt: str, **params) -> list[bytes]:
    """Each (H, W) or (H, W, 3) uint8 frame as one compressed codestream written by Pillow."""
    import io

    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, fmt, **params)
        out.append(buf.getvalue())
    return out


def _recompress(src: Path, dst: Path, ts, fragments: list[bytes], photometric: str | None = None) -> Path:
    """``src`` with its pixel data replaced by encapsulated ``fragments`` (one per frame) under ``ts``."""
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if photometric is not None:
        ds.PhotometricInterpretation = photometric
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_dicom_rle_lossless_matches_uncompressed_exactly(tmp_path: Path, fundus, octs) -> None:
    """RLE Lossless, encoded and decoded by pydicom itself (no plugin needed)."""
    assert get_decoder(RLELossless).is_available
    for write, data in ((write_fundus_dicom, fundus), (write_oct_dicom, octs)):
        plain = write(data, tmp_path / "plain.dcm", patient_id=PATIENT_ID)
        ds = pydicom.dcmread(plain)
        ds.compress(RLELossless)
        ds.save_as(tmp_path / "rle.dcm")
        assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == RLELossless
        im, ref = read_dicom(tmp_path / "rle.dcm"), read_dicom(plain)
        assert im.transfer_syntax == "RLE Lossless" and im.frames == ref.frames
        np.testing.assert_array_equal(im.pixels, ref.pixels)
    np.testing.assert_array_equal(read_dicom(tmp_path / "rle.dcm", frame=3).pixels, ref.pixels[3])


def test_dicom_jpeg2000_lossless_via_pillow_matches_exactly(tmp_path: Path, octs) -> None:
    """JPEG 2000 (reversible wavelet) written by Pillow's OpenJPEG, decoded through pydicom's Pillow plugin."""
    if not get_decoder(JPEG2000Lossless).is_available:
        pytest.fail("pydicom should decode JPEG 2000 through Pillow here; check Pillow's OpenJPEG support")
    stack = np.stack([to_uint8(o.image) for o in octs])
    plain = write_oct_dicom(octs, tmp_path / "plain.dcm", patient_id=PATIENT_ID)
    frames = _pillow_frames(stack, "JPEG2000", irreversible=False, no_jp2=True)
    p = _recompress(plain, tmp_path / "j2k.dcm", JPEG2000Lossless, frames)
    im = read_dicom(p)
    assert im.transfer_syntax == "JPEG 2000 Image Compression (Lossless Only)" and im.frames == 4
    np.testing.assert_array_equal(im.pixels, read_dicom(plain).pixels)


def test_dicom_jpeg_baseline_via_pillow_is_close(tmp_path: Path, fundus, octs) -> None:
    """Lossy JPEG Baseline: colour photographs (YBR_FULL_422, as cameras write them) and grey OCT
    frames decode close to the uncompressed pixels."""
    if not get_decoder(JPEGBaseline8Bit).is_available:
        pytest.fail("pydicom should decode JPEG Baseline through Pillow here")
    # colour: Pillow stores YCbCr with 4:2:2 chroma subsampling
    plain = write_fundus_dicom(fundus, tmp_path / "op.dcm", patient_id=PATIENT_ID)
    ref = read_dicom(plain).pixels
    frames = _pillow_frames(to_uint8(fundus.image)[None], "JPEG", quality=95, subsampling=1)
    im = read_dicom(_recompress(plain, tmp_path / "jpg.dcm", JPEGBaseline8Bit, frames, "YBR_FULL_422"))
    assert im.pixels.shape == ref.shape == (48, 48, 3) and im.photometric == "YBR_FULL_422"
    err = np.abs(im.pixels - ref)
    assert float(err.mean()) < 6 / 255 and float(err.max()) < 64 / 255, (err.mean() * 255, err.max() * 255)
    # the colours are right (not swapped channels or undone YCbCr): per-channel means match
    np.testing.assert_allclose(im.pixels.mean(axis=(0, 1)), ref.mean(axis=(0, 1)), atol=2 / 255)
    # grey, multi-frame
    stack = np.stack([to_uint8(o.image) for o in octs])
    plain = write_oct_dicom(octs, tmp_path / "oct.dcm", patient_id=PATIENT_ID)
    ref = read_dicom(plain).pixels
    im = read_dicom(_recompress(plain, tmp_path / "ojpg.dcm", JPEGBaseline8Bit, _pillow_frames(stack, "JPEG",
                                                                                                  quality=95)))
    assert im.pixels.shape == ref.shape == (4, 32, 40)
    err = np.abs(im.pixels - ref)
    assert float(err.mean()) < 3 / 255 and float(err.max()) < 48 / 255
    assert not np.array_equal(im.pixels, ref), "lossy, so not bit-exact: the JPEG path was really taken"


@pytest.mark.parametrize(
    ("ts", "packages"),
    [
        (JPEGLosslessSV1, ["python-gdcm", "pylibjpeg-libjpeg"]),  # what many OCT and fundus devices write
        (JPEGLSLossless, ["python-gdcm", "pylibjpeg-libjpeg", "pyjpegls"]),
        (HTJ2KLossless, ["pylibjpeg-openjpeg"]),
    ],
)
def test_dicom_without_installed_decoder_names_the_packages(tmp_path: Path, fundus, ts, packages) -> None:
    if get_decoder(ts).is_available:
        pytest.skip(f"a decoder for {ts.name} is installed here")
    with pytest.raises(DataError, match="cannot decode pixel data with transfer syntax") as e:
        read_dicom(_encapsulated(tmp_path, fundus, ts))
    msg = str(e.value)
    assert f"'{ts.name}'" in msg and "install one of:" in msg
    for package in packages:
        assert package in msg, (package, msg)
    _no_patient(msg)


def test_dicom_corrupt_files(tmp_path: Path, fundus) -> None:
    p = write_fundus_dicom(fundus, tmp_path / "op.dcm", patient_id=PATIENT_ID)
    data = p.read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(data[:-100])
    with pytest.raises(DataError, match=r"pixel data is truncated: expected 6912 bytes, found 6812") as e:
        read_dicom(tmp_path / "trunc.dcm")
    _no_patient(str(e.value))
    (tmp_path / "head.dcm").write_bytes(data[:500])
    with pytest.raises(DataError, match="has no pixel data"):
        read_dicom(tmp_path / "head.dcm")
    Image.fromarray(to_uint8(fundus.image)).save(tmp_path / "photo.png")
    (tmp_path / "photo.dcm").write_bytes((tmp_path / "photo.png").read_bytes())
    with pytest.raises(DataError, match=r"not a DICOM file \(no DICM preamble"):
        read_dicom(tmp_path / "photo.dcm")
    assert detect_format(tmp_path / "photo.dcm") == "png"  # magic bytes beat the extension
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(DataError, match="DICOM file has no pixel data") as e:
        read_dicom(tmp_path / "nopix.dcm")
    _no_patient(str(e.value))
    with pytest.raises(DataError, match="file not found"):
        read_dicom(tmp_path / "missing.dcm")


# --------------------------------------------------------------------------- NIfTI and npz
def test_nifti_volume_and_labels(tmp_path: Path, octs) -> None:
    stack = np.stack([to_uint8(o.image) for o in octs])  # (N, H, W)
    vp = write_oct_nifti(octs, tmp_path / "v.nii.gz")
    lp = write_oct_label_nifti(octs, tmp_path / "l.nii")
    assert detect_format(vp) == "nifti" and detect_format(lp) == "nifti"
    vol = read_nifti(vp, scale="dtype")
    np.testing.assert_array_equal(np.round(vol * 255).astype(np.uint8), stack)
    labels = read_nifti_labels(lp)
    np.testing.assert_array_equal(labels, np.stack([o.layers for o in octs]))
    check_same_shape(vol, labels, names=("volume", "labels"))
    robust = read_nifti(vp)  # 0.5..99.5 percentile scaling
    lo, hi = np.percentile(stack.astype(np.float32), (0.5, 99.5))
    np.testing.assert_allclose(robust, np.clip((stack - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert read_nifti(vp, axis=0).shape == (32, 40, 4)
    with pytest.raises(DataError, match=r"shapes do not match: volume \(4, 32, 40\), labels \(32, 40, 4\)"):
        check_same_shape(vol, read_nifti_labels(lp, axis=0), names=("volume", "labels"))
    with pytest.raises(DataError, match="axis must be 0, 1 or 2"):
        read_nifti(vp, axis=3)


def test_npz(tmp_path: Path) -> None:
    imgs = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez(tmp_path / "d.npz", x=imgs, y=np.array([[1], [3]]))
    x, y = read_npz(tmp_path / "d.npz", images_key="x", labels_key="y")
    np.testing.assert_array_equal(np.round(x * 255).astype(np.uint8), imgs)
    assert x.dtype == np.float32 and y.tolist() == [1, 3]
    with pytest.raises(DataError, match=r"key\(s\) \['train_images'\] not in archive; keys present: \['x', 'y'\]"):
        read_npz(tmp_path / "d.npz", images_key="train_images", labels_key="y")
    np.savez(tmp_path / "obj.npz", x=imgs, y=np.array([{"name": "PHANTOM^X"}, None], dtype=object))
    with pytest.raises(DataError, match="npz contains Python objects; refusing to unpickle"):
        read_npz(tmp_path / "obj.npz", images_key="x", labels_key="y")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(DataError, match="unreadable npz"):
        read_npz(tmp_path / "bad.npz", images_key="x", labels_key="y")
    assert detect_format(tmp_path / "d.npz") == "npz"
    np.save(tmp_path / "a.npy", imgs)
    with pytest.raises(DataError, match="not an npz archive"):
        read_npz(tmp_path / "a.npy", images_key="x", labels_key="y")


# --------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def data_root() -> Path:
    env = os.environ.get("FEDBONE_DATA_ROOT")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    missing = [n for n in ("chase_db1", "idrid_seg_subset", "retinamnist") if not (root / n).is_dir()]
    if missing:
        pytest.fail(
            f"real data set(s) {missing} not found under {root}: put the shared data folder at ../shared/data "
            "beside the checkout, or set FEDBONE_DATA_ROOT to the folder that holds chase_db1/, "
            "idrid_seg_subset/ and retinamnist/"
        )
    return root


@pytest.mark.realdata
def test_real_chase_db1(data_root: Path) -> None:
    d = data_root / "chase_db1"
    img = read_image(d / "images" / "Image_01L.jpg")
    assert img.shape == (960, 999, 3) and img.dtype == np.float32 and 0.1 < img.mean() < 0.9
    vessels = read_mask(d / "masks_1stHO" / "Image_01L_1stHO.png")
    fov = read_mask(d / "fov_masks" / "Image_01L.png")  # 8-bit 0/255
    assert vessels.shape == fov.shape == (960, 999) and set(np.unique(vessels)) <= {0, 1}
    fraction = vessels[fov == 1].mean()
    assert 0.05 < fraction < 0.20
    assert detect_format(d / "masks_1stHO" / "Image_01L_1stHO.png") == "png"


@pytest.mark.realdata
def test_real_idrid_masks(data_root: Path) -> None:
    d = data_root / "idrid_seg_subset"
    od_path = d / "masks_tif" / "OD" / "IDRiD_01_OD.tif"
    od = read_mask(od_path)
    idx = read_mask(od_path, kind="index")
    assert od.shape == (2848, 4288) and set(np.unique(idx)) == {0, 1}
    np.testing.assert_array_equal(od, idx > 0)
    assert 0.005 < od.mean() < 0.05  # the optic disc covers ~2% of the photograph
    cmap, names = read_color_map(d / "colormap.txt")
    assert names == ["background", "MA", "HE", "EX", "SE", "OD"] and cmap[(255, 255, 0)] == 5
    color = read_mask(d / "masks_color5" / "IDRiD_01.png", kind="color", color_map=cmap)
    assert color.shape == (2848, 4288) and set(np.unique(color)) <= set(range(6))
    np.testing.assert_array_equal(color == 5, od == 1)  # OD drawn last in the colour mask for this image
    with pytest.raises(DataError, match="pixels have .* not in the colour map"):  # stray colours in image 02
        read_mask(d / "masks_color5" / "IDRiD_02.png", kind="color", color_map=cmap)
    assert read_mask(d / "masks_color5" / "IDRiD_02.png", kind="color", color_map=cmap, unknown="background").max() == 5


@pytest.mark.realdata
def test_real_retinamnist(data_root: Path) -> None:
    x, y = read_npz(data_root / "retinamnist" / "retinamnist.npz", images_key="train_images", labels_key="train_labels")
    assert x.shape == (1080, 28, 28, 3) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.shape == (1080,) and set(np.unique(y)) == {0, 1, 2, 3, 4}


def test_readers_module_is_lazy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, fedbone_med.data.readers, fedbone_med.data.manifest, fedbone_med.data.check; "
        "print(any(m in sys.modules for m in ('pydicom', 'nibabel', 'tifffile', 'monai', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert readers.READERS["nifti"] is read_nifti
