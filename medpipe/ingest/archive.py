"""Archive: decode, de-identify and write each unit of a shard as an OME-Zarr image at native resolution.

Each unit has its own group, so shards never share a chunk. A unit whose group already carries attributes written
for the same inputs is skipped: that is what makes a rerun (or a rerun after a kill) cheap and exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Sequence

import fsspec
import nibabel as nib
import numpy as np
import zarr

from medpipe.config import StoreConfig
from medpipe.deid import DEID_RULES_VERSION, DeidAudit, DeidKey, Pseudonymizer, defined_term, deidentify_header
from medpipe.fingerprint import intensity_sample
from medpipe.ingest.discover import source_fs
from medpipe.errors import InfrastructureError
from medpipe.ingest.records import ArchiveFailure, ArchiveRecord, Unit, UnitKind
from medpipe.readers import UnreadableFile, read_nifti, read_unit
from medpipe.readers.base import is_infrastructure_error
from medpipe.store import array_checksum, attrs_of, read_archive_image
from medpipe.volumes import canonical_ornt, ras_affine, reorient

# Bump when medpipe.readers changes what a file decodes to (series assembly, geometry, rescale): every unit
# is archived again on the next run, as a change of the de-identification rules (DEID_RULES_VERSION) does.
READER_RULES_VERSION = 3  # 3: RAS affine kept; masks reoriented onto the image grid


def unit_input_tag(unit: Unit, sizes: Sequence[int], stamps: Sequence[str], run_tag: str) -> str:
    """Digest of everything a unit's archive depends on, so that a rerun re-archives exactly what changed.

    The unit's files (keyed path hashes with sizes and stamps, an ETag on object stores), its mask, its manifest
    row (label, mask), its pseudonymous patient/study/series, how it was split (acquisition, frames) and the run
    tag (store settings, key, the de-identification and reader rule versions). Listing indices are left out: a new
    file elsewhere in SOURCE changes no other unit's tag."""
    files = [(h, sizes[i], stamps[i]) for h, i in zip(unit.hashes, unit.indices)]
    mask = (unit.mask_hash, sizes[unit.mask_index], stamps[unit.mask_index]) if unit.mask_index is not None else None
    payload = json.dumps([unit.id, str(unit.kind), files, mask, unit.label, unit.patient, str(unit.patient_source),
                          unit.study, unit.series, unit.modality, unit.acquisition, unit.frames, unit.notes, run_tag])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def run_tag(store: StoreConfig, key_fingerprint: str) -> str:
    """The run-wide part of every unit's input tag: store settings, key, rule versions (not runtime settings)."""
    return hashlib.sha256(json.dumps([store.to_dict(), key_fingerprint, DEID_RULES_VERSION,
                                      READER_RULES_VERSION]).encode()).hexdigest()


def _spatial(pixels: np.ndarray, spacing: tuple[float, ...]
             ) -> tuple[tuple[int, int, int, int], tuple[float, float, float]]:
    """Shape as (C, Z, Y, X) and spacing as (dz, dy, dx) (Z = 1, dz = 1.0 for 2D)."""
    if pixels.ndim == 3:
        c, y, x = map(int, pixels.shape)
        dy, dx = map(float, spacing)
        return (c, 1, y, x), (1.0, dy, dx)
    c, z, y, x = map(int, pixels.shape)
    dz, dy, dx = map(float, spacing)
    return (c, z, y, x), (dz, dy, dx)


@dataclass
class DecodedUnit:
    """A unit decoded once, de-identified and ready to archive: its record, pixels (C, [Z,] Y, X), mask (or None) and
    spacing as decoded (2 or 3 values). The training sample is made from these same arrays (medpipe.ingest.shard)."""

    record: ArchiveRecord
    pixels: np.ndarray
    mask: np.ndarray | None
    spacing: tuple[float, ...]


def decode_unit(unit: Unit, source_url: str, key: DeidKey, input_tag: str,
                max_image_bytes: int | None = None) -> DecodedUnit | ArchiveFailure:
    """Decode + de-identify one unit (each file read once); the reason it could not be decoded otherwise."""
    fs, base = source_fs(source_url)
    pseudonyms = Pseudonymizer(key)
    try:
        image = read_unit(str(unit.kind), [f"{base}/{p}" for p in unit.files], fs, frames=unit.frames,
                          max_image_bytes=max_image_bytes)
    except UnreadableFile as exc:
        return ArchiveFailure(unit.id, str(exc.reason), exc.detail)
    except Exception as exc:  # noqa: BLE001 - a decoder crash quarantines the unit, never the run
        if is_infrastructure_error(exc):  # storage trouble is retried, never a bad file
            raise InfrastructureError(f"{type(exc).__name__} while reading a source file") from None
        return ArchiveFailure(unit.id, "decode_error", f"{type(exc).__name__} while decoding")
    pixels = image.pixels = compact_integers(image.pixels)  # drop the float copy as soon as int16 holds it
    audit = DeidAudit()
    header = deidentify_header(image.header, pseudonyms, audit) if image.header is not None else {}
    dicom = unit.kind in (UnitKind.dicom_series, UnitKind.dicom_file)
    shape, spacing = _spatial(pixels, image.spacing)
    affine, known = ras_affine(image.affine, "LPS" if dicom else "RAS", spacing)
    mask, mask_reason = _load_mask(unit, base, fs, pixels.shape, affine if known else None)
    modality = (defined_term("Modality", image.modality) or "OT") if dicom else unit.modality
    record = ArchiveRecord(
        id=unit.id, kind=unit.kind, input_tag=input_tag, patient=unit.patient, patient_source=unit.patient_source,
        study=unit.study, series=unit.series, acquisition=unit.acquisition, modality=modality, label=unit.label,
        shape=shape, spacing=spacing, dtype=str(pixels.dtype), has_mask=mask is not None, mask_reason=mask_reason,
        indices=unit.indices, mask_index=unit.mask_index, orientation=image.orientation,
        notes=tuple(dict.fromkeys(unit.notes + tuple(getattr(image, "notes", ())))),
        dicom=header, audit=tuple(audit.to_compact()),
        checksum=array_checksum(pixels, *([mask] if mask is not None else [])),
        affine=tuple(tuple(float(v) for v in row) for row in affine) if known else None,
        # the intensity sample feeds the fingerprint; recomputed on reruns rather than stored with every image
        intensity_sample=tuple(intensity_sample(pixels, modality, _seed(unit.id))),
    )
    return DecodedUnit(record, pixels, mask, tuple(float(v) for v in image.spacing))


def previous_unit(root: zarr.Group, unit_id: str, input_tag: str) -> DecodedUnit | None:
    """A unit archived earlier from exactly these inputs (a rerun skips decoding it), read back from the archive
    (the only case where medpipe reads its own archive during ingest), else None."""
    record = _previous_record(root, unit_id, input_tag)
    if record is None:
        return None
    pixels, mask, _ = read_archive_image(root, unit_id)
    spacing = record.spacing if pixels.ndim == 4 else record.spacing[1:]
    sample = tuple(intensity_sample(pixels, record.modality, _seed(unit_id)))
    return DecodedUnit(replace(record, intensity_sample=sample), pixels, mask, tuple(spacing))


def _previous_record(root: zarr.Group, unit_id: str, input_tag: str) -> ArchiveRecord | None:
    """The record of an archive image already written for exactly these inputs, else None."""
    existing = root.get(f"archive/{unit_id}") if "archive" in root else None
    if not isinstance(existing, zarr.Group):
        return None
    attrs = attrs_of(existing)
    if attrs.get("input_tag") != input_tag:
        return None
    try:
        return ArchiveRecord.from_attrs(attrs)
    except (KeyError, TypeError, ValueError):  # written by an older medpipe: archive again
        return None


def _seed(unit_id: str) -> int:
    return int(unit_id[:8], 16)


COMPACT_BLOCK = 1 << 22  # elements checked at a time: the whole-number test never copies a whole volume


