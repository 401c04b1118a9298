"""An ingest run: the driver-side steps and their order around the mapped (parallel) steps.

    prepare_ingest -> scan_shard (mapped) -> duplicate_checks -> pixel_digests (mapped, only for shared UIDs)
    -> plan_ingest -> plan_training (rows before archiving) -> ingest_shard (mapped: archive + samples)
    -> finish_training -> normalize_rows (mapped, only shards holding CT) -> finish_ingest

3D stores whose target spacing is planned from the dataset make their samples after archiving instead:
    ... -> ingest_shard (mapped: archive only) -> lay_out_ingest -> assemble_range (mapped) -> finish_ingest

`run_ingest_steps` runs the whole sequence with a `mapper` for the parallel steps: the Prefect flow maps tasks
on its Dask task runner, the benchmarks map on bare Dask or serially, so both run exactly the same work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from medpipe import __version__
from medpipe.config import IngestConfig
from medpipe.deid import DEID_RULES_VERSION, DeidKey, Pseudonymizer, key_check_record, key_matches
from medpipe.preflight import SourceNotFoundError
from medpipe.fingerprint import compute_fingerprint
from medpipe.ingest.archive import READER_RULES_VERSION, run_tag, unit_input_tag
from medpipe.ingest.discover import SourceListing, discover_files, make_shards, source_fs
from medpipe.ingest.finalize import account, finalize_store, verify_store
from medpipe.ingest.lock import acquire_lock, check_lock, new_run_id, release_lock
from medpipe.ingest.duplicates import pixel_digests
from medpipe.ingest.mask_check import AssembleResult
from medpipe.ingest.records import ArchiveFailure, ArchiveRecord, ArchiveResult, ScanRecord, Unit, UnitKind
from medpipe.ingest.scan import scan_shard
from medpipe.ingest.shard import ShardResult, ShardWork, ingest_shard
from medpipe.ingest.header_geometry import planned_target_spacing, unit_geometry
from medpipe.ingest.training import (TrainingLayout, assemble_range, deferred_rows, finish_training, fits_kind,
                                     layout_training, normalize_rows, plan_training)
from medpipe.ingest.units import UnitPlan, plan_units, sop_groups
from medpipe.errors import UserError
from medpipe.manifest import Manifest, check_references, load_manifest
from medpipe.preprocess import ZSCORED_MODALITIES
from medpipe.store import ATTRS_KEY, StoreError, open_store, store_attrs


# Files image ingest does not look at: tables and records of physiological signals (`medpipe ingest-signals`
# reads them), so that a source holding both (the demo's signals/ folder) is not a pile of quarantined files.
NOT_IMAGE_SUFFIXES = (".csv", ".tsv", ".parquet", ".hea", ".dat", ".atr", ".qrs", ".edf", ".bdf")
TASKS_PER_WORKER = 4  # ingest tasks per Dask worker: enough to balance uneven shards, few enough to stay cheap


class KeyMismatchError(StoreError):
    """The store was built with another de-identification key."""


@dataclass
class IngestRun:
    """What the steps of one run share: where from, where to, the listing, the manifest and the run's lock id."""

    source: str
    store: str
    config: IngestConfig
    listing: SourceListing
    manifest: Manifest
    run_fingerprint: str
    key_identity: str  # keyed digest of the key: enters run tags only, never stored on its own
    run_id: str
    previous: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)  # why a store marked complete is not up to date
    retry_quarantined: bool = False
    manifest_hash: str = ""  # keyed hash of the manifest path given in the config

    @property
    def up_to_date(self) -> bool:
        """The store holds a completed, verified run of exactly these inputs: nothing to do."""
        return bool(self.previous and self.previous.get("complete") and not self.retry_quarantined
                    and self.previous.get("run_fingerprint") == self.run_fingerprint and not self.problems)

    @property
    def lineage(self) -> dict[str, Any]:
        """The config as the store records it: no runtime settings, the manifest path as a keyed hash only."""
        data = self.config.lineage_dict()
        if data.get("manifest"):
            data["manifest"] = "hash:" + self.manifest_hash
        return data

    def scan_shards(self) -> list[list[tuple[int, str]]]:
        return make_shards(list(enumerate(self.listing.paths)), self.files_per_task)

    @property
    def files_per_task(self) -> int:
        """Files per task of the per-file steps: `files_per_shard` at least, more when that would make more than
        TASKS_PER_WORKER tasks per worker (each task run costs the orchestrator ~0.1 s; docs/benchmarks.md)."""
        tasks = TASKS_PER_WORKER * self.config.workers
        return max(self.config.files_per_shard, -(-len(self.listing.paths) // tasks))


@dataclass
class ArchiveOutcome:
    """Archive results: the archived units' records, and every result (failures included) for the accounting."""

    records: list[ArchiveRecord] = field(default_factory=list)
    results: list[ArchiveResult] = field(default_factory=list)


def check_ingest_inputs(source: str, store: str, config: IngestConfig, key: DeidKey) -> None:
    """Fail fast, before any flow starts: missing source, unusable manifest, a store made with another key."""
    check_source_and_store(source, store, config.manifest, config.classes, key)


def check_source_and_store(source: str, store: str, manifest: str | None, classes: list[str] | None,
                           key: DeidKey) -> dict[str, Any] | None:
    """A source folder that exists, a manifest that loads, a store not made with another key (image and signal
    ingest alike); returns the store's previous attributes (None for a new store)."""
    fs, root = source_fs(source)
    if not fs.exists(root) or not fs.isdir(root):
        raise SourceNotFoundError(f"source folder not found: {source}")
    load_manifest(fs, root, manifest, classes, Pseudonymizer(key).path)
    return check_store_key(store, key)


def check_store_key(store: str, key: DeidKey) -> dict[str, Any] | None:
    """The store's previous attributes (None for a new store); raises if it was made with another key."""
    try:
        previous = store_attrs(store) or None
    except StoreError:
        previous = None
    if not previous:
        return None
    record = previous.get("key_check")
    if record is None and previous.get("key_fingerprint") is not None:
        raise KeyMismatchError(f"{store} was made by an older medpipe without a key check record; ingest into a "
                               "new store path")
    if record is not None and not key_matches(key, record):
        raise KeyMismatchError(
            f"{store} was de-identified with another key; pseudonyms would not match. Use a new store path "
            "or the original key (a store cannot be re-keyed: re-ingest from the source, docs/deidentification.md)")
    return previous


def prepare_ingest(source: str, store: str, config: IngestConfig, key: DeidKey, run_id: str,
                   retry_quarantined: bool = False) -> IngestRun:
    """Discover files, load the manifest, check the key, verify a completed store; mark a store being rebuilt
    incomplete (the caller holds the store's lock for `run_id`)."""
    fs, root = source_fs(source)
    pseudonyms = Pseudonymizer(key)
    manifest, manifest_path = load_manifest(fs, root, config.manifest, config.classes, pseudonyms.path)
    exclude = [manifest_path[len(root):].lstrip("/")] if manifest_path and manifest_path.startswith(root) else []
    for sibling in ("labels.csv", "labels_multiclass.csv"):  # demo manifests beside the images are not images
        if fs.exists(f"{root}/{sibling}"):
            exclude.append(sibling)
    listing = discover_files(source, exclude=exclude, store=store, skip_suffixes=NOT_IMAGE_SUFFIXES)
    check_references(manifest, set(listing.paths), pseudonyms.path)
    manifest_digest = hashlib.sha256(fs.cat_file(manifest_path) if manifest_path else b"").hexdigest()
    run_fingerprint = hashlib.sha256(json.dumps(
        [listing.fingerprint(), manifest_digest, config.lineage_dict(), key.identity, DEID_RULES_VERSION,
         READER_RULES_VERSION, __version__], sort_keys=True,
    ).encode()).hexdigest()
    previous = check_store_key(store, key)
    run = IngestRun(source, store, config, listing, manifest, run_fingerprint, key.identity, run_id, previous,
                    retry_quarantined=retry_quarantined,
                    manifest_hash=pseudonyms.path(config.manifest) if config.manifest else "")
    if previous and previous.get("complete") and previous.get("run_fingerprint") == run_fingerprint:
        run.problems = verify_store(store)
    if not run.up_to_date:
        check_lock(store, run_id)
        root_group = open_store(store, mode="a")
        check = previous.get("key_check") if previous else None
        root_group.attrs[ATTRS_KEY] = {**(previous or {}), "complete": False,
                                       "key_check": check or key_check_record(key)}
    return run


def duplicate_checks(run: IngestRun, scan_records: list[ScanRecord]) -> list[list[tuple[int, str]]]:
    """Shards of `(index, relative path)` of files that share a SOPInstanceUID: their pixels must be compared."""
    items = [(i, run.listing.paths[i]) for group in sop_groups(scan_records) for i in group]
    return make_shards(items, run.config.files_per_shard)  # few: only files that share a SOPInstanceUID


def plan_ingest(run: IngestRun, scan_records: list[ScanRecord], digests: dict[int, str | None],
                key: DeidKey) -> tuple[UnitPlan, dict[str, str]]:
    """Units to archive (with per-unit input tags for skip-on-rerun) and the pre-decode quarantine."""
    plan = plan_units(scan_records, run.listing.paths, run.manifest, Pseudonymizer(key), digests,
                      run.config.patient_folder_depth, run.config.nifti_modality)
    tag = run_tag(run.config.store, run.key_identity)
    tags = {u.id: unit_input_tag(u, run.listing.sizes, run.listing.stamps, tag) for u in plan.units}
    return plan, tags


def unit_shards(run: IngestRun, plan: UnitPlan) -> list[list[Unit]]:
    """Shards of units holding about `files_per_task` files each (a CT series counts all its slices)."""
    shards: list[list[Unit]] = []
    current: list[Unit] = []
    files = 0
    for unit in plan.units:
        current.append(unit)
        files += len(unit.indices)
        if files >= run.files_per_task:
            shards.append(current)
            current, files = [], 0
    if current:
        shards.append(current)
    return shards


def unit_depths(plan: UnitPlan, scans: list[ScanRecord]) -> dict[str, int | None]:
    """Slices of each unit from its headers: files of a series, frames of a multi-frame file (or of its stack),
    NIfTI/raster depth; None when the headers do not say."""
    by_index = {s.index: s for s in scans}
    depths: dict[str, int | None] = {}
    for unit in plan.units:
        scan = by_index.get(unit.indices[0])
        if unit.kind == UnitKind.dicom_series:
            depths[unit.id] = len(unit.indices)
        elif unit.frames is not None:
            depths[unit.id] = len(unit.frames)
        elif scan is not None and scan.dicom is not None:
            depths[unit.id] = scan.dicom.slice.frames
        else:
            depths[unit.id] = scan.depth if scan is not None else None
    return depths


class PackingConfigError(UserError, ValueError):
    """training_dtype uint8 on a store whose samples are z-scored."""


def check_packing(config: IngestConfig, units: list[Unit]) -> None:
    """training_dtype uint8 holds intensities scaled to 0..1: refuse stores with CT or MR samples (z-scored, see
    medpipe.preprocess.normalize) before anything is written, in one line, instead of wrapping their values."""
    zscored = sorted({u.modality for u in units if u.modality in ZSCORED_MODALITIES})
    if config.store.training_dtype == "uint8" and zscored:
        count = sum(1 for u in units if u.modality in ZSCORED_MODALITIES)
        raise PackingConfigError(f"store.training_dtype uint8 holds intensities scaled to 0..1, but {count} "
                                 f"{'/'.join(zscored)} image(s) are z-scored: use float16 for this store")


def plan_samples(run: IngestRun, plan: UnitPlan, scans: list[ScanRecord]) -> TrainingLayout | None:
    """The training rows planned before archiving, so that each task makes its samples from the arrays it decodes;
    None when a 3D store's target spacing cannot be planned from headers (a case whose headers give no geometry,
    such as a legacy multi-frame file: the samples are then made after archiving, from the archive). Creates the
    archive group the tasks write into."""
    check_lock(run.store, run.run_id)
    pre = run.config.preprocess
    depths = unit_depths(plan, scans)
    check_packing(run.config, [u for u in plan.units if fits_kind(depths[u.id], pre) is None])
    open_store(run.store, mode="a").require_group("archive")
    target = pre.target_spacing
    if pre.kind == "3d" and target is None:
        by_index = {s.index: s for s in scans}
        geometries = [unit_geometry(u, by_index) for u in plan.units if fits_kind(depths[u.id], pre) is None]
        known = [g for g in geometries if g is not None]
        if len(known) < len(geometries):  # the plan must see every case as the archive-based planning would
            return None
        target = planned_target_spacing(known, pre)
        if target is None:
            return None
    sizes = run.listing.sizes
    unit_bytes = {u.id: sum(sizes[i] for i in u.indices) for u in plan.units}
    return plan_training(run.store, plan.units, depths, run.manifest.classes, run.config,
                         min_tasks=TASKS_PER_WORKER * run.config.workers, target_spacing=target,
                         unit_bytes=unit_bytes)


def shard_work(run: IngestRun, plan: UnitPlan, tags: dict[str, str], layout: TrainingLayout | None
               ) -> list[ShardWork]:
    """The ingest tasks: with planned samples, one per write range (whole shards of rows, sized by bytes), the
    units without a row spread over them; else shards of about `files_per_task` files."""
    fresh = run.previous is None  # nothing of a new store was archived by an earlier (killed) run

    def work(units: list[Unit], start: int = 0, stop: int = 0) -> ShardWork:
        return ShardWork(tuple(units), {u.id: tags[u.id] for u in units}, start, stop,
                         None if layout is None or stop <= start else layout.for_range(start, stop), fresh)

    if layout is None or not layout.ranges:
        return [work(units) for units in unit_shards(run, plan)]
    by_id = {u.id: u for u in plan.units}
    rows = set(layout.unit_ids)
    groups = [[by_id[u] for u in layout.unit_ids[a:b]] for a, b in layout.ranges]
    for i, unit in enumerate(u for u in plan.units if u.id not in rows):
        groups[i % len(groups)].append(unit)
    return [work(units, a, b) for units, (a, b) in zip(groups, layout.ranges)]


def collect_archive(shard_results: list[ShardResult]) -> ArchiveOutcome:
    """Flatten the mapped results; archived records apart (failures are settled by the accounting)."""
    results = [r for shard in shard_results for r in shard.results]
    return ArchiveOutcome(records=[r for r in results if not isinstance(r, ArchiveFailure)], results=results)


def lay_out_ingest(run: IngestRun, outcome: ArchiveOutcome) -> tuple[TrainingLayout, dict[str, Any]]:
    """Fingerprint the archived images, then create the training arrays and the per-sample table."""
    check_lock(run.store, run.run_id)
    fingerprint = compute_fingerprint(outcome.records)
    layout = layout_training(run.store, outcome.records, run.manifest.classes, run.config, fingerprint)
    return layout, fingerprint


def finish_ingest(run: IngestRun, plan: UnitPlan, outcome: ArchiveOutcome, layout: TrainingLayout,
                  fingerprint: dict[str, Any], key: DeidKey, assembled: list[AssembleResult]) -> dict[str, Any]:
    """Account for every file, write reports and the content hash, mark the store complete."""
    check_lock(run.store, run.run_id)
    pseudonyms = Pseudonymizer(key)
    accounting = account(len(run.listing.paths), plan.units, outcome.results, plan.quarantine,
                         lambda i: pseudonyms.path(run.listing.paths[i]))
    return finalize_store(
        run.store, records=outcome.records, accounting=accounting, collisions=plan.collisions, layout=layout,
        manifest_issues=run.manifest.issues, fingerprint=fingerprint, config=run.lineage,
        classes=run.manifest.classes, run_fingerprint=run.run_fingerprint, key_check=_stored_key_check(run.store),
        links=[{"link_hash": pseudonyms.path(link["path"]), "reason": link["reason"]}
               for link in run.listing.skipped_links],
        assemble_failures=[f for part in assembled for f in part.failures],
        mask_checks=sorted((c for part in assembled for c in part.mask_checks), key=lambda c: c["unit"]),
        digests={k: v for part in assembled for k, v in part.digests.items()},
    )


def _stored_key_check(store: str) -> dict[str, Any]:
    attrs = store_attrs(store)
    return dict(attrs.get("key_check") or {})


class Mapper(Protocol):
    """Runs `fn` once per argument tuple, in parallel where it can; results in the order of `calls`."""

    def __call__(self, step: str, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]: ...


def serial_mapper(step: str, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
    """A Mapper that runs every call here, one after the other."""
    return [fn(*args) for args in calls]


class Driver(Protocol):
    """Runs one driver step `fn(*args)` here (a Prefect flow runs it as a task run, with retries)."""

    def __call__(self, step: str, fn: Callable[..., Any], *args: Any) -> Any: ...


def direct_driver(step: str, fn: Callable[..., Any], *args: Any) -> Any:
    """A Driver that calls the step."""
    return fn(*args)


def run_ingest_steps(run: IngestRun, key: DeidKey, mapper: Mapper = serial_mapper,
                     driver: Driver = direct_driver) -> dict[str, Any]:
    """Every step after `prepare_ingest` (the caller holds the store's lock for `run.run_id`); returns the store
    summary. Only references, plans and records cross between the driver and the mapped steps, never pixels."""
    source, store, cfg, limit = run.source, run.store, run.config, run.config.max_image_bytes
    scans = [r for part in mapper("scan", scan_shard, [(source, items, key, limit) for items in run.scan_shards()])
             for r in part]
    digests: dict[int, str | None] = {}
    for part in mapper("duplicates", pixel_digests, [(source, items, limit) for items in duplicate_checks(run, scans)]):
        digests.update(part)
    plan, tags = driver("plan", plan_ingest, run, scans, digests, key)
    layout = driver("plan-samples", plan_samples, run, plan, scans)
    shards = mapper("ingest", ingest_shard, [(source, store, w, key, cfg, run.run_id)
                                             for w in shard_work(run, plan, tags, layout)])
    outcome = collect_archive(shards)
    if layout is None:  # 3D with the target spacing planned from the dataset: samples from the archive
        layout, fingerprint = driver("lay-out-training", lay_out_ingest, run, outcome)
        assembled = mapper("assemble", assemble_range, [(store, layout.for_range(a, b), a, b, cfg.preprocess,
                                                         run.run_id, cfg.store) for a, b in layout.ranges])
    else:
        fingerprint = compute_fingerprint(outcome.records)
        layout, missing = driver("finish-training", finish_training, store, layout, outcome.records, fingerprint,
                                 cfg.preprocess, run.run_id)
        normalized = mapper("normalize", normalize_rows, [(store, layout.for_range(a, b), a, b, run.run_id)
                                                          for a, b in deferred_rows(layout, outcome.records)])
        # in order: the normalising step's digests replace those of the samples it rewrote
        assembled = [s.assembled for s in shards] + [AssembleResult(failures=missing)] + normalized
    return driver("finalize", finish_ingest, run, plan, outcome, layout, fingerprint, key, assembled)


def ingest_in_process(source: str, store: str, config: IngestConfig, key: DeidKey, mapper: Mapper = serial_mapper,
                      driver: Driver = direct_driver) -> dict[str, Any]:
    """The whole ingest of SOURCE into STORE without an orchestrator: `prepare_ingest` + `run_ingest_steps` holding
    the store's lock as the flow does (benchmarks, tests, notebooks); returns the store summary."""
    run_id = new_run_id()
    acquire_lock(store, run_id)
    try:
        run = driver("prepare", prepare_ingest, source, store, config, key, run_id)
        return run_ingest_steps(run, key, mapper, driver)
    finally:
        release_lock(store, run_id)
