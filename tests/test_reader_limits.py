"""Readers under bad input: size limits, non-finite pixels, and storage failures that are not bad files."""

from __future__ import annotations

import errno
import gzip
import io
import socket
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

import fsspec
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image
from pydicom.uid import RLELossless, generate_uid

sys.path.insert(0, str(Path(__file__).parent))
import dicom_factory as factory  # noqa: E402

from medpipe.errors import InfrastructureError  # noqa: E402
from medpipe.readers import (  # noqa: E402
    QuarantineReason,
    UnreadableFile,
    finite_pixels,
    is_infrastructure_error,
    probe_file,
    read_dicom_file,
    read_dicom_series,
    read_nifti,
    read_raster,
    read_unit,
)

LOCAL = fsspec.filesystem("file")
R = QuarantineReason
MiB = 2**20


def _reason(fn, *args, **kwargs) -> UnreadableFile:
    with pytest.raises(UnreadableFile) as info:
        fn(*args, **kwargs)
    assert factory.FAKE_ID not in str(info.value) and "DOE" not in str(info.value)
    return info.value


# ---------------------------------------------------------------- size limit


def test_rle_bomb_rejected_by_probe_and_reader_without_allocating(tmp_path):
    path = factory.save(factory.rle_claiming(65535, 65535), tmp_path / "DOE_JOHN_bomb.dcm")
    assert Path(path).stat().st_size < 1000
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless
    assert probe_file(path, LOCAL).rows == 65535  # no limit: the probe never decodes, so it is cheap anyway

    tracemalloc.start()
    try:
        start = time.perf_counter()
        exc = _reason(probe_file, path, LOCAL, max_image_bytes=1024 * MiB)
        assert exc.reason == R.too_large
        assert exc.detail == "65535x65535x1 needs 8191.8 MiB > limit 1024.0 MiB"
        for read in (
            lambda: read_unit("dicom-file", [path], LOCAL, max_image_bytes=1024 * MiB),
            lambda: read_dicom_file(path, LOCAL, max_image_bytes=1024 * MiB),
            lambda: read_unit("dicom-series", [path, path], LOCAL, max_image_bytes=1024 * MiB),
        ):
            with pytest.raises(UnreadableFile) as info:
                read()
            assert info.value.reason == R.too_large
        peak = tracemalloc.get_traced_memory()[1]
        assert time.perf_counter() - start < 5
    finally:
        tracemalloc.stop()
    assert peak < 50 * MiB


def test_rle_ct_bomb_counts_float32(tmp_path):
    path = factory.save(factory.rle_claiming(4096, 4096, modality="CT"), tmp_path / "ct.dcm")
    exc = _reason(probe_file, path, LOCAL, max_image_bytes=32 * MiB)
    assert exc.reason == R.too_large and exc.detail == "4096x4096x1 needs 64.0 MiB > limit 32.0 MiB"
    assert probe_file(path, LOCAL, max_image_bytes=64 * MiB).rows == 4096  # at the limit: allowed


def _ct_series(root: Path, n: int = 4, size: tuple[int, int] = (8, 8)) -> list[str]:
    uid = generate_uid()
    return [
        factory.save(factory.ct_slice(np.zeros(size), 2.5 * k, series_uid=uid, instance=k + 1), root / f"s{k}.dcm")
        for k in range(n)
    ]


def test_series_limit_is_the_sum_over_slices(tmp_path):
    paths = _ct_series(tmp_path)  # 4 slices of 8x8 CT -> at most float32: 1024 bytes (the header-only bound)
    image = read_dicom_series(paths, LOCAL, max_image_bytes=1024)
    assert image.pixels.nbytes == 512 and image.pixels.dtype == np.int16  # exact HU as int16
    exc = _reason(read_dicom_series, paths, LOCAL, max_image_bytes=1023)
    assert exc.reason == R.too_large and exc.detail.startswith("8x8x4 needs")
    assert _reason(read_unit, "dicom-series", paths, LOCAL, max_image_bytes=1023).reason == R.too_large
    for p in paths:  # each slice alone fits
        assert probe_file(p, LOCAL, max_image_bytes=256).frames == 1
        assert _reason(probe_file, p, LOCAL, max_image_bytes=255).reason == R.too_large


