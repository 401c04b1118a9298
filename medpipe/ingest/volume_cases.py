"""The "volumes" training layout at ingest: plan the segmentation (target spacing, patch, topology) from the
cases' canonical spacings and shapes, then write each case whole (canonical RAS, resampled, normalised) with its
mask on the same grid, and check that the mask kept its foreground."""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from medpipe.config import PreprocessConfig, StoreConfig
from medpipe.fingerprint import CT_FOREGROUND_HU
from medpipe.ingest.mask_check import AssembleResult, capture_failure, foreground_amounts, mask_check
from medpipe.ingest.records import ArchiveRecord
from medpipe.planning import SegmentationPlan, plan_segmentation
from medpipe.preprocess import NotTrainable, convert_channels, floor_below_ct_foreground, normalize
from medpipe.store import read_archive_image
from medpipe.volumes import VOLUMES, CaseGeometry, plan_geometry, ras_affine, to_stored, write_case

CASES_PER_TASK = 4  # cases one assembling task writes (each case is its own group: tasks never share a chunk)
NORMALIZE_SLAB = 8  # slices normalised at a time (see normalized_volume)


def case_geometry(record: ArchiveRecord, target_spacing: Sequence[float] | None) -> CaseGeometry:
    """Geometry of an archive volume in the volumes layout (its RAS affine, or its spacing when it has none)."""
    affine, known = ras_affine(record.affine, "RAS", record.spacing)
    return plan_geometry(record.shape[1:], affine, target_spacing, geometry_known=known)


def plan_volumes(records: list[ArchiveRecord], config: PreprocessConfig
                 ) -> tuple[SegmentationPlan | None, list[ArchiveRecord], list[dict[str, Any]]]:
    """(plan, cases kept, cases excluded) for a volumes-layout store. The plan sees each case's canonical spacing
    and shape; `config.target_spacing` and `config.plan` override its fields. A case larger than
    `config.max_volume_voxels` at the planned spacing is excluded with its size."""
    if not records:
        return None, [], []
    geometries = [case_geometry(r, None) for r in records]
    overrides = dict(config.plan)
    if config.target_spacing is not None:
        overrides["target_spacing"] = list(config.target_spacing)
    plan = plan_segmentation(spacings=[g.canonical_spacing for g in geometries],
                             shapes=[g.canonical_shape for g in geometries], overrides=overrides,
                             in_channels=config.channels)
    kept, excluded = [], []
    for record in records:
        shape = case_geometry(record, plan.target_spacing).shape
        voxels = int(np.prod(shape))
        if voxels > config.max_volume_voxels:
            excluded.append({"unit": record.id, "reason": f"too large after resampling to the planned spacing: "
                             f"{list(shape)} = {voxels} voxels > max_volume_voxels {config.max_volume_voxels}"})
        else:
            kept.append(record)
    return plan, kept, excluded


def create_volume_layout(root: zarr.Group, n: int) -> int:
    """Empty training/ (labels, volumes/) for `n` cases; returns the cases per assembling task."""
    training = root.create_group("training", overwrite=True)
    training.create_array("labels", shape=(n,), dtype="int64", chunks=(max(n, 1),), fill_value=-1,
                          dimension_names=("n",))
    training.create_group("volumes")
    return CASES_PER_TASK


def assemble_volumes(root: zarr.Group, unit_ids: Sequence[str], start: int, normalization: Mapping[str, Any],
                     config: PreprocessConfig, target_spacing: Sequence[float] | None,
                     store_config: StoreConfig | None) -> AssembleResult:
    """Write cases start, start+1, ... (one per unit id); a case that cannot be made is a failure, not an abort."""
    result = AssembleResult()
    for offset, unit_id in enumerate(unit_ids):
        capture_failure(result, start + offset, unit_id, functools.partial(
            _write_volume, root, start + offset, unit_id, normalization, config, target_spacing,
            store_config or StoreConfig(), result))
    return result


def _write_volume(root: zarr.Group, index: int, unit_id: str, normalization: Mapping[str, Any],
                  config: PreprocessConfig, target_spacing: Sequence[float] | None, store_config: StoreConfig,
                  result: AssembleResult) -> None:
    pixels, mask, attrs = read_archive_image(root, unit_id)
    write_volume_from(root, index, pixels, mask, ArchiveRecord.from_attrs(attrs), normalization, config,
                      target_spacing, store_config, result)


def write_volume_from(root: zarr.Group, index: int, pixels: np.ndarray, mask: np.ndarray | None,
                      record: ArchiveRecord, normalization: Mapping[str, Any], config: PreprocessConfig,
                      target_spacing: Sequence[float] | None, store_config: StoreConfig, result: AssembleResult,
                      deferred: Sequence[str] = ()) -> None:
    """Write case `index` from a decoded image (C, Z, Y, X) and mask: canonical RAS, resampled to
    `target_spacing`, normalised (modalities in `deferred` keep their raw intensities: normalised as read, see
    medpipe.volumes.open_case; CT below the CT foreground floored, `floor_below_ct_foreground`); its digests and mask check go to `result`. Raises NotTrainable when the case is too large after resampling."""
    geometry = case_geometry(record, target_spacing)
    voxels = int(np.prod(geometry.shape))
    if voxels > config.max_volume_voxels:
        raise NotTrainable(f"too large after resampling to the planned spacing: {list(geometry.shape)} = {voxels} "
                           f"voxels > max_volume_voxels {config.max_volume_voxels}")
    if record.modality in deferred:  # raw: stays int16 HU (rounded after resampling)
        image = convert_channels(pixels, config.channels)
    else:
        image = normalized_volume(pixels, config.channels, record.modality, normalization.get(record.modality))
    stored = to_stored(image, geometry, "linear")
    del image
    if record.modality in deferred and pixels.dtype.kind in "iu" and stored.dtype.kind == "f":
        # raw HU resampled: back to the source's integer type, rounded to the nearest unit (an error of at most
        # 0.5 HU, the source's own quantisation step): half the bytes of float32 and far better compression
        info = np.iinfo(pixels.dtype)
        stored = np.clip(np.rint(stored), info.min, info.max).astype(pixels.dtype)
    floored = record.modality == "CT" and record.modality in deferred
    if floored:  # normalised reads unchanged; the air compresses
        # in place only on a copy: a case stored as decoded (no reorientation, no resampling) is the decoded array,
        # which the archive writer may not have encoded yet
        stored = floor_below_ct_foreground(stored, in_place=not np.may_share_memory(stored, pixels))
    stored_mask = None if mask is None else to_stored(mask[:1], geometry, "labels")
    raw = record.modality if record.modality in deferred else None
    result.digests.update(write_case(root, index, stored, stored_mask, geometry, record.id, store_config, raw,
                                     CT_FOREGROUND_HU if floored else None))
    if mask is not None and stored_mask is not None:
        result.mask_checks.append(mask_check(record.id, foreground_amounts(mask, record.spacing),
                                             foreground_amounts(stored_mask, geometry.spacing), "ml"))


def normalized_volume(pixels: np.ndarray, channels: int, modality: str, norm: Mapping[str, Any] | None
                      ) -> np.ndarray:
    """`normalize(convert_channels(pixels))` of a (C, Z, Y, X) case, the same values. When the normalisation maps
    each voxel on its own (CT with the dataset's statistics) it runs slab by slab into one float32 array, so the
    whole-case temporaries of clipping and z-scoring (three float32 copies) never coexist; per-image statistics
    (MR, CT without a fingerprint) need the whole image and take the plain path."""
    if modality != "CT" or not norm:
        return normalize(convert_channels(pixels, channels), modality, dict(norm) if norm else None)
    out = np.empty((channels, *pixels.shape[1:]), dtype=np.float32)
    for z in range(0, pixels.shape[1], NORMALIZE_SLAB):
        out[:, z : z + NORMALIZE_SLAB] = normalize(convert_channels(pixels[:, z : z + NORMALIZE_SLAB], channels),
                                                   modality, dict(norm))
    return out


def volume_count(root: zarr.Group) -> int:
    """Cases written under training/volumes/."""
    return len(list(root[VOLUMES].group_keys())) if VOLUMES in root else 0  # type: ignore[union-attr]


__all__ = ["CASES_PER_TASK", "assemble_volumes", "case_geometry", "create_volume_layout", "normalized_volume",
           "plan_volumes", "volume_count", "write_volume_from"]
