"""Tests for medpipe.readers: DICOM files/series (incl. compressed syntaxes), probe, NIfTI, raster."""

from __future__ import annotations

import gzip
import io
import pickle
import sys
import uuid
from pathlib import Path

import fsspec
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.uid import (
    BasicTextSRStorage,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

sys.path.insert(0, str(Path(__file__).parent))
import dicom_factory as factory  # noqa: E402

from medpipe.readers import (  # noqa: E402
    DecodedImage,
    QuarantineReason,
    UnreadableFile,
    group_series,
    probe_file,
    read_dicom_file,
    read_dicom_series,
    read_nifti,
    read_raster,
    read_unit,
)

LOCAL = fsspec.filesystem("file")
R = QuarantineReason


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def gray16(rng) -> np.ndarray:
    return rng.integers(0, 4096, size=(64, 48), dtype=np.uint16)


@pytest.fixture
def gradient8() -> np.ndarray:
    return np.clip(np.add.outer(np.arange(32) * 4, np.arange(40) * 3), 0, 255).astype(np.uint8)


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    root = f"/readers-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _reason(fn, *args) -> QuarantineReason:
    with pytest.raises(UnreadableFile) as info:
        fn(*args)
    assert factory.FAKE_NAME.split("^")[0] not in str(info.value)  # never leaks header values / paths
    assert factory.FAKE_ID not in str(info.value)
    return info.value.reason


# ---------------------------------------------------------------- single DICOM files


def test_single_frame_uncompressed(tmp_path, gray16):
    path = factory.save(factory.make_dataset(gray16, bits_stored=12), tmp_path / "a.dcm")
    image = read_dicom_file(path, LOCAL)
    assert isinstance(image, DecodedImage)
    assert image.pixels.shape == (1, 64, 48) and image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels[0], gray16)
    assert image.spacing == (0.5, 0.25) and image.modality == "DX"
    assert image.header is not None and "PixelData" not in image.header
    assert image.header.PatientID == factory.FAKE_ID


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1])
def test_lossless_syntaxes_decode_exactly(tmp_path, gray16, syntax):
    if syntax in (JPEGLossless, JPEGLosslessSV1):
        ds = factory.jpeg_lossless(gray16, syntax)
    else:
        ds = factory.make_dataset(gray16.copy(), bits_stored=16)
        ds.compress(syntax)
    path = factory.save(ds, tmp_path / "c.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    image = read_dicom_file(path, LOCAL)
    np.testing.assert_array_equal(image.pixels[0], gray16)
    assert image.pixels.dtype == np.uint16
    assert probe_file(path, LOCAL).has_pixel_data


def test_jpeg_baseline_gray_and_rgb(tmp_path, gradient8):
    gray = read_dicom_file(factory.save(factory.jpeg_baseline(gradient8), tmp_path / "g.dcm"), LOCAL)
    assert gray.pixels.shape == (1, 32, 40)
    assert np.abs(gray.pixels[0].astype(int) - gradient8).max() <= 4
    rgb = np.stack([gradient8, gradient8[::-1], 255 - gradient8], axis=-1)
    color = read_dicom_file(factory.save(factory.jpeg_baseline(rgb), tmp_path / "c.dcm"), LOCAL)
    assert color.pixels.shape == (3, 32, 40) and color.pixels.dtype == np.uint8  # YBR_FULL_422 -> RGB
    assert np.abs(np.moveaxis(color.pixels, 0, -1).astype(int) - rgb).mean() < 3


def test_rgb_uncompressed_and_rle(tmp_path, rng):
    rgb = rng.integers(0, 256, size=(16, 12, 3), dtype=np.uint8)
    for name, syntax in (("raw", None), ("rle", RLELossless)):
        ds = factory.make_dataset(rgb.copy(), photometric="RGB", modality="OT")
        if syntax:
            ds.compress(syntax)
        image = read_dicom_file(factory.save(ds, tmp_path / f"{name}.dcm"), LOCAL)
        assert image.pixels.shape == (3, 16, 12)
        np.testing.assert_array_equal(np.moveaxis(image.pixels, 0, -1), rgb)


def test_multiframe(tmp_path, rng):
    frames = rng.integers(0, 1000, size=(5, 10, 12), dtype=np.uint16)
    ds = factory.make_dataset(frames, modality="MR", SpacingBetweenSlices=3.0, pixel_spacing=(0.9, 0.8))
    image = read_dicom_file(factory.save(ds, tmp_path / "mf.dcm"), LOCAL)
    assert image.pixels.shape == (1, 5, 10, 12) and image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels[0], frames)
    assert image.spacing == (3.0, 0.9, 0.8)
    assert probe_file(str(tmp_path / "mf.dcm"), LOCAL).frames == 5


