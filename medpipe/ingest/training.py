"""Training arrays: choose the samples that fit the configured kind, split by patient, order them with a seed,
then fill the training layout range by range (each writing task owns whole shards, or whole cases).

Two layouts (docs/store.md): "fixed" = one (N, C, *shape) array (2D; a 3D option when every case fits) and
"volumes" = each 3D case whole, in canonical RAS orientation, resampled to the segmentation plan's spacing
(medpipe.volumes), for patch-based training."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import zarr

from medpipe.codecs import as_stored, for_writing, training_images_chain
from medpipe.config import IngestConfig, PreprocessConfig, StoreConfig
from medpipe.ingest.limits import prepare_worker
from medpipe.ingest.lock import check_lock
from medpipe.ingest.records import ArchiveRecord, Unit
from medpipe.preprocess import NotTrainable, check_kind, normalize, to_training_sample
from medpipe.splits import SPLIT_NAMES, patient_labels, split_patients, split_warnings
from medpipe.ingest.header_geometry import median_of_modality_medians
from medpipe.ingest.mask_check import AssembleResult, capture_failure, foreground_amounts, mask_check
from medpipe.ingest.volume_cases import (assemble_volumes, case_geometry, create_volume_layout,
                                        plan_volumes)
from medpipe.store import (ATTRS_KEY, attrs_of, create_training_arrays, get_array, get_group, open_store,
                           read_archive_image, row_digests, sample_digest, samples_per_chunk, write_sample_table)


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
    split_codes: list[int] = field(default_factory=list)  # planned before archive: split code per row
    deferred: tuple[str, ...] = ()  # modalities whose samples wait for the dataset's statistics (CT in HU)
    # the per-sample table as written (driver only, never sent to a task): the content hash takes it from here
    # instead of reading back what was just written
    table: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def for_range(self, start: int, stop: int) -> "TrainingLayout":
        """A copy that carries only the unit ids of [start, stop): what one assembling task needs to be sent."""
        return replace(self, unit_ids=self.unit_ids[start - self.offset : stop - self.offset],
                       modalities=self.modalities[start - self.offset : stop - self.offset],
                       excluded=[], split_codes=[], warnings=[], offset=start, table=None)

    @property
    def volumes(self) -> bool:
        return self.layout == "volumes"


def _target_spacing(config: PreprocessConfig, fingerprint: dict[str, Any],
                    modalities: set[str]) -> tuple[float, float, float] | None:
    if config.kind != "3d":
        return None
    if config.target_spacing is not None:
        return config.target_spacing
    return median_of_modality_medians({m: [fingerprint["modalities"][m]["spacing_median"]] for m in modalities})


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
    table = {**extra,
        "patient": np.array(patients, dtype=object), "study": np.array([r.study for r in chosen], dtype=object),
        "series": np.array([r.series for r in chosen], dtype=object),
        "unit": np.array([r.id for r in chosen], dtype=object),
        "source_hash": np.array([r.id for r in chosen], dtype=object),
        "modality": np.array([r.modality for r in chosen], dtype=object),
        "split": splits, "label": np.asarray(labels, dtype=np.int64),
        "has_mask": np.array([r.has_mask for r in chosen], dtype=bool),
        "spacing": np.array([r.spacing for r in chosen], dtype=np.float64).reshape(n, 3),
        "shape": np.array([r.shape for r in chosen], dtype=np.int64).reshape(n, 4),
    }
    write_sample_table(root, table)
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
        warnings=split_warnings(split_of, strata, config.split, classes), table=table,
    )


def fits_kind(depth: int | None, config: PreprocessConfig) -> NotTrainable | None:
    """Why a unit of `depth` slices (from its headers; None = unknown until decoded) cannot be a sample of the
    configured kind, or None."""
    if depth is None:
        return None
    try:
        check_kind((1, depth, 1, 1) if depth > 1 else (1, 1, 1), config)
    except NotTrainable as exc:
        return exc
    return None


def plan_training(store_url: str, units: list[Unit], depths: dict[str, int | None], classes: list[str],
                  config: IngestConfig, min_tasks: int,
                  target_spacing: tuple[float, float, float] | None = None,
                  unit_bytes: dict[str, int] | None = None) -> TrainingLayout:
    """Before archiving: the row (or case) of every unit that fits the configured kind, split by patient, ordered
    with the seed, every 3D sample resampled to `target_spacing`; creates the training arrays with shards sized so
    that about `min_tasks` tasks each own whole shards (never more than `config.store.chunks_per_shard` chunks per
    shard). Cases of the volumes layout are grouped by source bytes (`unit_bytes`). Writes the labels."""
    pre = config.preprocess
    eligible, excluded = [], []
    for unit in sorted(units, key=lambda u: u.id):
        reason = fits_kind(depths.get(unit.id), pre)
        if reason is None:
            eligible.append(unit)
        else:
            excluded.append({"unit": unit.id, "reason": str(reason)})
    order = np.random.default_rng(config.order_seed).permutation(len(eligible))
    chosen = [eligible[i] for i in order]
    labels = [classes.index(u.label) if u.label in classes else -1 for u in chosen]
    patients = [u.patient for u in chosen]
    split_of = split_patients(patients, config.split)
    n = len(chosen)
    volumes = pre.effective_layout() == "volumes"
    sample_shape = (pre.channels, *pre.shape)
    with_masks = any(u.mask is not None for u in chosen)
    root = open_store(store_url, mode="a")
    if volumes:
        create_volume_layout(root, n)
        sizes = [max(1, (unit_bytes or {}).get(u.id, 1)) for u in chosen]
        ranges = byte_ranges(sizes, max(1, -(-sum(sizes) // max(min_tasks, 1))))
    else:
        per_chunk = samples_per_chunk(sample_shape, training_images_chain(config.store)[0].itemsize, config.store.chunk_bytes)
        chunks = max(1, -(-n // per_chunk))
        k = max(1, min(config.store.chunks_per_shard, -(-chunks // max(min_tasks, 1))))
        per_task = create_training_arrays(root, n, sample_shape, with_masks,
                                          config.store.model_copy(update={"chunks_per_shard": k}))
        ranges = [(a, min(a + per_task, n)) for a in range(0, n, per_task)]
    get_array(root, "training/labels")[...] = np.asarray(labels, dtype=np.int64) if n else np.zeros(0, np.int64)
    codes = [split_of[p] for p in patients]
    return TrainingLayout(
        unit_ids=[u.id for u in chosen], modalities=[u.modality for u in chosen], sample_shape=sample_shape,
        with_masks=with_masks, ranges=ranges,
        normalization=dict(pre.normalization) if pre.normalization is not None else {},
        target_spacing=target_spacing if pre.kind == "3d" else None, excluded=excluded,
        layout="volumes" if volumes else "fixed",
        splits={name: codes.count(code) for code, name in enumerate(SPLIT_NAMES)},
        split_patients={name: sum(1 for c in split_of.values() if c == code) for code, name in enumerate(SPLIT_NAMES)},
        warnings=split_warnings(split_of, patient_labels(patients, labels), config.split, classes),
        split_codes=codes, deferred=() if pre.normalization is not None else ("CT",),
    )


def byte_ranges(sizes: list[int], target: int) -> list[tuple[int, int]]:
    """Consecutive index ranges whose `sizes` add up to about `target` each (every range holds at least one)."""
    ranges: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= target:
            ranges.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def finish_training(store_url: str, layout: TrainingLayout, records: list[ArchiveRecord], fingerprint: dict[str, Any],
                    config: PreprocessConfig, run_id: str) -> tuple[TrainingLayout, list[dict[str, Any]]]:
    """After archiving (samples planned before): the sample table, the dataset normalisation of deferred
    modalities, the volumes plan; returns the final layout and the failures of rows whose unit was not archived."""
    check_lock(store_url, run_id)
    by_id = {r.id: r for r in records}
    # a unit that could not be decoded keeps its planned row, empty and split -1 (never read); its files are in
    # the quarantine report, so the row is not listed again among the exclusions
    failures = [{"index": i, "unit": u, "reason": "its image could not be decoded", "quarantined": True}
                for i, u in enumerate(layout.unit_ids) if u not in by_id]
    archived_ids = set(by_id)
    excluded = [e for e in layout.excluded if e["unit"] in archived_ids]
    chosen = [by_id.get(u) for u in layout.unit_ids]
    normalization = dict(layout.normalization)
    for modality in layout.deferred:
        if modality not in normalization:
            normalization[modality] = fingerprint["modalities"].get(modality, {}).get("intensity")
    plan, extra = None, {}
    n = len(chosen)
    if layout.volumes:
        present = [r for r in chosen if r is not None]
        plan = plan_volumes(present, config)[0]
        if plan is not None and layout.target_spacing is not None and \
                not np.allclose(plan.target_spacing, layout.target_spacing, rtol=1e-6, atol=1e-9):
            # decoding found another geometry than the headers promised: the plan says what the cases hold
            plan = plan_volumes(present, config.model_copy(update={"target_spacing": layout.target_spacing}))[0]
        target = layout.target_spacing
        extra = {"volume_shape": np.array([case_geometry(r, target).shape if r is not None else (0, 0, 0)
                                           for r in chosen], dtype=np.int64).reshape(n, 3)}
    root = open_store(store_url, mode="a")
    table = {**extra,
        "patient": np.array([_unit_field(r, "patient") for r in chosen], dtype=object),
        "study": np.array([_unit_field(r, "study") for r in chosen], dtype=object),
        "series": np.array([_unit_field(r, "series") for r in chosen], dtype=object),
        "unit": np.array(layout.unit_ids, dtype=object), "source_hash": np.array(layout.unit_ids, dtype=object),
        "modality": np.array([r.modality if r is not None else m for r, m in zip(chosen, layout.modalities)],
                             dtype=object),
        "split": np.array(layout.split_codes, dtype=np.int8),
        "label": np.asarray(get_array(root, "training/labels")[...], dtype=np.int64),
        "has_mask": np.array([bool(r and r.has_mask) for r in chosen], dtype=bool),
        "spacing": np.array([r.spacing if r is not None else (0.0, 0.0, 0.0) for r in chosen],
                            dtype=np.float64).reshape(n, 3),
        "shape": np.array([r.shape if r is not None else (0, 0, 0, 0) for r in chosen], dtype=np.int64).reshape(n, 4),
    }
    write_sample_table(root, table)
    final = replace(layout, excluded=excluded, normalization=normalization, table=table,
                    sample_shape=layout.sample_shape if plan is None else (config.channels, *plan.patch_size),
                    modalities=[r.modality if r is not None else m for r, m in zip(chosen, layout.modalities)],
                    plan=None if plan is None else plan.to_dict())
    return final, failures


def _unit_field(record: ArchiveRecord | None, name: str) -> str:
    return "" if record is None else str(getattr(record, name))


def deferred_rows(layout: TrainingLayout, records: list[ArchiveRecord]) -> list[tuple[int, int]]:
    """Ranges (whole write ranges of the layout) holding samples whose intensities wait for the dataset's
    statistics: the normalising step rewrites only these. Volumes are normalised as they are read (a case is far
    larger than the patches read from it), unless the dataset gave no statistics (per-image z-score: rewritten)."""
    modality = {r.id: r.modality for r in records}
    waiting = {m for m in layout.deferred if not (layout.volumes and layout.normalization.get(m))}
    return [(a, b) for a, b in layout.ranges if any(modality.get(u) in waiting for u in layout.unit_ids[a:b])]


def normalize_rows(store_url: str, layout: TrainingLayout, start: int, stop: int, run_id: str) -> AssembleResult:
    """Normalise the deferred-modality samples of rows [start, stop) (fixed layout) or cases (volumes) in place with
    the dataset's statistics (`layout.normalization`): CT clipped and z-scored as nnU-Net does. Returns the new
    digests of what it rewrote."""
    prepare_worker()
    check_lock(store_url, run_id)
    root = open_store(store_url, mode="a")
    modalities = layout.modalities[start - layout.offset : stop - layout.offset]
    result = AssembleResult()
    if layout.volumes:
        for offset, modality in enumerate(modalities):
            case = f"training/volumes/{start + offset}"
            if modality in layout.deferred and not layout.normalization.get(modality) and case in root:
                # no dataset statistics: z-scored per case, which a read of a patch cannot do (for CT, of
                # values floored at CT_FOREGROUND_HU: a dataset without statistics has no voxel above it)
                image = for_writing(get_array(root, f"{case}/image"))
                stored = normalize(np.asarray(image[...]), modality, None).astype(image.dtype, copy=False)
                image[...] = stored
                result.digests[f"volumes/{start + offset}/image"] = sample_digest(stored)
                group = get_group(root, case)
                group.attrs[ATTRS_KEY] = {k: v for k, v in attrs_of(group).items() if k != "raw_intensities"}
        return result
    images = for_writing(get_array(root, "training/images"))
    block = np.asarray(images[start:stop])
    for offset, modality in enumerate(modalities):
        if modality in layout.deferred:
            block[offset] = normalize(block[offset], modality, layout.normalization.get(modality))
    block = as_stored(images, block)
    images[start:stop] = block
    result.digests.update(row_digests("images", start, block))
    return result


def assemble_range(store_url: str, layout: TrainingLayout, start: int, stop: int, config: PreprocessConfig,
                   run_id: str, store_config: StoreConfig | None = None) -> AssembleResult:
    """Preprocess units [start, stop) from the archive and write them into the training arrays (whole shards):
    the path for 3D stores whose target spacing is planned from the archived cases (see plan_training).

    Samples that cannot be made are returned as failures: the caller excludes them (split -1), so one bad image
    never stops the run and never trains as a zero-filled sample. Each sample with a mask gets a mask check."""
    prepare_worker()
    check_lock(store_url, run_id)
    root = open_store(store_url, mode="a")
    if layout.layout == "volumes":
        return assemble_volumes(root, layout.unit_ids[start - layout.offset : stop - layout.offset], start,
                                layout.normalization, config, layout.target_spacing, store_config)
    block = RowBlock(layout, start, stop)
    for offset, unit_id in enumerate(layout.unit_ids[start - layout.offset : stop - layout.offset]):
        block.put(start + offset, unit_id, functools.partial(_training_sample, root, unit_id, layout, config))
    block.write(root)
    return block.result


class RowBlock:
    """Training rows [start, stop) of one task (whole zarr shards), filled sample by sample, written at once."""

    def __init__(self, layout: TrainingLayout, start: int, stop: int, dtype: str = "float32") -> None:
        self.start, self.stop = start, stop
        self.images = np.zeros((stop - start, *layout.sample_shape), dtype=np.float32)
        self.masks = (np.zeros((stop - start, 1, *layout.sample_shape[1:]), dtype=np.uint8)
                      if layout.with_masks else None)
        self.result = AssembleResult()

    def put(self, index: int, unit_id: str,
            make: Callable[[], tuple[np.ndarray, np.ndarray | None, dict[str, Any] | None]]) -> None:
        """Fill row `index` with `make()` = (image, mask, mask check); a failure leaves it zero (excluded later)."""
        made = capture_failure(self.result, index, unit_id, make)
        if made is None:
            return
        image, mask, check = made
        self.images[index - self.start] = image
        if self.masks is not None and mask is not None:
            self.masks[index - self.start] = mask
        if check is not None:
            self.result.mask_checks.append(check)

    def fail(self, index: int, unit_id: str, reason: str) -> None:
        self.result.failures.append({"index": index, "unit": unit_id, "reason": reason})

    def write(self, root: zarr.Group) -> None:
        """One write per array: the block covers whole shards, so no other task touches these chunks."""
        if self.stop <= self.start:
            return
        images = for_writing(get_array(root, "training/images"))
        stored = as_stored(images, self.images)
        images[self.start : self.stop] = stored
        self.result.digests.update(row_digests("images", self.start, stored))
        if self.masks is not None:
            for_writing(get_array(root, "training/masks"))[self.start : self.stop] = self.masks
            self.result.digests.update(row_digests("masks", self.start, self.masks))


def _training_sample(root: zarr.Group, unit_id: str, layout: TrainingLayout, config: PreprocessConfig
                     ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any] | None]:
    pixels, mask, attrs = read_archive_image(root, unit_id)
    record = ArchiveRecord.from_attrs(attrs)
    return sample_from(pixels, mask, record, layout, config)


def sample_from(pixels: np.ndarray, mask: np.ndarray | None, record: ArchiveRecord, layout: TrainingLayout,
                config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any] | None]:
    """The fixed-layout training sample (channels, *shape), its mask and mask check, from a decoded image
    (C, [Z,] Y, X) and its record. Modalities in `layout.deferred` keep their intensities (normalize_rows)."""
    spacing: tuple[float, ...] = record.spacing
    if config.kind == "2d" and pixels.ndim == 4 and pixels.shape[1] == 1:  # a single-slice volume is a 2D image
        pixels, mask, spacing = pixels[:, 0], None if mask is None else mask[:, 0], record.spacing[1:]
    elif pixels.ndim == 3:
        spacing = record.spacing[1:]
    image, sample_mask = to_training_sample(pixels, spacing, record.modality, config, mask=mask,
                                            norm=layout.normalization.get(record.modality),
                                            target_spacing=layout.target_spacing,
                                            intensities=record.modality not in layout.deferred)
    check = None
    if mask is not None and sample_mask is not None:
        stored_spacing = _sample_spacing(pixels.shape[1:], spacing, config, layout.target_spacing)
        check = mask_check(record.id, foreground_amounts(mask, spacing),
                           foreground_amounts(sample_mask, stored_spacing), "ml" if len(spacing) == 3 else "mm2")
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