def test_multiframe_limit_counts_decoded_frames(tmp_path, rng=np.random.default_rng(5)):
    frames = rng.integers(0, 1000, size=(10, 8, 6), dtype=np.uint16)  # 960 bytes in all
    path = factory.save(factory.make_dataset(frames, modality="MR"), tmp_path / "mf.dcm")
    assert _reason(read_dicom_file, path, LOCAL, max_image_bytes=959).detail.startswith("6x8x10 needs")
    assert _reason(probe_file, path, LOCAL, max_image_bytes=959).reason == R.too_large
    image = read_unit("dicom-file", [path], LOCAL, frames=[2, 7], max_image_bytes=200)  # 2 frames decoded
    np.testing.assert_array_equal(image.pixels[0], frames[[2, 7]])
    # 6 of 10 frames: the decoder decodes the whole file, so the whole file counts
    assert _reason(read_unit, "dicom-file", [path], LOCAL, frames=list(range(6)), max_image_bytes=959).detail.startswith(
        "6x8x10"
    )


def _nifti_header_only(shape: tuple[int, ...], dtype=np.float32) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4 + bytes(64)


def test_nifti_header_bomb(tmp_path):
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(_nifti_header_only((2048, 2048, 2048))))
    tracemalloc.start()
    try:
        exc = _reason(probe_file, str(path), LOCAL, max_image_bytes=1024 * MiB)
        assert exc.reason == R.too_large and exc.detail == "2048x2048x2048 needs 32768.0 MiB > limit 1024.0 MiB"
        assert _reason(read_unit, "nifti", [str(path)], LOCAL, max_image_bytes=1024 * MiB).reason == R.too_large
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * MiB


def test_nifti_gzip_bomb_is_inflated_only_to_the_declared_data(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    buf = nib.Nifti1Image(data, np.eye(4)).to_bytes()
    path = tmp_path / "tail.nii.gz"
    path.write_bytes(gzip.compress(buf + bytes(200 * MiB)))  # 200 MiB of trailing zeros, ~200 KB compressed
    tracemalloc.start()
    try:
        image = read_nifti(str(path), LOCAL, max_image_bytes=1 * MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(image.pixels[0], data.transpose(2, 1, 0))
    assert peak < 50 * MiB


def test_nifti_scaled_counts_float64(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, tmp_path / "s.nii")
    image = read_nifti(str(tmp_path / "s.nii"), LOCAL, max_image_bytes=512)
    assert image.pixels.dtype == np.float64 and image.pixels.nbytes == 512
    assert _reason(read_nifti, str(tmp_path / "s.nii"), LOCAL, max_image_bytes=511).detail.startswith("4x4x4 needs")


def test_raster_limits(tmp_path):
    Image.fromarray(np.zeros((16, 10, 4), np.uint8), mode="RGBA").save(tmp_path / "a.png")  # decodes RGBA: 640
    assert read_raster(str(tmp_path / "a.png"), LOCAL, max_image_bytes=640).pixels.shape == (3, 16, 10)
    exc = _reason(read_unit, "raster", [str(tmp_path / "a.png")], LOCAL, max_image_bytes=639)
    assert exc.reason == R.too_large and exc.detail.startswith("10x16x1 needs")
    assert _reason(probe_file, str(tmp_path / "a.png"), LOCAL, max_image_bytes=639).reason == R.too_large
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((3, 8, 5), np.float32), photometric="minisblack")  # 480 bytes
    assert _reason(probe_file, str(tmp_path / "v.tif"), LOCAL, max_image_bytes=479).detail.startswith("5x8x3 needs")
    assert read_raster(str(tmp_path / "v.tif"), LOCAL, max_image_bytes=480).pixels.shape == (1, 3, 8, 5)


def test_pillow_decompression_bomb_is_too_large(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > 2 x 100: Pillow refuses
    assert _reason(read_raster, str(tmp_path / "big.png"), LOCAL).reason == R.too_large
    assert _reason(probe_file, str(tmp_path / "big.png"), LOCAL).reason == R.too_large


def _write_cases(root: Path) -> list[tuple[str, list[str], dict]]:
    """One file per decoding path; each read's real pixel bytes must never exceed the header estimate."""
    rng = np.random.default_rng(3)
    cases: list[tuple[str, list[str], dict]] = []
    gray = rng.integers(0, 4096, size=(12, 10), dtype=np.uint16)
    cases.append(("dicom-file", [factory.save(factory.make_dataset(gray, bits_stored=12), root / "dx.dcm")], {}))
    rgb = factory.make_dataset(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), photometric="RGB", modality="OT")
    rgb.compress(RLELossless)
    cases.append(("dicom-file", [factory.save(rgb, root / "rgb.dcm")], {}))
    ct = factory.ct_slice(np.zeros((6, 7)), 0.0, series_uid=generate_uid(), instance=1, slope=2.0)
    cases.append(("dicom-file", [factory.save(ct, root / "ct.dcm")], {}))
    mr = factory.make_dataset(gray, modality="MR", RescaleSlope=0.5, RescaleIntercept=0)
    cases.append(("dicom-file", [factory.save(mr, root / "mr.dcm")], {}))
    cases.append(("dicom-series", _ct_series(root / "series", 3, (5, 6)), {}))
    nib.save(nib.Nifti1Image(rng.random((5, 4, 3, 2)).astype(np.float32), np.eye(4)), root / "v.nii.gz")
    cases.append(("nifti", [str(root / "v.nii.gz")], {}))
    Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).quantize(8).save(root / "p.png")
    cases.append(("raster", [str(root / "p.png")], {}))
    Image.fromarray((gray * 16).astype(np.uint16)).save(root / "g16.png")
    cases.append(("raster", [str(root / "g16.png")], {}))
    tifffile.imwrite(root / "rgba.tif", rng.integers(0, 256, (6, 5, 4), dtype=np.uint8), photometric="rgb")
    cases.append(("raster", [str(root / "rgba.tif")], {}))
    return cases


