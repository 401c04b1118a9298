"""Read NIfTI-1/2 volumes (.nii, .nii.gz) through fsspec into a channel-first :class:`DecodedImage`.

The file is read in one request and handed to nibabel as bytes (``from_bytes``), which works the
same for local and object-store paths; gzip is detected by its magic number, not the extension.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from typing import BinaryIO

import fsspec
import nibabel as nib
import numpy as np

from .base import DecodedImage, QuarantineReason, UnreadableFile

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


def nifti_header_shape(f: BinaryIO, size: int) -> tuple[int, int, int, int]:
    """Parse only the header of an open NIfTI file: (rows=Y, columns=X, frames=Z, channels).

    gzip is detected by its magic number. For uncompressed files the data size is checked
    against the file size, so truncated files are caught without reading them.
    """
    magic = f.read(2)
    f.seek(0)
    gz = magic == _GZIP_MAGIC
    try:
        raw = gzip.GzipFile(fileobj=f, mode="rb").read(540) if gz else f.read(540)
        header = _image_class(raw).header_class.from_fileobj(io.BytesIO(raw), check=True)
        shape = tuple(int(s) for s in header.get_data_shape())
        offset = int(header.get_data_offset())
        dtype = header.get_data_dtype()
        itemsize = dtype.itemsize
    except UnreadableFile:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel/gzip raise many types on garbage
        raise _fail(f"bad NIfTI header ({type(exc).__name__})") from None
    if not shape or min(shape) < 1:
        raise _fail("empty NIfTI shape")
    nbytes = int(np.prod(shape)) * itemsize
    if not gz and offset + nbytes > size:
        raise _fail(f"truncated: data needs {nbytes} bytes past offset {offset}, file has {size}")
    channels = int(np.prod(shape[3:])) * (min(len(dtype.names), 3) if dtype.names else 1)
    shape = shape + (1,) * (3 - len(shape))
    return shape[1], shape[0], shape[2], channels


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


def read_nifti(path: str, fs: fsspec.AbstractFileSystem, modality: str = "MR") -> DecodedImage:
    """Decode a .nii / .nii.gz file to (C, Z, Y, X) with spacing (dz, dy, dx), affine and axis codes."""
    with fs.open(path, "rb") as f:
        raw = f.read()
    try:
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise _fail(f"bad gzip stream ({type(exc).__name__})") from None
    cls = _image_class(raw)
    try:
        img = cls.from_bytes(raw)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
    except Exception as exc:  # noqa: BLE001 - corrupt headers/data raise many types
        raise _fail(f"cannot decode NIfTI ({type(exc).__name__})") from None
    pixels = _to_czyx(data)
    zooms = [z if np.isfinite(z) and z > 0 else 1.0 for z in zooms] + [1.0] * (3 - len(zooms))
    orientation = "".join(nib.aff2axcodes(affine)) if np.all(np.isfinite(affine)) else None
    return DecodedImage(
        pixels=pixels,
        spacing=(zooms[2], zooms[1], zooms[0]),
        modality=modality,
        header=None,
        affine=affine,
        orientation=orientation,
    )
