"""Shared types for all readers: the decoded image and the quarantine exception."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import pydicom


class QuarantineReason(StrEnum):
    """Why an input file (or unit) was set aside instead of being ingested."""

    not_dicom = "not_dicom"
    truncated = "truncated"
    no_pixel_data = "no_pixel_data"
    mixed_series_sizes = "mixed_series_sizes"
    unreadable_nifti = "unreadable_nifti"
    duplicate_instance = "duplicate_instance"
    non_image_dicom = "non_image_dicom"
    unsupported_format = "unsupported_format"
    decode_error = "decode_error"
    unreadable_image = "unreadable_image"
    missing_mask = "missing_mask"
    mask_shape_mismatch = "mask_shape_mismatch"


class UnreadableFile(Exception):
    """Raised by readers when an input cannot be decoded; never carries partial data.

    ``detail`` holds technical facts only (sizes, tags, exception class names), never header values
    or paths, because both may contain PHI.
    """

    def __init__(self, reason: QuarantineReason, detail: str) -> None:
        self.reason = QuarantineReason(reason)
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}")

    def __reduce__(self):  # keep picklable across Dask/Prefect process boundaries
        return (type(self), (self.reason, self.detail))


@dataclass
class DecodedImage:
    """A decoded image in channel-first layout, see docs/design.md."""

    pixels: np.ndarray  # 2D: (C, Y, X); 3D: (C, Z, Y, X). CT in HU as float32, others native dtype.
    spacing: tuple[float, ...]  # mm per spatial axis in array order: (dy, dx) or (dz, dy, dx)
    modality: str
    header: pydicom.Dataset | None  # first DICOM dataset of the unit without pixel data
    affine: np.ndarray | None = None  # 4x4 index (x, y, z) -> world
    orientation: str | None = None  # axis codes of the (x, y, z) index axes, e.g. "LPS"
    notes: tuple[str, ...] = ()  # technical facts about the decoding (gantry tilt, spacing jitter, ...)
