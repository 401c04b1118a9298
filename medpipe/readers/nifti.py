"""Read NIfTI-1/2 volumes (.nii, .nii.gz) through fsspec into a channel-first :class:`DecodedImage`.

The file is read in one request and handed to nibabel as bytes (``from_bytes``), which works the
same for local and object-store paths; gzip is detected by its magic number, not the extension.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import nibabel as nib
import numpy as np

from .base import (
    DecodedImage,
    QuarantineReason,
    UnreadableFile,
    check_image_bytes,
    finite_image,
    infrastructure_guard,
    raise_if_infrastructure,
)

_GZIP_MAGIC = b"\x1f\x8b"


def _fail(detail: str) -> UnreadableFile:
    return UnreadableFile(QuarantineReason.unreadable_nifti, detail)


def _image_class(raw: bytes) -> type[nib.Nifti1Image] | type[nib.Nifti2Image]:
    """Pick NIfTI-1 or NIfTI-2 from ``sizeof_hdr`` (348 / 540, either byte order)."""
    if len(raw) >= 4:
        for cls in (nib.Nifti1Image, nib.Nifti2Image):
            n = cls.header_class.sizeof_hdr
            if n in (struct.unpack("<i", raw[:4])[0], struct.unpack(">i", raw[:4])[0]) and len(raw) >= n:
                return cls
    raise _fail(f"no NIfTI header ({len(raw)} bytes read)")


@dataclass(frozen=True)
class NiftiHeaderFacts:
    """What the header alone says: probe shape, decoded size and where the voxel data ends."""

    rows: int  # Y
    columns: int  # X
    frames: int  # Z
    channels: int
    decoded_bytes: int  # voxels x decoded itemsize (float64 when scl_slope/scl_inter scale the data)
    data_end: int  # vox_offset + stored data bytes: all nibabel reads of a single-file NIfTI
    affine: tuple[tuple[float, ...], ...] | None = None  # RAS mm of index (x, y, z), as nibabel gives the image

    def check_size(self, max_image_bytes: int | None) -> None:
        """Raise ``too_large`` when the decoded volume exceeds ``max_image_bytes``."""
        check_image_bytes(self.columns, self.rows, self.frames, self.decoded_bytes, max_image_bytes)


def nifti_header_facts(f: BinaryIO, size: int) -> NiftiHeaderFacts:
    """Parse only the header of an open NIfTI file (:class:`NiftiHeaderFacts`).

    gzip is detected by its magic number. For uncompressed files the data size is checked
    against the file size, so truncated files are caught without reading them.
    """
    magic = f.read(2)
    f.seek(0)
    gz = magic == _GZIP_MAGIC
    try:
        raw = gzip.GzipFile(fileobj=f, mode="rb").read(540) if gz else f.read(540)
        cls = _image_class(raw)
        header = cls.header_class.from_fileobj(io.BytesIO(raw), check=True)
        shape = tuple(int(s) for s in header.get_data_shape())
        offset = int(header.get_data_offset())
        header_end = cls.header_class.sizeof_hdr + 4  # header + extension flag
        dtype = header.get_data_dtype()
        itemsize = dtype.itemsize
        slope, inter = (float(v) for v in (header["scl_slope"], header["scl_inter"]))
    except UnreadableFile:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel/gzip raise many types on garbage
        raise_if_infrastructure(exc)
        raise _fail(f"bad NIfTI header ({type(exc).__name__})") from None
    if not shape or min(shape) < 1:
        raise _fail("empty NIfTI shape")
    voxels = int(np.prod(shape, dtype=object))  # Python ints: no overflow for absurd headers
    nbytes = voxels * itemsize
    if not gz and offset + nbytes > size:
        raise _fail(f"truncated: data needs {nbytes} bytes past offset {offset}, file has {size}")
    scaled = np.isfinite(slope) and slope != 0 and (slope != 1 or (np.isfinite(inter) and inter != 0))
    decoded_itemsize = max(itemsize, 8) if scaled and dtype.kind in "iuf" else itemsize  # nibabel scales to float64
    channels = int(np.prod(shape[3:], dtype=object)) * (min(len(dtype.names), 3) if dtype.names else 1)
    shape = shape + (1,) * (3 - len(shape))
    data_end = max(offset, header_end) + nbytes
    try:
        affine = tuple(tuple(float(v) for v in row) for row in header.get_best_affine())
    except Exception:  # noqa: BLE001 - a header without usable geometry still decodes (as the reader decides)
        affine = None
    return NiftiHeaderFacts(shape[1], shape[0], shape[2], channels, voxels * decoded_itemsize, data_end, affine)


def nifti_header_shape(f: BinaryIO, size: int) -> tuple[int, int, int, int]:
    """Parse only the header of an open NIfTI file: (rows=Y, columns=X, frames=Z, channels)."""
    facts = nifti_header_facts(f, size)
    return facts.rows, facts.columns, facts.frames, facts.channels


def _to_czyx(data: np.ndarray) -> np.ndarray:
    """nibabel (X, Y[, Z[, C]]) -> (C, Z, Y, X); RGB24/RGBA32 records become channels."""
    if data.dtype.names:  # NIfTI RGB24 / RGBA32: structured voxels -> trailing channel axis
        fields = [n for n in data.dtype.names if n.upper() in ("R", "G", "B")] or list(data.dtype.names)
        data = np.stack([data[n] for n in fields], axis=-1)
        data = data[:, :, :, None, :] if data.ndim == 4 else data
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 5 and data.shape[3] == 1:  # (X, Y, Z, 1, C): NIfTI vector intent layout
        data = data[:, :, :, 0, :]
    if data.ndim == 3:
        return np.ascontiguousarray(data.transpose(2, 1, 0))[None]
    if data.ndim == 4:
        return np.ascontiguousarray(data.transpose(3, 2, 1, 0))
    raise _fail(f"unsupported NIfTI dimensionality {data.ndim}")


@infrastructure_guard
def read_nifti(
    path: str, fs: fsspec.AbstractFileSystem, modality: str = "MR", max_image_bytes: int | None = None
) -> DecodedImage:
    """Decode a .nii / .nii.gz file to (C, Z, Y, X) with spacing (dz, dy, dx), affine and axis codes.

    ``max_image_bytes``: the header's shape and dtype are checked first (``too_large``), and a gzip stream is
    then inflated only up to the end of the voxel data the header declares (no gzip bomb). Non-finite voxels
    follow :func:`medpipe.readers.base.finite_pixels`.
    """
    with fs.open(path, "rb") as f:
        raw = f.read()
    limit: int | None = None
    if max_image_bytes is not None:
        facts = nifti_header_facts(io.BytesIO(raw), len(raw))
        facts.check_size(max_image_bytes)
        limit = facts.data_end
    try:
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw) if limit is None else gzip.GzipFile(fileobj=io.BytesIO(raw)).read(limit)
    except (OSError, EOFError, zlib.error) as exc:
        raise_if_infrastructure(exc)
        raise _fail(f"bad gzip stream ({type(exc).__name__})") from None
    cls = _image_class(raw)
    try:
        img = cls.from_bytes(raw)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
    except Exception as exc:  # noqa: BLE001 - corrupt headers/data raise many types
        raise_if_infrastructure(exc)
        raise _fail(f"cannot decode NIfTI ({type(exc).__name__})") from None
    pixels = _to_czyx(data)
    zooms = [z if np.isfinite(z) and z > 0 else 1.0 for z in zooms] + [1.0] * (3 - len(zooms))
    orientation = "".join(nib.aff2axcodes(affine)) if np.all(np.isfinite(affine)) else None
    return finite_image(DecodedImage(
        pixels=pixels,
        spacing=(zooms[2], zooms[1], zooms[0]),
        modality=modality,
        header=None,
        affine=affine,
        orientation=orientation,
    ))