def test_multiframe_rgb_compressed(tmp_path, rng):
    frames = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    ds = factory.make_dataset(frames.copy(), photometric="RGB", modality="US", pixel_spacing=None)
    ds.compress(RLELossless)
    image = read_dicom_file(factory.save(ds, tmp_path / "mf.dcm"), LOCAL)
    assert image.pixels.shape == (3, 3, 8, 8) and image.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(np.moveaxis(image.pixels, 0, -1), frames)


def test_enhanced_multiframe_functional_groups(tmp_path, rng):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import EnhancedCTImageStorage

    stored = rng.integers(0, 2000, size=(4, 6, 5), dtype=np.uint16)
    ds = factory.make_dataset(stored, modality="CT", sop_class=EnhancedCTImageStorage, pixel_spacing=None)
    measures, orient, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.4, 0.3], 9.0
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Seq([measures]), Seq([orient])
    ds.SharedFunctionalGroupsSequence = Seq([shared])
    frames = []
    for k in range(4):
        pos, rescale, item = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [5.0, 6.0, 1.5 * k]
        rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1 + k, -1000, "HU"
        item.PlanePositionSequence, item.PixelValueTransformationSequence = Seq([pos]), Seq([rescale])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Seq(frames)
    image = read_dicom_file(factory.save(ds, tmp_path / "enh.dcm"), LOCAL)
    assert image.pixels.shape == (1, 4, 6, 5) and image.pixels.dtype == np.float32
    expected = stored.astype(np.float32) * np.arange(1, 5, dtype=np.float32)[:, None, None] - 1000
    np.testing.assert_allclose(image.pixels[0], expected)
    assert image.spacing == pytest.approx((1.5, 0.4, 0.3)) and image.orientation == "LPS"
    np.testing.assert_allclose(image.affine[:3, 3], [5.0, 6.0, 0.0])


def test_monochrome1_is_inverted(tmp_path, gray16):
    ds = factory.make_dataset(gray16, photometric="MONOCHROME1", bits_stored=12, modality="CR")
    image = read_dicom_file(factory.save(ds, tmp_path / "m1.dcm"), LOCAL)
    np.testing.assert_array_equal(image.pixels[0], 4095 - gray16)
    assert image.pixels.dtype == np.uint16


def test_ct_file_rescaled_to_hu(tmp_path, rng):
    hu = rng.integers(-1000, 2000, size=(8, 8)).astype(np.float32)
    ds = factory.ct_slice(hu, 0.0, series_uid=generate_uid(), instance=1, slope=2.0, intercept=-1024.0)
    image = read_dicom_file(factory.save(ds, tmp_path / "ct.dcm"), LOCAL)
    assert image.pixels.dtype == np.float32 and image.modality == "CT"
    np.testing.assert_allclose(image.pixels[0], np.round((hu + 1024) / 2) * 2 - 1024)
    assert image.spacing == (0.7, 0.6)


def test_imager_pixel_spacing_fallback(tmp_path, gray16):
    ds = factory.make_dataset(gray16, pixel_spacing=None, ImagerPixelSpacing=[0.2, 0.3])
    assert read_dicom_file(factory.save(ds, tmp_path / "a.dcm"), LOCAL).spacing == (0.2, 0.3)
    ds = factory.make_dataset(gray16, pixel_spacing=None)
    assert read_dicom_file(factory.save(ds, tmp_path / "b.dcm"), LOCAL).spacing == (1.0, 1.0)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the missing delimiter
def test_truncated_and_corrupt_files(tmp_path, gray16):
    data = factory.to_bytes(factory.make_dataset(gray16))
    cut = tmp_path / "DOE_JOHN_cut.dcm"
    cut.write_bytes(data[: len(data) - 100])
    assert _reason(read_dicom_file, str(cut), LOCAL) == R.truncated
    assert _reason(probe_file, str(cut), LOCAL) == R.truncated

    ds = factory.make_dataset(gray16.copy(), bits_stored=16)
    ds.compress(RLELossless)
    rle = factory.to_bytes(ds)
    (tmp_path / "rle_cut.dcm").write_bytes(rle[: len(rle) - 300])
    assert _reason(probe_file, str(tmp_path / "rle_cut.dcm"), LOCAL) == R.truncated
    assert _reason(read_dicom_file, str(tmp_path / "rle_cut.dcm"), LOCAL) == R.truncated

    header_end = data.index(b"\xe0\x7f\x10\x00")
    (tmp_path / "hdr_cut.dcm").write_bytes(data[: header_end - 5])
    assert _reason(probe_file, str(tmp_path / "hdr_cut.dcm"), LOCAL) == R.truncated
    assert _reason(read_dicom_file, str(tmp_path / "hdr_cut.dcm"), LOCAL) == R.truncated

    bad = bytearray(rle)
    start = bad.index(b"\xe0\x7f\x10\x00") + 12 + 8 + 4  # inside the first fragment (after BOT item)
    bad[start + 64 : start + 64 + 200] = bytes(200)  # garble RLE segments
    (tmp_path / "garbled.dcm").write_bytes(bytes(bad))
    assert _reason(read_dicom_file, str(tmp_path / "garbled.dcm"), LOCAL) == R.decode_error


