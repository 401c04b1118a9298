"""Small helpers building DICOM test inputs with pydicom (no dependency on medpipe.demo)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

FAKE_NAME = "DOE^JOHN"
FAKE_ID = "PID12345678"


def make_dataset(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    modality: str = "DX",
    sop_class: str = DigitalXRayImageStorageForPresentation,
    series_uid: str | None = None,
    pixel_spacing: Sequence[float] | None = (0.5, 0.25),
    **attrs: object,
) -> FileDataset:
    """A minimal Part 10 dataset holding ``pixels`` (None: no PixelData) plus extra keyword attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = FAKE_NAME
    ds.PatientID = FAKE_ID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    for key, value in attrs.items():
        setattr(ds, key, value)
    if pixels is not None:
        bits = bits_stored or pixels.dtype.itemsize * 8
        ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    return ds


def save(ds: pydicom.Dataset, path: str | Path) -> str:
    """Write ``ds`` as a Part 10 file (with preamble) and return the path as str."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def jpeg_baseline(pixels: np.ndarray, **attrs: object) -> FileDataset:
    """8-bit grayscale (Y, X) or RGB (Y, X, 3) encoded with Pillow as JPEG Baseline and encapsulated."""
    rgb = pixels.ndim == 3
    ds = make_dataset(pixels, photometric="RGB" if rgb else "MONOCHROME2", sop_class=SecondaryCaptureImageStorage,
                      modality="OT", **attrs)
    buf = io.BytesIO()
    # subsampling=1 is 4:2:2, matching the YBR_FULL_422 label DICOM requires for baseline colour
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, **({"subsampling": 1} if rgb else {}))
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "YBR_FULL_422" if rgb else "MONOCHROME2"
    return ds


class _BitWriter:
    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def put(self, value: int, nbits: int) -> None:
        for shift in range(nbits - 1, -1, -1):
            self.acc = (self.acc << 1) | ((value >> shift) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0)  # byte stuffing
                self.acc, self.n = 0, 0

    def flush(self) -> bytes:
        if self.n:
            self.put((1 << (8 - self.n)) - 1, 8 - self.n)  # pad with 1-bits
        return bytes(self.out)


def jpeg_lossless_sv1(frame: np.ndarray, precision: int = 16) -> bytes:
    """Encode a (Y, X) unsigned frame as JPEG Lossless process 14, predictor 1 (ITU T.81 H.1).

    Test-only encoder: pydicom and pylibjpeg can decode but not encode this syntax. Huffman
    table: the 17 difference categories all get 5-bit codes (code == category).
    """
    rows, cols = frame.shape
    x = frame.astype(np.int64)
    bw = _BitWriter()
    for r in range(rows):
        for c in range(cols):
            if r == 0 and c == 0:
                pred = 1 << (precision - 1)
            elif r == 0:
                pred = x[r, c - 1]
            elif c == 0:
                pred = x[r - 1, c]
            else:
                pred = x[r, c - 1]
            diff = int(x[r, c] - pred) % 65536
            if diff >= 32768:
                diff -= 65536
            ssss = 0 if diff == 0 else abs(diff).bit_length()
            bw.put(ssss, 5)
            if 0 < ssss < 16:
                bw.put(diff if diff > 0 else diff + (1 << ssss) - 1, ssss)
    bits = [0] * 16
    bits[4] = 17
    dht = bytes([0x00]) + bytes(bits) + bytes(range(17))
    sof = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ns=1, Cs=1, Td=0, Ss=predictor 1, Se=0, Ah/Al=0
    seg = lambda marker, body: bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body  # noqa: E731
    return b"\xff\xd8" + seg(0xC3, sof) + seg(0xC4, dht) + seg(0xDA, sos) + bw.flush() + b"\xff\xd9"


def jpeg_lossless(pixels: np.ndarray, syntax: str, **attrs: object) -> FileDataset:
    """uint16 (Y, X) frame as JPEG Lossless (.57 or .70) encapsulated dataset."""
    ds = make_dataset(pixels, **attrs)
    ds.PixelData = encapsulate([jpeg_lossless_sv1(pixels, precision=16)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def ct_slice(
    hu: np.ndarray,
    z: float,
    *,
    series_uid: str,
    instance: int,
    slope: float = 1.0,
    intercept: float = -1024.0,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-50.0, -60.0, 0.0),
    geometry: bool = True,
    **attrs: object,
) -> FileDataset:
    """One CT slice storing ``(hu - intercept) / slope`` as int16, positioned ``z`` mm along the normal."""
    stored = np.round((hu - intercept) / slope).astype(np.int16)
    cos = np.asarray(orientation, dtype=float).reshape(2, 3)
    normal = np.cross(cos[0], cos[1])
    position = np.asarray(origin, dtype=float) + z * normal
    extra: dict[str, object] = dict(
        RescaleSlope=slope, RescaleIntercept=intercept, InstanceNumber=instance, SliceThickness=2.5
    )
    if geometry:
        extra.update(ImagePositionPatient=[float(v) for v in position],
                     ImageOrientationPatient=[float(v) for v in orientation])
    extra.update(attrs)
    return make_dataset(stored, modality="CT", sop_class=CTImageStorage, series_uid=series_uid,
                        pixel_spacing=(0.7, 0.6), **extra)


def mr_slice(
    pixels: np.ndarray,
    position: Sequence[float],
    *,
    series_uid: str,
    instance: int,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    **attrs: object,
) -> FileDataset:
    """One uint16 MR slice at ``position`` (ImagePositionPatient) with extra keyword attributes (EchoNumbers...)."""
    from pydicom.uid import MRImageStorage

    return make_dataset(pixels.astype(np.uint16), modality="MR", sop_class=MRImageStorage, series_uid=series_uid,
                        pixel_spacing=(0.9, 0.8), InstanceNumber=instance,
                        ImagePositionPatient=[float(v) for v in position],
                        ImageOrientationPatient=[float(v) for v in orientation], **attrs)


def enhanced_mr(
    frames: np.ndarray,
    positions: Sequence[Sequence[float]],
    orientations: Sequence[Sequence[float]],
    *,
    stack_ids: Sequence[str] | None = None,
    echo_times: Sequence[float] | None = None,
    temporal: Sequence[int] | None = None,
) -> FileDataset:
    """Enhanced MR multi-frame (uint16 ``frames`` (N, Y, X)) with per-frame functional groups.

    Per frame: PlanePositionSequence, PlaneOrientationSequence, FrameContentSequence (StackID,
    InStackPositionNumber, TemporalPositionIndex) and MREchoSequence when given; PixelMeasuresSequence shared.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import EnhancedMRImageStorage

    ds = make_dataset(frames.astype(np.uint16), modality="MR", sop_class=EnhancedMRImageStorage, pixel_spacing=None)
    measures, shared = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.9, 0.8], 2.0
    shared.PixelMeasuresSequence = Seq([measures])
    ds.SharedFunctionalGroupsSequence = Seq([shared])
    items = []
    for k in range(len(frames)):
        item, pos, orient, content = Dataset(), Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [float(v) for v in positions[k]]
        orient.ImageOrientationPatient = [float(v) for v in orientations[k]]
        item.PlanePositionSequence, item.PlaneOrientationSequence = Seq([pos]), Seq([orient])
        if stack_ids is not None:
            content.StackID = stack_ids[k]
            content.InStackPositionNumber = k + 1
        if temporal is not None:
            content.TemporalPositionIndex = temporal[k]
        item.FrameContentSequence = Seq([content])
        if echo_times is not None:
            echo = Dataset()
            echo.EffectiveEchoTime = echo_times[k]
            item.MREchoSequence = Seq([echo])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Seq(items)
    return ds


def rle_claiming(rows: int, columns: int, *, bits: int = 16, modality: str = "DX") -> FileDataset:
    """An RLE Lossless dataset whose header claims ``rows`` x ``columns`` but holds a few bytes of segments.

    The one fragment has a valid RLE header (one segment per byte of a sample) and a single replicate run
    per segment, so the file is a few hundred bytes while a decoder would allocate rows x columns x bytes.
    """
    from pydicom.uid import RLELossless

    ds = make_dataset(None, modality=modality)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    segments = bits // 8
    offsets = [64 + 2 * k for k in range(segments)] + [0] * (15 - segments)
    header = np.array([segments, *offsets], dtype="<u4").tobytes()
    ds.PixelData = encapsulate([header + b"\x81\x00" * segments])  # each segment: 128 copies of 0
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds
