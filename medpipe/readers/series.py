"""Read one DICOM series (all instances of a SeriesInstanceUID) into a (C, Z, Y, X) volume.

Slices are sorted ascending along the slice normal (cross product of the row/column cosines),
falling back to InstanceNumber when geometry is missing. The files must form one acquisition (see
:mod:`medpipe.readers.acquisitions`): irregular spacing raises rather than being averaged. Each file is fetched once; the modality
rescale is applied per slice because slope/intercept may differ between slices.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pydicom

from .base import DecodedImage, QuarantineReason, UnreadableFile, check_image_bytes, finite_image, infrastructure_guard
from .dicom import (
    decode_pixels,
    decoded_nbytes,
    get_float,
    get_floats,
    load_dataset,
    lps_axcodes,
    orientation_cosines,
    pixel_spacing,
    stack_geometry,
    strip_pixels,
    to_modality_values,
)
from .probe import FileProbe
from medpipe.ingest.discover import is_local_fs


def group_series(probes: Iterable[FileProbe]) -> dict[str, list[FileProbe]]:
    """Group DICOM probes by SeriesInstanceUID (lists sorted by path).

    Non-DICOM probes and probes without a SeriesInstanceUID are left out: they are single files.
    """
    groups: dict[str, list[FileProbe]] = defaultdict(list)
    for probe in probes:
        if probe.kind == "dicom" and probe.series_instance_uid:
            groups[probe.series_instance_uid].append(probe)
    return {uid: sorted(items, key=lambda p: p.path) for uid, items in groups.items()}




def _load_all(paths: Sequence[str], fs: fsspec.AbstractFileSystem) -> list[pydicom.Dataset]:
    """Fetch and parse every file once; remote stores are fetched concurrently (latency bound)."""

    def load(indexed: tuple[int, str]) -> pydicom.Dataset:
        index, path = indexed
        try:
            return load_dataset(path, fs)
        except UnreadableFile as exc:  # say which slice, never which path (paths may hold PHI)
            raise UnreadableFile(exc.reason, f"slice {index} of {len(paths)}: {exc.detail}") from None

    if len(paths) > 1 and not is_local_fs(fs):
        with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
            return list(pool.map(load, enumerate(paths)))
    return [load(item) for item in enumerate(paths)]


def _int_attr(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _check_sizes(datasets: list[pydicom.Dataset]) -> None:
    sizes = {
        (_int_attr(ds, "Rows"), _int_attr(ds, "Columns"), _int_attr(ds, "SamplesPerPixel") or 1) for ds in datasets
    }
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}x{s}" for r, c, s in sorted(sizes, key=str))
        raise UnreadableFile(QuarantineReason.mixed_series_sizes, f"slice sizes differ: {shown}")
    if any((_int_attr(ds, "NumberOfFrames") or 1) > 1 for ds in datasets):
        raise UnreadableFile(QuarantineReason.decode_error, "multi-frame instance inside a series")


def _geometry(datasets: list[pydicom.Dataset], dy: float, dx: float):
    """Return (order, dz, affine, orientation, notes); affine/orientation None without geometry.

    See :func:`medpipe.readers.dicom.stack_geometry`; without full geometry the order is by InstanceNumber.
    """
    n = len(datasets)
    cos = orientation_cosines(datasets[0])
    positions = [get_floats(ds, "ImagePositionPatient", 3) for ds in datasets]
    cosines = [orientation_cosines(ds) for ds in datasets]
    if cos is not None and all(p is not None for p in positions) and all(c is not None for c in cosines):
        order, dz, affine, notes = stack_geometry(
            cosines, positions, dy, dx, _thickness(datasets[0]) or 1.0  # type: ignore[arg-type]  # None-free here
        )
        return order, dz, affine, lps_axcodes(affine), notes
    numbers = [_int_attr(ds, "InstanceNumber") for ds in datasets]
    order = sorted(range(n), key=lambda i: (numbers[i] is None, numbers[i] or 0, i))
    return order, _thickness(datasets[0]) or 1.0, None, None, ("no slice geometry: ordered by InstanceNumber",)


def _thickness(ds: pydicom.Dataset) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = get_float(ds, keyword)
        if value is not None and value > 0:
            return value
    return None


def _check_series_size(datasets: list[pydicom.Dataset], max_image_bytes: int | None) -> None:
    """``too_large`` when the slices together (sum of :func:`decoded_nbytes`) exceed ``max_image_bytes``."""
    if max_image_bytes is None:
        return
    sizes = [size for ds in datasets if (size := decoded_nbytes(ds, 1)) is not None]
    if sizes:
        check_image_bytes(sizes[0][0], sizes[0][1], len(datasets), sum(s[2] for s in sizes), max_image_bytes)


@infrastructure_guard
def read_dicom_series(
    paths: Sequence[str], fs: fsspec.AbstractFileSystem, max_image_bytes: int | None = None
) -> DecodedImage:
    """Decode the slices of one acquisition (any order) to (C, Z, Y, X); CT in HU (int16 when exact, else float32),
    others in their native dtype.

    ``max_image_bytes`` caps the decoded volume (sum over slices) before any slice is decoded (``too_large``);
    non-finite float values follow :func:`medpipe.readers.base.finite_pixels`.

    Raises ``mixed_series_sizes`` when Rows/Columns differ, and ``decode_error`` when slices have different
    orientations, share a position, or are not regularly spaced: the reader never averages spacing, the caller
    splits the series first (:func:`medpipe.readers.acquisitions.split_series`). Notes: gantry tilt, spacing jitter.
    """
    if not paths:
        raise UnreadableFile(QuarantineReason.decode_error, "empty series")
    datasets = _load_all(paths, fs)
    _check_sizes(datasets)
    _check_series_size(datasets, max_image_bytes)
    dy, dx = pixel_spacing(datasets[0])
    order, dz, affine, orientation, notes = _geometry(datasets, dy, dx)
    modality = str(datasets[order[0]].get("Modality") or "OT").upper()

    volume: np.ndarray | None = None
    for z, index in enumerate(order):
        ds = datasets[index]
        try:
            values = to_modality_values(decode_pixels(ds), ds, modality)[0]  # (Y, X, C)
        except UnreadableFile as exc:
            raise UnreadableFile(exc.reason, f"slice {index} of {len(paths)}: {exc.detail}") from None
        if volume is None:  # the first slice's dtype (CT: int16 HU when exact, else float32); a later slice that
            dtype = values.dtype  # needs more (a rescale) widens the volume below
            volume = np.empty((values.shape[-1], len(order), *values.shape[:2]), dtype=dtype)
        elif not np.can_cast(values.dtype, volume.dtype, "safe"):  # e.g. one slice with a rescale
            volume = volume.astype(np.float32 if values.dtype.kind == "f" else np.result_type(volume, values))
        volume[:, z] = np.moveaxis(values, -1, 0)
        if z:  # keep the first header, free the others' pixel bytes as we go
            strip_pixels(ds)
    assert volume is not None
    header = strip_pixels(datasets[order[0]])
    return finite_image(DecodedImage(volume, (dz, dy, dx), modality, header, affine, orientation, notes))