# ---------------------------------------------------------------- probe


def test_probe_fields(tmp_path, gray16):
    ds = factory.make_dataset(gray16, ImagePositionPatient=[1, 2, 3], ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    path = factory.save(ds, tmp_path / "p.dcm")
    probe = probe_file(path, LOCAL)
    assert probe.kind == "dicom" and probe.has_pixel_data
    assert (probe.rows, probe.columns, probe.frames, probe.samples_per_pixel) == (64, 48, 1, 1)
    assert probe.sop_instance_uid == ds.SOPInstanceUID and probe.series_instance_uid == ds.SeriesInstanceUID
    assert probe.patient_id == factory.FAKE_ID and probe.modality == "DX"
    assert probe.position == (1.0, 2.0, 3.0) and probe.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert probe.size == Path(path).stat().st_size


def test_probe_rejections(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"hello, this is not a DICOM file at all" * 10)
    assert _reason(probe_file, str(tmp_path / "junk.dcm"), LOCAL) == R.not_dicom
    assert _reason(read_dicom_file, str(tmp_path / "junk.dcm"), LOCAL) == R.not_dicom
    (tmp_path / "notes.txt").write_text("notes")
    assert _reason(probe_file, str(tmp_path / "notes.txt"), LOCAL) == R.unsupported_format
    (tmp_path / "empty").write_bytes(b"")
    assert _reason(probe_file, str(tmp_path / "empty"), LOCAL) == R.not_dicom

    no_pixels = factory.make_dataset(None, Rows=16, Columns=16)
    path = factory.save(no_pixels, tmp_path / "nopix.dcm")
    assert _reason(probe_file, path, LOCAL) == R.no_pixel_data
    assert _reason(read_dicom_file, path, LOCAL) == R.no_pixel_data

    sr = factory.make_dataset(None, sop_class=BasicTextSRStorage, modality="SR", pixel_spacing=None)
    sr.ValueType = "CONTAINER"
    assert _reason(probe_file, factory.save(sr, tmp_path / "sr.dcm"), LOCAL) == R.non_image_dicom


def test_probe_other_kinds(tmp_path, rng):
    nib.save(nib.Nifti1Image(rng.random((6, 5, 4)).astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    probe = probe_file(str(tmp_path / "v.nii.gz"), LOCAL)
    assert probe.kind == "nifti" and (probe.rows, probe.columns, probe.frames) == (5, 6, 4)
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(tmp_path / "x.png")
    probe = probe_file(str(tmp_path / "x.png"), LOCAL)
    assert probe.kind == "raster" and (probe.rows, probe.columns, probe.samples_per_pixel) == (7, 9, 3)
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((7, 9), np.uint16))
    assert probe_file(str(tmp_path / "t.tif"), LOCAL).rows == 7
    (tmp_path / "bad.nii.gz").write_bytes(gzip.compress(b"garbage" * 100))
    assert _reason(probe_file, str(tmp_path / "bad.nii.gz"), LOCAL) == R.unreadable_nifti
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert _reason(probe_file, str(tmp_path / "bad.png"), LOCAL) == R.unreadable_image


# ---------------------------------------------------------------- series


def _write_series(root: Path, hu: np.ndarray, order, **kw) -> tuple[list[str], str]:
    uid = generate_uid()
    paths = []
    for k in order:  # files written (and named) in shuffled order
        ds = factory.ct_slice(hu[k], 2.5 * k, series_uid=uid, instance=k + 1,
                              slope=1.0 + (k % 2), intercept=-1024.0 + 10 * (k % 3), **kw)
        paths.append(factory.save(ds, root / f"slice_{len(paths):03d}.dcm"))
    return paths, uid


def test_ct_series_sorted_with_spacing_and_hu(tmp_path, rng):
    hu = (rng.integers(-500, 500, size=(6, 8, 10)) * 2).astype(np.float32)  # even: exact with slope 2
    order = rng.permutation(6)
    paths, uid = _write_series(tmp_path, hu, order)
    image = read_dicom_series(paths, LOCAL)
    assert image.pixels.shape == (1, 6, 8, 10) and image.pixels.dtype == np.float32
    np.testing.assert_allclose(image.pixels[0], hu)
    assert image.spacing == pytest.approx((2.5, 0.7, 0.6))
    assert image.orientation == "LPS" and image.modality == "CT"
    expected = np.array([[0.6, 0, 0, -50], [0, 0.7, 0, -60], [0, 0, 2.5, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine, expected, atol=1e-9)
    assert "PixelData" not in image.header and image.header.InstanceNumber == 1
    groups = group_series(probe_file(p, LOCAL) for p in paths)
    assert list(groups) == [uid] and len(groups[uid]) == 6


def test_sagittal_series_sorted_along_normal(tmp_path, rng):
    hu = rng.integers(-100, 100, size=(4, 6, 6)).astype(np.float32) * 2
    paths, _ = _write_series(tmp_path, hu, [2, 0, 3, 1], orientation=(0, 1, 0, 0, 0, -1))
    image = read_dicom_series(paths, LOCAL)
    np.testing.assert_allclose(image.pixels[0], hu)
    assert image.orientation == "PIR"  # columns +y (P), rows -z (I), slices along normal -x (R)


def test_series_without_geometry_uses_instance_number(tmp_path, rng):
    hu = rng.integers(-100, 100, size=(3, 4, 4)).astype(np.float32) * 2
    paths, _ = _write_series(tmp_path, hu, [1, 2, 0], geometry=False)
    image = read_dicom_series(paths, LOCAL)
    np.testing.assert_allclose(image.pixels[0], hu)
    assert image.spacing[0] == 2.5 and image.affine is None


def test_series_errors(tmp_path, rng):
    uid = generate_uid()
    a = factory.save(factory.ct_slice(np.zeros((8, 8)), 0, series_uid=uid, instance=1), tmp_path / "a.dcm")
    b = factory.save(factory.ct_slice(np.zeros((8, 9)), 2.5, series_uid=uid, instance=2), tmp_path / "b.dcm")
    assert _reason(read_dicom_series, [a, b], LOCAL) == R.mixed_series_sizes
    c = factory.save(factory.ct_slice(np.zeros((8, 8)), 0, series_uid=uid, instance=3), tmp_path / "c.dcm")
    with pytest.raises(UnreadableFile, match="share a position") as info:
        read_dicom_series([a, c], LOCAL)
    assert info.value.reason == R.decode_error


# ---------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_round_trip(tmp_path, rng, name):
    data = rng.integers(0, 100, size=(10, 8, 6)).astype(np.int16)  # (X, Y, Z)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (10, 20, 30)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / name)
    image = read_nifti(str(tmp_path / name), LOCAL)
    assert image.pixels.shape == (1, 6, 8, 10) and image.pixels.dtype == np.int16
    np.testing.assert_array_equal(image.pixels[0], data.transpose(2, 1, 0))
    assert image.spacing == pytest.approx((2.5, 0.9, 0.8))
    np.testing.assert_allclose(image.affine, affine)
    assert image.orientation == "RAS" and image.modality == "MR" and image.header is None


def test_nifti_4d_channels_and_corrupt(tmp_path, rng):
    data = rng.random((5, 4, 3, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / "c.nii.gz")
    image = read_nifti(str(tmp_path / "c.nii.gz"), LOCAL)
    assert image.pixels.shape == (2, 3, 4, 5) and image.orientation == "LPS"
    np.testing.assert_array_equal(image.pixels, data.transpose(3, 2, 1, 0))

    (tmp_path / "garbage.nii.gz").write_bytes(b"\x1f\x8b" + bytes(50))
    assert _reason(read_nifti, str(tmp_path / "garbage.nii.gz"), LOCAL) == R.unreadable_nifti
    (tmp_path / "junk.nii").write_bytes(b"x" * 400)
    assert _reason(read_nifti, str(tmp_path / "junk.nii"), LOCAL) == R.unreadable_nifti
    raw = (tmp_path / "ok.nii")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), raw)
    (tmp_path / "cut.nii").write_bytes(raw.read_bytes()[:2000])
    assert _reason(read_nifti, str(tmp_path / "cut.nii"), LOCAL) == R.unreadable_nifti
    assert _reason(probe_file, str(tmp_path / "cut.nii"), LOCAL) == R.unreadable_nifti


# ---------------------------------------------------------------- raster


def test_png_modes(tmp_path, rng):
    gray = rng.integers(0, 256, size=(9, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((9, 7, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).quantize(16).save(tmp_path / "pal.png")
    Image.fromarray((gray.astype(np.uint16) * 257)).save(tmp_path / "g16.png")

    image = read_raster(str(tmp_path / "g.png"), LOCAL)
    assert image.pixels.shape == (1, 9, 7) and image.spacing == (1.0, 1.0) and image.modality == "OT"
    np.testing.assert_array_equal(image.pixels[0], gray)
    for name in ("rgb.png", "rgba.png"):
        image = read_raster(str(tmp_path / name), LOCAL)
        assert image.pixels.shape == (3, 9, 7)
        np.testing.assert_array_equal(np.moveaxis(image.pixels, 0, -1), rgb)
    assert read_raster(str(tmp_path / "pal.png"), LOCAL).pixels.shape == (3, 9, 7)
    g16 = read_raster(str(tmp_path / "g16.png"), LOCAL)
    assert g16.pixels.dtype == np.uint16 and int(g16.pixels.max()) == int(gray.max()) * 257


def test_tiff_and_jpeg(tmp_path, rng, gradient8):
    g16 = rng.integers(0, 65535, size=(11, 13), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "g16.tif", g16)
    image = read_raster(str(tmp_path / "g16.tif"), LOCAL)
    assert image.pixels.dtype == np.uint16 and image.pixels.shape == (1, 11, 13)
    np.testing.assert_array_equal(image.pixels[0], g16)
    rgb = rng.integers(0, 256, size=(11, 13, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb, photometric="rgb")
    np.testing.assert_array_equal(np.moveaxis(read_raster(str(tmp_path / "rgb.tiff"), LOCAL).pixels, 0, -1), rgb)
    Image.fromarray(gradient8).save(tmp_path / "x.jpg", quality=95)
    jpg = read_raster(str(tmp_path / "x.jpg"), LOCAL)
    assert jpg.pixels.shape == (1, 32, 40) and np.abs(jpg.pixels[0].astype(int) - gradient8).max() <= 4
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    assert _reason(read_raster, str(tmp_path / "bad.tif"), LOCAL) == R.unreadable_image
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    assert _reason(read_raster, str(tmp_path / "bad.png"), LOCAL) == R.unreadable_image


# ---------------------------------------------------------------- fsspec memory:// and dispatch


def test_memory_filesystem_and_read_unit(memfs, rng, gray16):
    fs, root = memfs
    ds = factory.make_dataset(gray16.copy(), bits_stored=16)
    ds.compress(JPEG2000Lossless)
    fs.pipe(f"{root}/x.dcm", factory.to_bytes(ds))
    image = read_unit("dicom-file", [f"memory://{root}/x.dcm"], fs)
    np.testing.assert_array_equal(image.pixels[0], gray16)
    assert probe_file(f"{root}/x.dcm", fs).rows == 64

    hu = rng.integers(-100, 100, size=(4, 6, 6)).astype(np.float32) * 2
    uid = generate_uid()
    paths = []
    for k in (3, 1, 0, 2):
        paths.append(f"{root}/ct/{k}.dcm")
        fs.pipe(paths[-1], factory.to_bytes(factory.ct_slice(hu[k], 2.5 * k, series_uid=uid, instance=k + 1)))
    np.testing.assert_allclose(read_unit("dicom-series", paths, fs).pixels[0], hu)

    buf = io.BytesIO()
    nib.Nifti1Image(np.ones((3, 4, 5), np.uint8), np.eye(4)).to_file_map(
        {"header": nib.FileHolder(fileobj=buf), "image": nib.FileHolder(fileobj=buf)}
    )
    fs.pipe(f"{root}/m.nii.gz", gzip.compress(buf.getvalue()))
    assert read_unit("nifti", [f"{root}/m.nii.gz"], fs).pixels.shape == (1, 5, 4, 3)

    png = io.BytesIO()
    Image.fromarray(gray16[:, :10].astype(np.uint8)).save(png, format="PNG")
    fs.pipe(f"{root}/p.png", png.getvalue())
    assert read_unit("raster", [f"{root}/p.png"], fs).pixels.shape == (1, 64, 10)

    with pytest.raises(ValueError):
        read_unit("video", [f"{root}/p.png"], fs)
    with pytest.raises(ValueError):
        read_unit("raster", [], fs)


def test_unreadable_file_pickles():
    exc = pickle.loads(pickle.dumps(UnreadableFile(R.truncated, "x")))
    assert exc.reason is R.truncated and exc.detail == "x" and str(exc) == "truncated: x"

