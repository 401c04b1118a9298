"""Readers: turn DICOM files/series, NIfTI volumes and raster images into :class:`DecodedImage`.

All readers take ``(path(s), fs)`` and open files through ``fs.open(path, "rb")``, so local and
object-store (``s3://``) inputs behave the same. Failures raise :class:`UnreadableFile`.
"""

from __future__ import annotations

from collections.abc import Sequence

import fsspec

from .acquisitions import Acquisition, SliceInfo, frame_acquisitions, split_series
from .base import (
    DecodedImage,
    QuarantineReason,
    UnreadableFile,
    finite_pixels,
    infrastructure_guard,
    is_infrastructure_error,
)
from .dicom import read_dicom_file
from .nifti import read_nifti
from .probe import FileProbe, kind_from_path, probe_file
from .raster import read_raster
from .series import group_series, read_dicom_series

UNIT_KINDS = ("dicom-series", "dicom-file", "nifti", "raster")

__all__ = [
    "UNIT_KINDS",
    "Acquisition",
    "SliceInfo",
    "DecodedImage",
    "FileProbe",
    "QuarantineReason",
    "UnreadableFile",
    "group_series",
    "finite_pixels",
    "frame_acquisitions",
    "is_infrastructure_error",
    "kind_from_path",
    "probe_file",
    "read_dicom_file",
    "read_dicom_series",
    "read_nifti",
    "read_raster",
    "read_unit",
    "split_series",
]


@infrastructure_guard
def read_unit(
    kind: str,
    paths: list[str],
    fs: fsspec.AbstractFileSystem,
    frames: Sequence[int] | None = None,
    max_image_bytes: int | None = None,
) -> DecodedImage:
    """Decode one unit of work: ``kind`` in UNIT_KINDS; single-file kinds take exactly one path.

    ``frames`` (only for "dicom-file") selects frames of a multi-frame file, e.g. one frame group.
    ``max_image_bytes`` caps the decoded size, checked from header facts before decoding (``too_large``).
    Pixels come back finite (see :class:`DecodedImage`); storage/network failures raise
    :class:`medpipe.errors.InfrastructureError`, never :class:`UnreadableFile`.
    """
    if frames is not None and kind != "dicom-file":
        raise ValueError(f"frames= is only for 'dicom-file' units, not {kind!r}")
    if kind == "dicom-series":
        return read_dicom_series(paths, fs, max_image_bytes)
    if kind not in UNIT_KINDS:
        raise ValueError(f"unknown unit kind {kind!r}; expected one of {UNIT_KINDS}")
    if len(paths) != 1:
        raise ValueError(f"unit kind {kind!r} takes one path, got {len(paths)}")
    if kind == "dicom-file":
        return read_dicom_file(paths[0], fs, frames, max_image_bytes)
    if kind == "nifti":
        return read_nifti(paths[0], fs, max_image_bytes=max_image_bytes)
    return read_raster(paths[0], fs, max_image_bytes)
