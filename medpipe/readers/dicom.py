"""Decode one DICOM file (single- or multi-frame) into a channel-first :class:`DecodedImage`.

Compressed transfer syntaxes are decoded by pydicom's pixel decoders: JPEG Baseline/Extended
(Pillow or pylibjpeg-libjpeg), JPEG Lossless (.57/.70) and JPEG-LS (pylibjpeg-libjpeg),
JPEG 2000 / HTJ2K (pylibjpeg-openjpeg or Pillow), RLE Lossless (pydicom or pylibjpeg-rle).
The helpers here (parsing with truncation checks, frame decoding, rescale, geometry) are shared
with :mod:`medpipe.readers.series` and :mod:`medpipe.readers.probe`.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

import fsspec
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, as_pixel_options, convert_color_space
from pydicom.pixels.decoders.base import get_decoder

from .acquisitions import (
    ORIENTATION_TOL,
    POSITION_TOL_MM,
    TILT_NOTE_DEG,
    frame_acquisitions,
    normal_of,
    regular_runs,
    tilt_degrees,
)
from .base import (
    DecodedImage,
    QuarantineReason,
    UnreadableFile,
    check_image_bytes,
    finite_image,
    infrastructure_guard,
    raise_if_infrastructure,
)

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_SEQUENCE_DELIMITER = 0xFFFEE0DD


class EOFGuard:
    """Binary file wrapper noting reads cut short by end-of-file and seeks past it.

    Written by hand because pydicom's element reader silently stops at EOF and keeps short values,
    so a truncated header would otherwise parse "successfully".
    """

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self.size = size
        self.hit_eof = False
        self.name = "<dicom>"  # pydicom reads `name`; never expose the real path (PHI)

    def read(self, n: int | None = -1) -> bytes:
        data = self._f.read() if n is None or n < 0 else self._f.read(n)
        # A 0-byte read of an 8-byte tag header is pydicom's normal end-of-dataset probe.
        if n is not None and n > 0 and len(data) < n and not (len(data) == 0 and n == 8):
            self.hit_eof = True
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self._f.seek(offset, whence)
        pos = self._f.tell() if pos is None else pos
        if pos > self.size:
            self.hit_eof = True
        return pos

    def tell(self) -> int:
        return self._f.tell()


def has_dicm_preamble(head: bytes) -> bool:
    """True when the Part 10 "DICM" magic sits after the 128-byte preamble."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def looks_like_raw_dataset(head: bytes) -> bool:
    """Sniff a preamble-less dataset: first element in group 0002 or 0008, either endianness.

    Hand-written because ``dcmread(force=True)`` accepts any bytes and produces garbage elements.
    """
    groups = (0x0002, 0x0008)
    return len(head) >= 8 and (struct.unpack("<H", head[:2])[0] in groups or struct.unpack(">H", head[:2])[0] in groups)


def parse_dicom(fp: BinaryIO, size: int, **dcmread_kwargs: Any) -> pydicom.Dataset:
    """Parse a DICOM dataset from ``fp`` (``size`` bytes), raising :class:`UnreadableFile`.

    Reasons: not_dicom (no preamble and not a raw dataset), truncated (file ends inside the
    dataset), decode_error (DICM present but the header cannot be parsed).
    """
    start = fp.tell()
    head = fp.read(132)
    fp.seek(start)
    preamble = has_dicm_preamble(head)
    if not preamble and not looks_like_raw_dataset(head):
        raise UnreadableFile(QuarantineReason.not_dicom, f"no DICM preamble ({size} bytes)")
    guard = EOFGuard(fp, size)
    try:
        ds = pydicom.dcmread(guard, force=not preamble, **dcmread_kwargs)
    except InvalidDicomError:
        raise UnreadableFile(QuarantineReason.not_dicom, "not a DICOM dataset") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a quarantine reason
        raise_if_infrastructure(exc)  # ... unless the storage under it failed
        if guard.hit_eof or isinstance(exc, EOFError):
            raise UnreadableFile(QuarantineReason.truncated, f"file ends inside the header ({size} bytes)") from None
        reason = QuarantineReason.decode_error if preamble else QuarantineReason.not_dicom
        raise UnreadableFile(reason, f"header parse failed ({type(exc).__name__})") from None
    if guard.hit_eof or _short_value(ds):
        raise UnreadableFile(QuarantineReason.truncated, f"file ends inside the dataset ({size} bytes)")
    if not preamble and len(ds) == 0:
        raise UnreadableFile(QuarantineReason.not_dicom, "no DICOM elements")
    return ds