def test_header_estimate_never_below_decoded_bytes(tmp_path):
    for kind, paths, _ in _write_cases(tmp_path):
        actual = read_unit(kind, paths, LOCAL).pixels.nbytes
        assert read_unit(kind, paths, LOCAL, max_image_bytes=10 * MiB).pixels.nbytes == actual
        with pytest.raises(UnreadableFile) as info:
            read_unit(kind, paths, LOCAL, max_image_bytes=actual - 1)
        assert info.value.reason == R.too_large, (kind, paths)
        if kind != "dicom-series":
            with pytest.raises(UnreadableFile):
                probe_file(paths[0], LOCAL, max_image_bytes=actual - 1)


# ---------------------------------------------------------------- non-finite pixels


def test_finite_pixels_rule():
    ints = np.arange(6, dtype=np.int16)
    assert finite_pixels(ints) == (ints, ())
    clean = np.ones(4, np.float32)
    out, notes = finite_pixels(clean)
    assert out is clean and notes == ()
    frozen = np.array([np.nan, 3.0, -np.inf, 1.0, np.inf], np.float64)
    frozen.flags.writeable = False
    out, notes = finite_pixels(frozen)
    np.testing.assert_array_equal(out, [1.0, 3.0, 1.0, 1.0, 1.0])
    assert notes == ("3 non-finite pixels set to the image minimum",)
    with pytest.raises(UnreadableFile) as info:
        finite_pixels(np.full((2, 2), np.nan, np.float32))
    assert info.value.reason == R.non_finite_pixels
    cplx, notes = finite_pixels(np.array([complex(np.nan, 0), 2 + 1j, 1 + 5j]))
    assert np.all(np.isfinite(cplx)) and cplx[0] == 1 + 5j and notes


def test_nifti_non_finite(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(5, 4, 3) + 10
    data[0, 0, 0], data[1, 2, 0], data[4, 3, 2] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "n.nii.gz")
    image = read_nifti(str(tmp_path / "n.nii.gz"), LOCAL)
    assert np.all(np.isfinite(image.pixels))
    expected = data.copy()
    expected[~np.isfinite(expected)] = 11.0  # the finite minimum
    np.testing.assert_array_equal(image.pixels[0], expected.transpose(2, 1, 0))
    assert image.notes == ("3 non-finite pixels set to the image minimum",)

    nib.save(nib.Nifti1Image(np.full((3, 3, 3), np.nan, np.float32), np.eye(4)), tmp_path / "all.nii")
    assert _reason(read_unit, "nifti", [str(tmp_path / "all.nii")], LOCAL).reason == R.non_finite_pixels


def test_tiff_non_finite(tmp_path):
    data = np.linspace(-5, 5, 48, dtype=np.float32).reshape(6, 8)
    data[2, 3] = np.nan
    data[5, 7] = np.inf
    tifffile.imwrite(tmp_path / "f.tif", data)
    image = read_raster(str(tmp_path / "f.tif"), LOCAL)
    assert np.all(np.isfinite(image.pixels)) and image.pixels[0, 2, 3] == image.pixels[0, 5, 7] == -5.0
    assert image.notes == ("2 non-finite pixels set to the image minimum",)
    tifffile.imwrite(tmp_path / "inf.tif", np.full((4, 4), -np.inf, np.float32))
    assert _reason(read_unit, "raster", [str(tmp_path / "inf.tif")], LOCAL).reason == R.non_finite_pixels


def _float_dicom(values: np.ndarray) -> pydicom.Dataset:
    from pydicom.uid import ParametricMapStorage

    ds = factory.make_dataset(None, modality="MR", sop_class=ParametricMapStorage)
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 32
    ds.FloatPixelData = values.astype("<f4").tobytes()
    return ds


def test_dicom_float_pixel_data_non_finite(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(3, 4) + 2
    values[0, 1], values[2, 2] = np.nan, -np.inf
    image = read_dicom_file(factory.save(_float_dicom(values), tmp_path / "f.dcm"), LOCAL)
    assert image.pixels.dtype == np.float32 and image.pixels[0, 0, 1] == image.pixels[0, 2, 2] == 2.0
    assert image.notes == ("2 non-finite pixels set to the image minimum",)
    path = factory.save(_float_dicom(np.full((2, 2), np.nan, np.float32)), tmp_path / "nan.dcm")
    assert _reason(read_dicom_file, path, LOCAL).reason == R.non_finite_pixels


def test_rescale_overflow_is_made_finite(tmp_path):
    stored = np.array([[0, 1], [2, 10]], np.uint16)
    ds = factory.make_dataset(stored, modality="MR", RescaleSlope="1e38", RescaleIntercept="0")
    image = read_dicom_file(factory.save(ds, tmp_path / "r.dcm"), LOCAL)  # 2e38 fits float32, 1e39 does not
    assert np.all(np.isfinite(image.pixels)) and image.pixels[0, 1, 1] == 0.0
    assert image.notes == ("1 non-finite pixels set to the image minimum",)

    uid = generate_uid()
    paths = [
        factory.save(factory.ct_slice(np.zeros((4, 4)), 2.5 * k, series_uid=uid, instance=k + 1,
                                      slope=1e38 if k == 1 else 1.0, intercept=0.0, RescaleType="HU"),
                     tmp_path / f"s{k}.dcm")
        for k in range(3)
    ]
    for p in paths:  # stored values 0 except one pixel of slice 1
        ds = pydicom.dcmread(p)
        if ds.InstanceNumber == 2:
            arr = ds.pixel_array.copy()
            arr[0, 0] = 100
            ds.PixelData = arr.tobytes()
            ds.save_as(p)
    volume = read_dicom_series(paths, LOCAL)
    assert np.all(np.isfinite(volume.pixels)) and volume.notes[-1] == "1 non-finite pixels set to the image minimum"


# ---------------------------------------------------------------- storage failures are not bad files


class NoCredentialsError(Exception):
    """Stands in for botocore's: matched by class name, botocore need not be imported."""


class ClientError(Exception):
    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class ClientResponseError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__("s3://bucket/DOE_JOHN/x.dcm")
        self.status = status


class CommClosedError(OSError):
    pass


class KilledWorker(Exception):
    pass


class _FaultyFile(io.BytesIO):
    def __init__(self, data: bytes, fault: BaseException | None, after: int) -> None:
        super().__init__(data)
        self.fault, self.after = fault, after

    def _check(self, n: int | None) -> None:
        if self.fault is not None and self.tell() + (n if n is not None and n >= 0 else 1) > self.after:
            raise self.fault

    def read(self, n: int | None = -1) -> bytes:
        self._check(n)
        return super().read(n)

    def read1(self, n: int = -1) -> bytes:
        self._check(n)
        return super().read1(n)

    def readinto(self, b) -> int:  # type: ignore[override]
        self._check(len(b))
        return super().readinto(b)


class FaultyFS(MemoryFileSystem):
    """memory:// whose open (``fail_open``) or reads past ``after`` bytes (``fail_read``) raise."""

    cachable = False
    protocol = ("faulty",)

    def __init__(self, fail_open=None, fail_read=None, after: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_open, self.fail_read, self.after = fail_open, fail_read, after

    def _open(self, path, mode="rb", **kwargs):
        if self.fail_open is not None:
            raise self.fail_open
        f = super()._open(path, mode, **kwargs)
        return _FaultyFile(f.getvalue(), self.fail_read, self.after) if "r" in mode else f


@pytest.fixture
def files():
    """The same inputs for every kind, stored in memory:// under a path naming a (fake) patient."""
    fs = MemoryFileSystem()
    root = f"/limits-{uuid.uuid4().hex}/DOE_JOHN"
    rng = np.random.default_rng(9)
    fs.pipe(f"{root}/x.dcm", factory.to_bytes(factory.make_dataset(rng.integers(0, 99, (8, 8), dtype=np.uint16))))
    uid = generate_uid()
    series = []
    for k in range(3):
        series.append(f"{root}/ct/{k}.dcm")
        fs.pipe(series[-1], factory.to_bytes(factory.ct_slice(np.zeros((4, 4)), 2.5 * k, series_uid=uid,
                                                              instance=k + 1)))
    fs.pipe(f"{root}/v.nii.gz", gzip.compress(nib.Nifti1Image(np.ones((4, 3, 2), np.float32), np.eye(4)).to_bytes()))
    png, tif = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(png, format="PNG")
    tifffile.imwrite(tif, np.zeros((5, 6), np.uint16))
    fs.pipe(f"{root}/p.png", png.getvalue())
    fs.pipe(f"{root}/t.tif", tif.getvalue())
    fs.pipe(f"{root}/junk.dcm", b"this is not DICOM" * 20)
    fs.pipe(f"{root}/junk.nii.gz", b"\x1f\x8b" + bytes(60))
    fs.pipe(f"{root}/junk.png", b"\x89PNG\r\n\x1a\n" + bytes(30))
    yield root, series
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


def _calls(root: str, series: list[str]):
    yield lambda fs: probe_file(f"{root}/x.dcm", fs)
    yield lambda fs: probe_file(f"{root}/v.nii.gz", fs)
    yield lambda fs: probe_file(f"{root}/p.png", fs)
    yield lambda fs: probe_file(f"{root}/t.tif", fs)
    yield lambda fs: read_unit("dicom-file", [f"{root}/x.dcm"], fs)
    yield lambda fs: read_unit("dicom-series", series, fs)  # non-local fs: slices fetched on threads
    yield lambda fs: read_unit("nifti", [f"{root}/v.nii.gz"], fs)
    yield lambda fs: read_unit("raster", [f"{root}/p.png"], fs)
    yield lambda fs: read_unit("raster", [f"{root}/t.tif"], fs)


def _assert_infrastructure(call, fs, name: str) -> None:
    with pytest.raises(InfrastructureError) as info:
        call(fs)
    assert str(info.value) == f"{name} reading a source file"
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize(
    "fault",
    [ConnectionRefusedError(errno.ECONNREFUSED, "refused: s3://b/DOE_JOHN"), NoCredentialsError("Unable to locate"),
     TimeoutError("timed out"), PermissionError(errno.EACCES, "denied"), ClientError("InvalidAccessKeyId", 403)],
    ids=lambda e: type(e).__name__,
)
def test_open_failures_raise_infrastructure_error(files, fault):
    root, series = files
    fs = FaultyFS(fail_open=fault)
    for call in _calls(root, series):
        _assert_infrastructure(call, fs, type(fault).__name__)


@pytest.mark.parametrize("after", [0, 9, 140, 400])
@pytest.mark.parametrize(
    "fault",
    [ConnectionResetError(errno.ECONNRESET, "reset"), NoCredentialsError("none"), OSError(errno.EIO, "I/O error"),
     socket.timeout("read timed out")],
    ids=lambda e: type(e).__name__,
)
def test_read_failures_mid_parse_raise_infrastructure_error(files, fault, after):
    """Faults part-way through a header land inside the readers' catch-alls: never a quarantine reason."""
    root, series = files
    fs = FaultyFS(fail_read=fault, after=after)
    for call in _calls(root, series):
        try:
            call(fs)
        except InfrastructureError as exc:
            assert str(exc) == f"{type(fault).__name__} reading a source file"
        except UnreadableFile as exc:  # pragma: no cover - the failure this test guards against
            pytest.fail(f"storage fault after {after} bytes quarantined as {exc.reason}")
        else:  # a probe may finish before reaching `after` bytes
            assert after > 0


def test_corrupt_files_on_a_healthy_faulty_fs_still_quarantine(files):
    root, _ = files
    fs = FaultyFS()
    assert _reason(probe_file, f"{root}/junk.dcm", fs).reason == R.not_dicom
    assert _reason(read_unit, "dicom-file", [f"{root}/junk.dcm"], fs).reason == R.not_dicom
    assert _reason(probe_file, f"{root}/junk.nii.gz", fs).reason == R.unreadable_nifti
    assert _reason(read_unit, "nifti", [f"{root}/junk.nii.gz"], fs).reason == R.unreadable_nifti
    assert _reason(read_unit, "raster", [f"{root}/junk.png"], fs).reason == R.unreadable_image
    assert probe_file(f"{root}/x.dcm", fs).rows == 8


def test_missing_file_is_not_infrastructure(files):
    root, _ = files
    with pytest.raises(FileNotFoundError):
        read_unit("raster", [f"{root}/absent.png"], FaultyFS())


def test_is_infrastructure_error_table():
    import gzip as gz

    yes = [
        ConnectionError(), ConnectionResetError(), BrokenPipeError(), TimeoutError(), socket.timeout(),
        socket.gaierror(-2, "Name or service not known"), PermissionError(errno.EACCES, "x"),
        OSError(errno.EIO, "x"), OSError(errno.ENETUNREACH, "x"), OSError(errno.ESTALE, "x"),
        InfrastructureError("x"), NoCredentialsError(), ClientError("AccessDenied", 403), ClientError("SlowDown", 503),
        ClientError("InternalError", 500), ClientResponseError(502), ClientResponseError(401), CommClosedError(),
        KilledWorker(),
    ]
    no = [
        FileNotFoundError(errno.ENOENT, "x"), IsADirectoryError(errno.EISDIR, "x"), NotADirectoryError(),
        OSError("no errno"), gz.BadGzipFile("bad"), EOFError(), ValueError(), KeyError(), MemoryError(),
        UnreadableFile(R.truncated, "x"), ClientError("NoSuchKey", 404), ClientResponseError(404),
        ClientResponseError(416),
    ]
    assert [type(e).__name__ for e in yes if not is_infrastructure_error(e)] == []
    assert [type(e).__name__ for e in no if is_infrastructure_error(e)] == []

    def chained(outer: Exception, inner: Exception) -> Exception:
        try:
            try:
                raise inner
            except Exception as exc:
                raise outer from exc
        except Exception as exc:
            return exc

    assert is_infrastructure_error(chained(ValueError("wrapped"), ConnectionResetError()))
    assert is_infrastructure_error(chained(OSError(errno.EIO, "s3fs"), ClientError("ExpiredToken", 400)))
    assert not is_infrastructure_error(chained(FileNotFoundError(), ClientError("NoSuchKey", 404)))
    assert not is_infrastructure_error(chained(UnreadableFile(R.truncated, "x"), ConnectionError()))


def test_real_library_exceptions():
    botocore = pytest.importorskip("botocore.exceptions")
    aiohttp = pytest.importorskip("aiohttp")
    assert is_infrastructure_error(botocore.NoCredentialsError())
    assert is_infrastructure_error(botocore.PartialCredentialsError(provider="env", cred_var="AWS_SECRET"))
    assert is_infrastructure_error(botocore.EndpointConnectionError(endpoint_url="http://localhost:1"))
    assert is_infrastructure_error(botocore.ConnectTimeoutError(endpoint_url="http://localhost:1"))
    assert is_infrastructure_error(botocore.ReadTimeoutError(endpoint_url="http://localhost:1"))
    assert is_infrastructure_error(botocore.ClientError({"Error": {"Code": "InvalidAccessKeyId"}}, "GetObject"))
    assert is_infrastructure_error(
        botocore.ClientError({"Error": {"Code": "X"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    )
    assert not is_infrastructure_error(botocore.ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject"))
    assert is_infrastructure_error(aiohttp.ServerDisconnectedError())
    assert is_infrastructure_error(aiohttp.ClientConnectionError())
    from fsspec.exceptions import FSTimeoutError

    assert is_infrastructure_error(FSTimeoutError())


def test_monochrome1_float_with_nan_keeps_finite_pixels(tmp_path):
    values = np.array([[1.0, 2.0], [np.nan, 5.0]], np.float32)
    ds = _float_dicom(values)
    ds.PhotometricInterpretation = "MONOCHROME1"
    image = read_dicom_file(factory.save(ds, tmp_path / "m1.dcm"), LOCAL)
    np.testing.assert_array_equal(image.pixels[0], [[5.0, 4.0], [1.0, 1.0]])  # inverted, NaN -> minimum
    assert image.notes == ("1 non-finite pixels set to the image minimum",)
