"""One ingest task: archive the units of a shard and, when the samples were planned before archiving, make each
unit's training sample from the array it just decoded (each file read and decoded once, the archive never read
back). Archive images are written in batches (medpipe.store_batch); training rows of the task's whole shards are
written once at the end; 3D cases are written one by one (each its own group).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import zarr

from medpipe.config import IngestConfig
from medpipe.deid import DeidKey
from medpipe.ingest.archive import DecodedUnit, decode_unit, previous_unit
from medpipe.ingest.limits import image_byte_limit, prepare_worker
from medpipe.ingest.lock import check_lock
from medpipe.ingest.mask_check import AssembleResult, capture_failure
from medpipe.ingest.records import ArchiveFailure, ArchiveResult, Unit
from medpipe.ingest.training import RowBlock, TrainingLayout, sample_from
from medpipe.ingest.volume_cases import write_volume_from
from medpipe.store import get_group, open_store
from medpipe.store_batch import ArchiveWriter


@dataclass(frozen=True)
class ShardWork:
    """What one task is sent: its units with their input tags, and the training rows it owns (start == stop: none).
    `layout` is the slice of the training layout for [start, stop), None when samples are made after archiving."""

    units: tuple[Unit, ...]
    tags: dict[str, str]
    start: int = 0
    stop: int = 0
    layout: TrainingLayout | None = None
    fresh: bool = False  # a new store: no unit can have been archived before (the archive is not even listed)


@dataclass
class ShardResult:
    """A task's outcome: one archive result per unit, and what making its samples produced."""

    results: list[ArchiveResult] = field(default_factory=list)
    assembled: AssembleResult = field(default_factory=AssembleResult)


def ingest_shard(source_url: str, store_url: str, work: ShardWork, key: DeidKey, config: IngestConfig,
                 run_id: str) -> ShardResult:
    """Archive every unit of `work` (skipping units archived earlier from the same inputs) and make the training
    samples of its rows from the same decoded arrays."""
    prepare_worker()
    check_lock(store_url, run_id)
    root = open_store(store_url, mode="a")
    existing = set() if work.fresh else set(get_group(root, "archive").group_keys())  # one listing
    limit = image_byte_limit(config.max_image_bytes)
    layout = work.layout
    rows = {} if layout is None else {u: work.start + i for i, u in enumerate(layout.unit_ids)}
    block = RowBlock(layout, work.start, work.stop) if layout is not None and not layout.volumes else None
    out = ShardResult(assembled=block.result if block is not None else AssembleResult())
    with ArchiveWriter(store_url, config.store, existing) as writer:
        for unit in work.units:
            tag = work.tags[unit.id]
            decoded = previous_unit(root, unit.id, tag) if unit.id in existing else None
            if decoded is None:
                made = decode_unit(unit, source_url, key, tag, limit)
                if isinstance(made, ArchiveFailure):
                    out.results.append(made)
                    continue
                decoded = made
                writer.add(unit.id, decoded.pixels, decoded.spacing, decoded.mask, decoded.record.to_attrs())
            out.results.append(decoded.record)
            if unit.id in rows and layout is not None:
                _make_sample(root, rows[unit.id], decoded, layout, config, block, out.assembled)
    if block is not None:
        block.write(root)
    return out


def _make_sample(root: zarr.Group, index: int, decoded: DecodedUnit, layout: TrainingLayout, config: IngestConfig,
                 block: RowBlock | None, result: AssembleResult) -> None:
    """Row `index` (fixed layout, into the block) or case `index` (volumes, written now) from a decoded unit."""
    record = decoded.record
    if block is not None:
        block.put(index, record.id, lambda: sample_from(decoded.pixels, decoded.mask, record, layout,
                                                        config.preprocess))
        return
    capture_failure(result, index, record.id, lambda: write_volume_from(
        root, index, decoded.pixels, decoded.mask, record, layout.normalization, config.preprocess,
        layout.target_spacing, config.store, result, layout.deferred))