def _short_value(ds: pydicom.Dataset) -> bool:
    """True if a raw top-level element holds fewer bytes than its declared length (cut at EOF)."""
    for elem in ds.elements():
        length = getattr(elem, "length", None)
        value = elem.value
        if isinstance(value, bytes) and length not in (None, 0xFFFFFFFF) and len(value) < length:
            return True
    return False


def load_dataset(path: str, fs: fsspec.AbstractFileSystem) -> pydicom.Dataset:
    """Read the whole file in one request and parse it fully (pixels included)."""
    with fs.open(path, "rb") as f:
        data = f.read()
    return parse_dicom(io.BytesIO(data), len(data))


def strip_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Delete pixel data (and overlay bitmaps, which may hold burned-in text) from ``ds`` in place."""
    for tag in list(ds.keys()):
        if int(tag) in PIXEL_TAGS or (tag.group & 0xFF00 == 0x6000 and tag.element == 0x3000):
            del ds[tag]
    return ds


def get_float(ds: pydicom.Dataset, keyword: str) -> float | None:
    """Return a numeric element as float, or None when absent/empty/malformed."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def frame_count(ds: pydicom.Dataset) -> int:
    """NumberOfFrames, 1 when absent or malformed (the decoder then reports what it finds)."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def get_floats(ds: pydicom.Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    """Return a multi-valued numeric element as ``n`` floats, or None."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        out = tuple(float(v) for v in (value if isinstance(value, Sequence) else [value]))
        return out if len(out) == n and all(np.isfinite(out)) else None
    except (TypeError, ValueError):
        return None


def _fg_item(ds: pydicom.Dataset, group_keyword: str, seq_keyword: str, frame: int | None = None):
    """First item of ``seq_keyword`` in the per-frame (``frame``) or shared functional groups."""
    try:
        groups = ds.get(group_keyword)
        if not groups:
            return None
        item = groups[frame if frame is not None else 0]
        seq = item.get(seq_keyword)
        return seq[0] if seq else None
    except (IndexError, AttributeError, TypeError):
        return None


def _lookup(ds: pydicom.Dataset, seq_keyword: str, keyword: str, frame: int = 0):
    """Find ``keyword`` in per-frame, then shared functional groups, then the top level."""
    for source in (
        _fg_item(ds, "PerFrameFunctionalGroupsSequence", seq_keyword, frame),
        _fg_item(ds, "SharedFunctionalGroupsSequence", seq_keyword),
        ds,
    ):
        if source is not None and keyword in source:
            return source
    return None


def pixel_spacing(ds: pydicom.Dataset, frame: int = 0) -> tuple[float, float]:
    """(dy, dx) from PixelSpacing (also in functional groups), then ImagerPixelSpacing, else 1.0."""
    src = _lookup(ds, "PixelMeasuresSequence", "PixelSpacing", frame)
    for source, keyword in ((src, "PixelSpacing"), (ds, "ImagerPixelSpacing")):
        if source is not None and (values := get_floats(source, keyword, 2)) and min(values) > 0:
            return values[0], values[1]
    return 1.0, 1.0


def orientation_cosines(ds: pydicom.Dataset, frame: int = 0) -> np.ndarray | None:
    """ImageOrientationPatient (of ``frame`` for enhanced files) as (2, 3) unit row/column cosines, or None."""
    src = _lookup(ds, "PlaneOrientationSequence", "ImageOrientationPatient", frame)
    values = get_floats(src, "ImageOrientationPatient", 6) if src is not None else None
    if values is None:
        return None
    cos = np.asarray(values, dtype=np.float64).reshape(2, 3)
    norms = np.linalg.norm(cos, axis=1)
    if np.any(norms < 1e-6):
        return None
    return cos / norms[:, None]


def build_affine(cos: np.ndarray, origin: Sequence[float], dy: float, dx: float, step: np.ndarray) -> np.ndarray:
    """4x4 affine mapping index (x, y, z) to LPS patient coordinates (mm).

    Column x follows the row cosines (spacing dx), y the column cosines (dy), z the slice ``step``.
    """
    affine = np.eye(4)
    affine[:3, 0] = cos[0] * dx
    affine[:3, 1] = cos[1] * dy
    affine[:3, 2] = step
    affine[:3, 3] = origin
    return affine