def compact_integers(pixels: np.ndarray) -> np.ndarray:
    """Float pixels that are whole numbers within int16 (CT in HU after slope 1 / integer intercept) as int16:
    lossless, and half the archive bytes of float32. The test runs block by block (no float-sized temporaries)."""
    if pixels.dtype.kind != "f" or pixels.size == 0:
        return pixels
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo < -32768 or hi > 32767 or not _whole_numbers(pixels):
        return pixels
    return pixels.astype(np.int16)


def _whole_numbers(pixels: np.ndarray) -> bool:
    flat = pixels.reshape(-1)
    return all(np.array_equal(block, np.round(block))
               for block in (flat[i : i + COMPACT_BLOCK] for i in range(0, flat.size, COMPACT_BLOCK)))


def grids_match(image_affine: np.ndarray, mask_affine: np.ndarray, shape_zyx: tuple[int, ...]) -> bool:
    """True when two index->world affines (same world convention) put the 8 corner voxels of a (Z, Y, X) grid within
    half the smallest voxel size of each other: same spacing, origin and direction, up to rounding."""
    z, y, x = shape_zyx
    corners = np.array([[i, j, k, 1.0] for i in (0, x - 1) for j in (0, y - 1) for k in (0, z - 1)]).T
    tolerance = 0.5 * float(np.linalg.norm(image_affine[:3, :3], axis=0).min())
    return float(np.abs(image_affine @ corners - mask_affine @ corners).max()) <= tolerance


def _load_mask(unit: Unit, base: str, fs: fsspec.AbstractFileSystem, image_shape: tuple[int, ...],
               image_affine: np.ndarray | None = None) -> tuple[np.ndarray | None, str | None]:
    """The unit's NIfTI mask as uint8 in the image grid; (None, reason) when unusable: unreadable, another shape,
    or — when both carry geometry — another grid (spacing, origin or direction), never a silent misalignment.

    `image_affine` is the image's RAS affine. A mask stored in another axis order or direction of the same voxels
    (a NIfTI export of a DICOM series usually flips rows) is reoriented onto the image's grid: exact, as only
    axes are permuted and flipped, and accepted only when the grids then coincide."""
    if not unit.mask:
        return None, None
    try:
        decoded = read_nifti(f"{base}/{unit.mask}", fs)
    except UnreadableFile as exc:
        return None, str(exc.reason)
    except Exception:  # noqa: BLE001
        return None, "unreadable_nifti"
    mask = decoded.pixels
    if mask.ndim == len(image_shape) + 1 and mask.shape[1] == 1:  # a 2D mask stored as a 1-slice volume
        mask = mask[:, 0]
    if image_affine is not None and decoded.affine is not None and mask.ndim == 4:
        mask_affine = np.asarray(decoded.affine, dtype=np.float64)
        if tuple(mask.shape[1:]) != tuple(image_shape[1:]) or not grids_match(image_affine, mask_affine,
                                                                              tuple(mask.shape[1:])):
            mask, mask_affine = _onto_image_axes(mask, mask_affine, image_affine)
            if tuple(mask.shape[1:]) != tuple(image_shape[1:]):
                return None, "mask_shape_mismatch"
            if not grids_match(image_affine, mask_affine, tuple(mask.shape[1:])):
                return None, "mask_grid_mismatch"
    elif tuple(mask.shape[1:]) != tuple(image_shape[1:]):
        return None, "mask_shape_mismatch"
    labels = mask[:1]  # integer labels as they are; rounding them would go through float16 (slow, and inexact >2048)
    return (labels if labels.dtype.kind in "iub" else np.rint(labels)).astype(np.uint8), None


def _onto_image_axes(mask: np.ndarray, mask_affine: np.ndarray, image_affine: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A (C, Z, Y, X) mask and its RAS affine re-indexed to the image's axis order and directions (via the
    canonical orientation of both); the affine follows the array, so grids_match then decides."""
    ornt = nib.orientations.ornt_transform(canonical_ornt(mask_affine), canonical_ornt(image_affine))
    shape_xyz = tuple(int(s) for s in mask.shape[1:][::-1])
    new_affine = mask_affine @ nib.orientations.inv_ornt_aff(ornt, shape_xyz)
    return reorient(mask, ornt), new_affine
