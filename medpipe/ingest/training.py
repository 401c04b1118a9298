"""Training arrays: choose the samples that fit the configured kind, split by patient, order them with a seed,
then fill the training layout range by range (each writing task owns whole shards, or whole cases).

Two layouts (docs/store.md): "fixed" = one (N, C, *shape) array (2D; a 3D option when every case fits) and
"volumes" = each 3D case whole, in canonical RAS orientation, resampled to the segmentation plan's spacing
(medpipe.volumes), for patch-based training."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zarr

from medpipe.config import IngestConfig, PreprocessConfig, StoreConfig
from medpipe.ingest.lock import check_lock
from medpipe.ingest.records import ArchiveRecord
from medpipe.preprocess import NotTrainable, check_kind, to_training_sample
from medpipe.readers.base import is_infrastructure_error
from medpipe.splits import SPLIT_NAMES, patient_labels, split_patients, split_warnings
from medpipe.ingest.mask_check import AssembleResult, foreground_amounts, mask_check
from medpipe.ingest.volume_cases import assemble_volumes, case_geometry, create_volume_layout, plan_volumes
from medpipe.store import create_training_arrays, get_array, open_store, read_archive_image, write_sample_table


@dataclass
class TrainingLayout:
    """Which archive unit lands at which training index, and the write ranges of the assembling tasks."""

    unit_ids: list[str]
    modalities: list[str]
    sample_shape: tuple[int, ...]
    with_masks: bool
    ranges: list[tuple[int, int]]
    normalization: dict[str, Any]
    target_spacing: tuple[float, float, float] | None
    excluded: list[dict[str, Any]] = field(default_factory=list)
    layout: str = "fixed"  # "fixed" or "volumes"
    plan: dict[str, Any] | None = None  # volumes: SegmentationPlan.to_dict()
    splits: dict[str, int] = field(default_factory=dict)  # samples per split
    split_patients: dict[str, int] = field(default_factory=dict)  # patients per split
    warnings: list[str] = field(default_factory=list)
    offset: int = 0  # index of unit_ids[0] in the training arrays (non-zero for a range's slice)

    def for_range(self, start: int, stop: int) -> "TrainingLayout":
        """A copy that carries only the unit ids of [start, stop): what one assembling task needs to be sent."""
        return replace(self, unit_ids=self.unit_ids[start - self.offset : stop - self.offset],
                       modalities=self.modalities[start - self.offset : stop - self.offset],
                       excluded=[], offset=start)


def _target_spacing(config: PreprocessConfig, fingerprint: dict[str, Any],
                    modalities: set[str]) -> tuple[float, float, float] | None:
    if config.kind != "3d":
        return None
    if config.target_spacing is not None:
        return config.target_spacing
    medians = [fingerprint["modalities"][m]["spacing_median"] for m in sorted(modalities)]
    if not medians:
        return None
    dz, dy, dx = (float(v) for v in np.median(np.array(medians), axis=0))
    return dz, dy, dx


def layout_training(store_url: str, records: list[ArchiveRecord], classes: list[str], config: IngestConfig,
                    fingerprint: dict[str, Any]) -> TrainingLayout:
    """Create the empty training arrays and write the per-sample table; returns the layout for assembling."""
    pre = config.preprocess
    volumes = pre.effective_layout() == "volumes"
    eligible, excluded = [], []
    for rec in sorted(records, key=lambda r: r.id):
        shape = rec.shape if rec.is_volume else (rec.shape[0], *rec.shape[2:])
        try:
            check_kind(shape, pre)
        except NotTrainable as exc:
            excluded.append({"unit": rec.id, "reason": str(exc)})
            continue
        eligible.append(rec)
    plan = None
    if volumes:
        plan, eligible, too_large = plan_volumes(eligible, pre)
        excluded += too_large
    order = np.random.default_rng(config.order_seed).permutation(len(eligible))
    chosen = [eligible[i] for i in order]
    labels = [classes.index(r.label) if r.label in classes else -1 for r in chosen]
    patients = [r.patient for r in chosen]
    strata = patient_labels(patients, labels)
    split_of = split_patients(patients, config.split)
    n = len(chosen)
    sample_shape = (pre.channels, *(plan.patch_size if plan is not None else pre.shape))
    with_masks = any(r.has_mask for r in chosen)
    root = open_store(store_url, mode="a")
    if plan is not None:
        per_shard = create_volume_layout(root, n)
    else:
        per_shard = create_training_arrays(root, n, sample_shape, with_masks, config.store)
    get_array(root, "training/labels")[...] = np.asarray(labels, dtype=np.int64) if n else np.zeros(0, np.int64)
    splits = np.array([split_of[p] for p in patients], dtype=np.int8)
    extra = {} if plan is None else {"volume_shape": np.array(
        [case_geometry(r, plan.target_spacing).shape for r in chosen], dtype=np.int64).reshape(n, 3)}
    write_sample_table(root, {**extra,
        "patient": np.array(patients, dtype=object), "study": np.array([r.study for r in chosen], dtype=object),
        "series": np.array([r.series for r in chosen], dtype=object),
        "unit": np.array([r.id for r in chosen], dtype=object),
        "source_hash": np.array([r.id for r in chosen], dtype=object),
        "modality": np.array([r.modality for r in chosen], dtype=object),
        "split": splits, "label": np.asarray(labels, dtype=np.int64),
        "has_mask": np.array([r.has_mask for r in chosen], dtype=bool),
        "spacing": np.array([r.spacing for r in chosen], dtype=np.float64).reshape(n, 3),
        "shape": np.array([r.shape for r in chosen], dtype=np.int64).reshape(n, 4),
    })
    modalities = {r.modality for r in chosen}
    return TrainingLayout(
        unit_ids=[r.id for r in chosen], modalities=[r.modality for r in chosen],
        sample_shape=sample_shape, with_masks=with_masks,
        ranges=[(s, min(s + per_shard, n)) for s in range(0, n, per_shard)],
        normalization=dict(pre.normalization) if pre.normalization is not None else
        {m: fingerprint["modalities"].get(m, {}).get("intensity") for m in modalities},
        target_spacing=plan.target_spacing if plan is not None else _target_spacing(pre, fingerprint, modalities),
        excluded=excluded, layout="volumes" if plan is not None else "fixed",
        plan=None if plan is None else plan.to_dict(),
        splits={name: int((splits == code).sum()) for code, name in enumerate(SPLIT_NAMES)},
        split_patients={name: sum(1 for c in split_of.values() if c == code) for code, name in enumerate(SPLIT_NAMES)},
        warnings=split_warnings(split_of, strata, config.split, classes),
    )


def assemble_range(store_url: str, layout: TrainingLayout, start: int, stop: int, config: PreprocessConfig,
                   run_id: str, store_config: StoreConfig | None = None) -> AssembleResult:
    """Preprocess units [start, stop) from the archive and write them into the training arrays (whole shards).

    Samples that cannot be made are returned as failures: the caller excludes them (split -1), so one bad image
    never stops the run and never trains as a zero-filled sample. Each sample with a mask gets a mask check."""
    check_lock(store_url, run_id)
    root = open_store(store_url, mode="a")
    if layout.layout == "volumes":
        return assemble_volumes(root, layout.unit_ids[start - layout.offset : stop - layout.offset], start,
                                layout.normalization, config, layout.target_spacing, store_config)
    images = np.zeros((stop - start, *layout.sample_shape), dtype=np.float32)
    masks = np.zeros((stop - start, 1, *layout.sample_shape[1:]), dtype=np.uint8) if layout.with_masks else None
    result = AssembleResult()
    for offset, unit_id in enumerate(layout.unit_ids[start - layout.offset : stop - layout.offset]):
        try:
            image, sample_mask, check = _training_sample(root, unit_id, layout, config)
        except Exception as exc:  # noqa: BLE001 - a per-image failure excludes the sample, never the run
            if is_infrastructure_error(exc):
                raise
            result.failures.append({"index": start + offset, "unit": unit_id,
                                    "reason": f"preprocessing failed ({type(exc).__name__})"
                                    + (f": {exc}" if isinstance(exc, NotTrainable) else "")})
            continue
        images[offset] = image
        if masks is not None and sample_mask is not None:
            masks[offset] = sample_mask
        if check is not None:
            result.mask_checks.append(check)
    get_array(root, "training/images")[start:stop] = images
    if masks is not None:
        get_array(root, "training/masks")[start:stop] = masks
    return result


def _training_sample(root: zarr.Group, unit_id: str, layout: TrainingLayout, config: PreprocessConfig
                     ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any] | None]:
    pixels, mask, attrs = read_archive_image(root, unit_id)
    record = ArchiveRecord.from_attrs(attrs)
    spacing: tuple[float, ...] = record.spacing
    if config.kind == "2d" and pixels.ndim == 4 and pixels.shape[1] == 1:  # a single-slice volume is a 2D image
        pixels, mask, spacing = pixels[:, 0], None if mask is None else mask[:, 0], record.spacing[1:]
    elif pixels.ndim == 3:
        spacing = record.spacing[1:]
    image, sample_mask = to_training_sample(pixels, spacing, record.modality, config, mask=mask,
                                            norm=layout.normalization.get(record.modality),
                                            target_spacing=layout.target_spacing)
    check = None
    if mask is not None and sample_mask is not None:
        stored_spacing = _sample_spacing(pixels.shape[1:], spacing, config, layout.target_spacing)
        check = mask_check(unit_id, foreground_amounts(mask, spacing), foreground_amounts(sample_mask, stored_spacing),
                           "ml" if len(spacing) == 3 else "mm2")
    return image, sample_mask, check


def _sample_spacing(native_shape: tuple[int, ...], spacing: tuple[float, ...], config: PreprocessConfig,
                    target: tuple[float, float, float] | None) -> tuple[float, ...]:
    """Voxel spacing of a training sample: the target spacing in 3D (crop/pad keeps it); in 2D the native spacing
    scaled by the resize factor (crop_or_pad keeps it)."""
    if len(spacing) == 3:
        return target if target is not None else spacing
    if config.fit == "resize":
        return tuple(s * n / m for s, n, m in zip(spacing, native_shape, config.shape))
    return spacing


__all__ = ["AssembleResult", "TrainingLayout", "assemble_range", "foreground_amounts", "layout_training", "mask_check"]