def stack_geometry(
    cosines: Sequence[np.ndarray], positions: Sequence[Sequence[float]], dy: float, dx: float, thickness: float
) -> tuple[list[int], float, np.ndarray, tuple[str, ...]]:
    """(order, dz, affine, notes) of slices with full geometry, sorted ascending along the normal.

    The step vector comes from the first and last positions, so a gantry tilt gives the true (sheared)
    affine (noted in degrees); dz is the distance between slices along the normal (``thickness`` for one
    slice). Raises ``decode_error`` for different orientations, shared positions and irregular spacing:
    spacing is never averaged, the caller splits first (:func:`medpipe.readers.acquisitions.split_series`).
    """
    n = len(positions)
    cos = cosines[0]
    if any(np.abs(c - cos).max() > ORIENTATION_TOL for c in cosines):
        raise UnreadableFile(QuarantineReason.decode_error, "slices have different orientations")
    pos = np.asarray(positions, dtype=np.float64)
    normal = normal_of(cos.reshape(-1))
    keys = pos @ normal
    order = np.argsort(keys, kind="stable")
    diffs = np.diff(keys[order])
    if diffs.size and diffs.min() < POSITION_TOL_MM:
        dup = int(np.sum(diffs < POSITION_TOL_MM))
        raise UnreadableFile(QuarantineReason.decode_error, f"{dup} slice pair(s) share a position along normal")
    notes: list[str] = []
    if n > 1:
        runs = regular_runs(pos[order])
        if len(runs) > 1:
            gaps = [float(keys[order[b[0]]] - keys[order[a[-1]]]) for a, b in zip(runs, runs[1:])]
            raise UnreadableFile(
                QuarantineReason.decode_error,
                f"non-uniform slice spacing: {len(runs)} regular runs, largest gap {max(gaps):.2f} mm "
                "(split the series first)",
            )
        step = (pos[order[-1]] - pos[order[0]]) / (n - 1)
        dz = float(step @ normal)
        if (tilt := tilt_degrees(step, normal)) > TILT_NOTE_DEG:
            notes.append(f"gantry tilt {tilt:.1f} deg")
        if (jitter := float(np.abs(diffs - dz).max())) > 0.01:
            notes.append(f"slice spacing varies by up to {jitter:.2f} mm (within tolerance)")
    else:
        dz = thickness
        step = normal * dz
    return [int(i) for i in order], dz, build_affine(cos, pos[order[0]], dy, dx, step), tuple(notes)


def lps_axcodes(affine: np.ndarray) -> str:
    """Axis codes of the index axes for an LPS affine (e.g. "LPS" for a plain axial stack)."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(affine, labels=(("R", "L"), ("A", "P"), ("I", "S"))))


def _decode_error(exc: Exception) -> UnreadableFile:
    text = str(exc)
    if isinstance(exc, EOFError) or "less than expected" in text or "truncat" in text.lower():
        return UnreadableFile(QuarantineReason.truncated, f"pixel data shorter than expected ({type(exc).__name__})")
    return UnreadableFile(QuarantineReason.decode_error, f"pixel decode failed ({type(exc).__name__})")


def decode_pixels(ds: pydicom.Dataset, frames: Sequence[int] | None = None) -> np.ndarray:
    """Decode ``frames`` (default all) to (frames, Y, X, C) stored values: colour as RGB, MONOCHROME1 inverted.

    A few frames out of many are decoded one by one (pydicom's ``index``); otherwise all are decoded at once.

    pydicom 3 already converts YBR_FULL/YBR_FULL_422 to RGB (``raw=False``); the decoder's
    metadata tells us the photometric interpretation of what it returned, so we only convert
    when it did not.
    """
    if not any(int(t) in PIXEL_TAGS for t in ds.keys()):
        raise UnreadableFile(QuarantineReason.no_pixel_data, "no PixelData element")
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax is None:  # preamble-less file without meta: the encoding we parsed it with tells
        is_implicit, is_little = ds.original_encoding
        tsyntax = pydicom.uid.ImplicitVRLittleEndian if is_implicit else (
            pydicom.uid.ExplicitVRLittleEndian if is_little else pydicom.uid.ExplicitVRBigEndian
        )
        ds.file_meta.TransferSyntaxUID = tsyntax
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnreadableFile(QuarantineReason.decode_error, "unsupported transfer syntax") from None
    if not decoder.is_available:
        raise UnreadableFile(QuarantineReason.decode_error, "no decoder plugin installed for transfer syntax")
    total = frame_count(ds)
    if frames is not None and decoded_frame_count(total, frames) < total:
        return np.concatenate([_decode(ds, decoder, index=int(f)) for f in frames])
    arr = _decode(ds, decoder, index=None)
    return arr if frames is None else arr[list(frames)]


def decoded_frame_count(total: int, frames: Sequence[int] | None) -> int:
    """How many frames :func:`decode_pixels` decodes: the selection when it is under half the file, else all."""
    return len(frames) if frames is not None and 2 * len(frames) < total else total


def _get_int(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def decoded_nbytes(ds: pydicom.Dataset, frames: int) -> tuple[int, int, int] | None:
    """(Columns, Rows, bytes) that decoding ``frames`` frames of ``ds`` yields, from header facts only.

    Rows x Columns x frames x SamplesPerPixel x bytes per decoded sample: BitsAllocated rounded up to bytes,
    at least 2 for PALETTE COLOR (3 samples out), at least 4 when the output is rescaled (CT, a modality LUT
    or a non-identity RescaleSlope/Intercept: float32). None without Rows/Columns (the decoder rejects it).
    Used by the probe and the readers to enforce ``max_image_bytes`` before anything is decoded.
    """
    rows, columns = _get_int(ds, "Rows"), _get_int(ds, "Columns")
    if not rows or not columns:
        return None
    samples = max(1, _get_int(ds, "SamplesPerPixel") or 1)
    per_sample = max(1, ((_get_int(ds, "BitsAllocated") or 8) + 7) // 8)
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if photometric == "PALETTE COLOR":
        samples, per_sample = 3, max(per_sample, 2)
    elif samples == 1 and _is_rescaled(ds):
        per_sample = max(per_sample, 4)
    return columns, rows, rows * columns * max(1, frames) * samples * per_sample


def _is_rescaled(ds: pydicom.Dataset) -> bool:
    if str(ds.get("Modality") or "").strip().upper() == "CT" or ds.get("ModalityLUTSequence"):
        return True
    return rescale_params(ds, 0) not in (None, (1.0, 0.0))


def check_dataset_size(ds: pydicom.Dataset, frames: int, max_image_bytes: int | None) -> None:
    """Raise ``too_large`` when decoding ``frames`` frames of ``ds`` would exceed ``max_image_bytes``."""
    if max_image_bytes is not None and (size := decoded_nbytes(ds, frames)) is not None:
        columns, rows, nbytes = size
        check_image_bytes(columns, rows, frames, nbytes, max_image_bytes)


def _decode(ds: pydicom.Dataset, decoder: Any, index: int | None) -> np.ndarray:
    """One decoder call (all frames, or frame ``index``) -> (frames, Y, X, C)."""
    try:
        arr, meta = decoder.as_array(ds, index=index, validate=True, raw=False, **as_pixel_options(ds))
        photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
        frames = 1 if index is not None else int(meta.get("number_of_frames") or 1)
        samples = int(meta.get("samples_per_pixel") or 1)
        if photometric in ("YBR_FULL", "YBR_FULL_422") and samples == 3:
            arr = convert_color_space(arr, photometric, "RGB", per_frame=frames > 1)
        elif photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
            samples = 3
    except UnreadableFile:
        raise
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many exception types
        raise_if_infrastructure(exc)
        raise _decode_error(exc) from None
    arr = arr.reshape(frames, int(meta["rows"]), int(meta["columns"]), samples)
    if not arr.dtype.isnative:  # big-endian transfer syntax: hand numpy-native data downstream
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if photometric == "MONOCHROME1":
        arr = invert_monochrome1(arr, ds)
    return arr


def invert_monochrome1(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Map MONOCHROME1 stored values onto the MONOCHROME2 convention (low = dark), keeping dtype.

    Done on stored values (before rescale) so the dtype and value range are preserved; pydicom has
    no helper for this (its presentation LUT only handles PresentationLUTShape).
    """
    if arr.dtype.kind == "f":  # mirror the finite range; NaN/inf stay non-finite for finite_pixels
        finite = arr[np.isfinite(arr)]
        return (finite.max() + finite.min() - arr) if finite.size else arr
    if arr.dtype.kind == "i":
        return ~arr  # -x - 1: mirrors the signed range [-2^(n-1), 2^(n-1) - 1] onto itself
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    top = np.asarray(min((1 << bits) - 1, np.iinfo(arr.dtype).max), dtype=arr.dtype)
    return top - np.minimum(arr, top)


def rescale_params(ds: pydicom.Dataset, frame: int = 0) -> tuple[float, float] | None:
    """(slope, intercept) for ``frame`` from functional groups or the top level; None if absent."""
    src = _lookup(ds, "PixelValueTransformationSequence", "RescaleSlope", frame)
    if src is None:
        src = _lookup(ds, "PixelValueTransformationSequence", "RescaleIntercept", frame)
    if src is None:
        return None
    slope = get_float(src, "RescaleSlope")
    intercept = get_float(src, "RescaleIntercept")
    return (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


def to_modality_values(
    arr: np.ndarray, ds: pydicom.Dataset, modality: str, frames: Sequence[int] | None = None
) -> np.ndarray:
    """Apply the modality LUT / rescale to (frames, Y, X, C) stored values.

    CT becomes HU: int16 when that is exact (integer stored values, slope 1, integer intercepts, HU within int16:
    nearly every CT, with no float copy), else float32; other modalities become float32 only when a non-identity
    rescale is present, else keep their native dtype. Rescale is applied per frame by hand
    (float32) because pydicom's ``apply_rescale`` only reads top-level attributes (enhanced
    multi-frame keeps them per frame) and returns float64. ``frames``: the file's frame numbers of ``arr``.
    """
    if arr.shape[-1] != 1:  # colour data has no modality LUT
        return arr
    if "ModalityLUTSequence" in ds and ds.ModalityLUTSequence:
        out = apply_modality_lut(arr, ds)
        return out.astype(np.float32) if modality == "CT" else out
    numbers = list(frames) if frames is not None else list(range(arr.shape[0]))
    params = [rescale_params(ds, i) for i in numbers]
    identity = all(p is None or p == (1.0, 0.0) for p in params)
    if identity and modality != "CT":
        return arr
    if modality == "CT" and arr.dtype.kind in "iu" and all(p is None or (p[0] == 1.0 and float(p[1]).is_integer())
                                                          for p in params):
        hu = arr.astype(np.int32)
        for i, p in enumerate(params):
            if p is not None and p[1]:
                hu[i] += int(p[1])
        if hu.size == 0 or (int(hu.min()) >= -32768 and int(hu.max()) <= 32767):
            return hu.astype(np.int16)
        return hu.astype(np.float32)
    out = arr.astype(np.float32)
    if not identity:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is handled by finite_pixels
            for i, p in enumerate(params):
                if p is not None and p != (1.0, 0.0):
                    out[i] *= np.float32(p[0])
                    out[i] += np.float32(p[1])
    return out


def frame_positions(ds: pydicom.Dataset, frames: int) -> np.ndarray | None:
    """(frames, 3) ImagePositionPatient per frame from functional groups, or None."""
    positions = []
    for i in range(frames):
        item = _fg_item(ds, "PerFrameFunctionalGroupsSequence", "PlanePositionSequence", i)
        pos = get_floats(item, "ImagePositionPatient", 3) if item is not None else None
        if pos is None:
            return None
        positions.append(pos)
    return np.asarray(positions, dtype=np.float64)


def _multiframe_geometry(ds: pydicom.Dataset, frames: int, dy: float, dx: float):
    """(dz, affine, orientation) for a multi-frame file; dz falls back to 1.0, affine to None."""
    cos = orientation_cosines(ds)
    positions = frame_positions(ds, frames)
    dz = None
    if cos is not None and positions is not None:
        keys = positions @ np.cross(cos[0], cos[1])
        diffs = np.abs(np.diff(keys))
        if diffs.size and np.median(diffs) > 1e-6:
            dz = float(np.median(diffs))
    if dz is None and (offsets := ds.get("GridFrameOffsetVector")) and len(offsets) == frames:
        diffs = np.abs(np.diff(np.asarray(offsets, dtype=np.float64)))  # RT Dose grids
        dz = float(np.median(diffs)) if np.median(diffs) > 1e-6 else None
    if dz is None:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            src = _lookup(ds, "PixelMeasuresSequence", keyword)
            if src is not None and (value := get_float(src, keyword)) and value > 0:
                dz = value
                break
    dz = dz or 1.0
    if cos is None or positions is None:
        return dz, None, None
    step = (positions[-1] - positions[0]) / (frames - 1)
    affine = build_affine(cos, positions[0], dy, dx, step)
    return dz, affine, lps_axcodes(affine)


@infrastructure_guard
def read_dicom_file(
    path: str,
    fs: fsspec.AbstractFileSystem,
    frames: Sequence[int] | None = None,
    max_image_bytes: int | None = None,
) -> DecodedImage:
    """Decode one DICOM file: 2D -> (C, Y, X); several frames -> (C, Z, Y, X).

    ``max_image_bytes``: raise ``too_large`` before decoding when the frames to decode need more
    (:func:`decoded_nbytes`). Float output (rescaled, Float/DoubleFloatPixelData) is made finite
    (:func:`medpipe.readers.base.finite_pixels`).

    ``frames`` selects frames of a multi-frame file (one acquisition of
    :func:`medpipe.readers.acquisitions.frame_acquisitions`; one frame gives a 2D image). Enhanced multi-frame
    frames with per-frame geometry are sorted along the normal; a whole file whose frames form several
    acquisitions raises ``decode_error`` (read each acquisition with ``frames=``).
    """
    ds = load_dataset(path, fs)
    modality = str(ds.get("Modality") or "OT").upper()
    total = frame_count(ds)
    if frames is not None:
        frames = [int(f) for f in frames]
        if not frames or len(set(frames)) != len(frames) or min(frames) < 0 or max(frames) >= total:
            raise UnreadableFile(QuarantineReason.decode_error, f"frame selection invalid for {total} frame(s)")
    elif total > 1 and "PerFrameFunctionalGroupsSequence" in ds:
        groups = frame_acquisitions(ds)
        if len(groups) > 1:
            raise UnreadableFile(QuarantineReason.decode_error,
                                 f"frames form {len(groups)} acquisitions (read each with frames=)")
        frames = list(groups[0].members)
    numbers = frames if frames is not None else list(range(total))
    check_dataset_size(ds, decoded_frame_count(total, frames), max_image_bytes)
    stored = decode_pixels(ds, frames)  # (frames, Y, X, C)
    values = to_modality_values(stored, ds, modality, numbers)
    del stored
    dy, dx = pixel_spacing(ds, numbers[0])
    pixels = np.ascontiguousarray(np.moveaxis(values, -1, 0))  # (C, frames, Y, X)
    if len(numbers) == 1:
        image = DecodedImage(pixels[:, 0], (dy, dx), modality, None)
    elif "PerFrameFunctionalGroupsSequence" in ds and (geometry := _frames_geometry(ds, numbers, dy, dx)):
        order, dz, affine, notes = geometry
        pixels = np.ascontiguousarray(pixels[:, order])
        image = DecodedImage(pixels, (dz, dy, dx), modality, None, affine, lps_axcodes(affine), notes)
    else:
        dz, affine, orientation = _multiframe_geometry(ds, total, dy, dx) if frames is None else (
            _slice_thickness(ds), None, None)
        image = DecodedImage(pixels, (dz, dy, dx), modality, None, affine, orientation)
    image.header = strip_pixels(ds)
    return finite_image(image)


def _frames_geometry(ds: pydicom.Dataset, numbers: Sequence[int], dy: float, dx: float):
    """:func:`stack_geometry` of the selected frames, or None when a frame lacks position/orientation."""
    positions = [_frame_position(ds, f) for f in numbers]
    cosines = [orientation_cosines(ds, f) for f in numbers]
    if any(p is None for p in positions) or any(c is None for c in cosines):
        return None
    return stack_geometry(cosines, positions, dy, dx, _slice_thickness(ds))  # type: ignore[arg-type]


def _frame_position(ds: pydicom.Dataset, frame: int) -> tuple[float, ...] | None:
    item = _fg_item(ds, "PerFrameFunctionalGroupsSequence", "PlanePositionSequence", frame)
    if item is None:
        item = _fg_item(ds, "SharedFunctionalGroupsSequence", "PlanePositionSequence")
    return get_floats(item, "ImagePositionPatient", 3) if item is not None else None


def _slice_thickness(ds: pydicom.Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        src = _lookup(ds, "PixelMeasuresSequence", keyword)
        if src is not None and (value := get_float(src, keyword)) and value > 0:
            return value
    return 1.0
