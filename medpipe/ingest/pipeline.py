"""The driver-side steps of an ingest run, between the mapped (parallel) steps.

    prepare_ingest -> scan_shard (mapped) -> duplicate_checks -> pixel_digests (mapped, only for shared UIDs)
    -> plan_ingest -> archive_shard (mapped) -> lay_out_ingest -> assemble_range (mapped) -> finish_ingest
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from medpipe import __version__
from medpipe.config import IngestConfig
from medpipe.deid import DEID_RULES_VERSION, DeidKey, Pseudonymizer
from medpipe.fingerprint import compute_fingerprint
from medpipe.ingest.archive import READER_RULES_VERSION, run_tag, unit_input_tag
from medpipe.ingest.discover import SourceListing, discover_files, make_shards, source_fs
from medpipe.ingest.finalize import account, finalize_store
from medpipe.ingest.records import ArchiveFailure, ArchiveRecord, ArchiveResult, ScanRecord, Unit
from medpipe.ingest.training import TrainingLayout, layout_training
from medpipe.ingest.units import UnitPlan, plan_units, sop_groups
from medpipe.manifest import Manifest, check_references, load_manifest
from medpipe.store import ATTRS_KEY, StoreError, open_store, store_attrs


class KeyMismatchError(StoreError):
    """The store was built with another de-identification key."""


@dataclass
class IngestRun:
    """What the steps of one run share: where from, where to, the listing and the manifest."""

    source: str
    store: str
    config: IngestConfig
    listing: SourceListing
    manifest: Manifest
    run_fingerprint: str
    key_fingerprint: str
    previous: dict[str, Any] | None = None

    @property
    def up_to_date(self) -> bool:
        """The store already holds a completed run of exactly these inputs: nothing to do."""
        return bool(self.previous and self.previous.get("complete")
                    and self.previous.get("run_fingerprint") == self.run_fingerprint)

    def scan_shards(self) -> list[list[tuple[int, str]]]:
        return make_shards(list(enumerate(self.listing.paths)), self.config.files_per_shard)


@dataclass
class ArchiveOutcome:
    """Archive results: the archived units' records, and every result (failures included) for the accounting."""

    records: list[ArchiveRecord] = field(default_factory=list)
    results: list[ArchiveResult] = field(default_factory=list)


def check_ingest_inputs(source: str, store: str, config: IngestConfig, key: DeidKey) -> None:
    """Fail fast, before any flow starts: missing source, unusable manifest, a store made with another key."""
    fs, root = source_fs(source)
    if not fs.exists(root) or not fs.isdir(root):
        raise FileNotFoundError(f"source folder not found: {source}")
    load_manifest(fs, root, config.manifest, config.classes, Pseudonymizer(key).path)
    _check_key(store, key)


def _check_key(store: str, key: DeidKey) -> dict[str, Any] | None:
    """The store's previous attributes (None for a new store); raises if it was made with another key."""
    try:
        previous = store_attrs(store) or None
    except StoreError:
        previous = None
    if previous and previous.get("key_fingerprint") not in (None, key.fingerprint):
        raise KeyMismatchError(
            f"{store} was de-identified with another key; pseudonyms would not match. Use a new store path "
            "or the original key.")
    return previous


def prepare_ingest(source: str, store: str, config: IngestConfig, key: DeidKey) -> IngestRun:
    """Discover files, load the manifest, check the store's key, and mark a store being (re)built incomplete."""
    fs, root = source_fs(source)
    pseudonyms = Pseudonymizer(key)
    manifest, manifest_path = load_manifest(fs, root, config.manifest, config.classes, pseudonyms.path)
    exclude = [manifest_path[len(root):].lstrip("/")] if manifest_path and manifest_path.startswith(root) else []
    for sibling in ("labels.csv", "labels_multiclass.csv"):  # demo manifests beside the images are not images
        if fs.exists(f"{root}/{sibling}"):
            exclude.append(sibling)
    listing = discover_files(source, exclude=exclude)
    check_references(manifest, set(listing.paths), pseudonyms.path)
    manifest_digest = hashlib.sha256(fs.cat_file(manifest_path) if manifest_path else b"").hexdigest()
    run_fingerprint = hashlib.sha256(json.dumps(
        [listing.fingerprint(), manifest_digest, config.lineage_dict(), key.fingerprint, DEID_RULES_VERSION,
         READER_RULES_VERSION, __version__], sort_keys=True,
    ).encode()).hexdigest()
    previous = _check_key(store, key)
    run = IngestRun(source, store, config, listing, manifest, run_fingerprint, key.fingerprint, previous)
    if not run.up_to_date:
        root_group = open_store(store, mode="a")
        root_group.attrs[ATTRS_KEY] = {**(previous or {}), "complete": False, "key_fingerprint": key.fingerprint}
    return run


def duplicate_checks(run: IngestRun, scan_records: list[ScanRecord]) -> list[list[tuple[int, str]]]:
    """Shards of `(index, relative path)` of files that share a SOPInstanceUID: their pixels must be compared."""
    items = [(i, run.listing.paths[i]) for group in sop_groups(scan_records) for i in group]
    return make_shards(items, run.config.files_per_shard)


def plan_ingest(run: IngestRun, scan_records: list[ScanRecord], digests: dict[int, str | None],
                key: DeidKey) -> tuple[UnitPlan, dict[str, str]]:
    """Units to archive (with per-unit input tags for skip-on-rerun) and the pre-decode quarantine."""
    plan = plan_units(scan_records, run.listing.paths, run.manifest, Pseudonymizer(key), digests,
                      run.config.patient_folder_depth)
    tag = run_tag(run.config.store, run.key_fingerprint)
    tags = {u.id: unit_input_tag(u, run.listing.sizes, run.listing.stamps, tag) for u in plan.units}
    return plan, tags


def unit_shards(run: IngestRun, plan: UnitPlan) -> list[list[Unit]]:
    """Shards of units holding about `files_per_shard` files each (a CT series counts all its slices)."""
    shards: list[list[Unit]] = []
    current: list[Unit] = []
    files = 0
    for unit in plan.units:
        current.append(unit)
        files += len(unit.indices)
        if files >= run.config.files_per_shard:
            shards.append(current)
            current, files = [], 0
    if current:
        shards.append(current)
    return shards


def collect_archive(shard_results: list[list[ArchiveResult]]) -> ArchiveOutcome:
    """Flatten the mapped archive results; archived records apart (failures are settled by the accounting)."""
    results = [r for shard in shard_results for r in shard]
    return ArchiveOutcome(records=[r for r in results if not isinstance(r, ArchiveFailure)], results=results)


def lay_out_ingest(run: IngestRun, outcome: ArchiveOutcome) -> tuple[TrainingLayout, dict[str, Any]]:
    """Fingerprint the archived images, then create the training arrays and the per-sample table."""
    fingerprint = compute_fingerprint(outcome.records)
    layout = layout_training(run.store, outcome.records, run.manifest.classes, run.config, fingerprint)
    return layout, fingerprint


def finish_ingest(run: IngestRun, plan: UnitPlan, outcome: ArchiveOutcome, layout: TrainingLayout,
                  fingerprint: dict[str, Any], key: DeidKey) -> dict[str, Any]:
    """Account for every file, write reports and the content hash, mark the store complete."""
    pseudonyms = Pseudonymizer(key)
    accounting = account(len(run.listing.paths), plan.units, outcome.results, plan.quarantine,
                         lambda i: pseudonyms.path(run.listing.paths[i]))
    return finalize_store(
        run.store, records=outcome.records, accounting=accounting, collisions=plan.collisions, layout=layout,
        manifest_issues=run.manifest.issues, fingerprint=fingerprint, config=run.config.lineage_dict(),
        classes=run.manifest.classes, run_fingerprint=run.run_fingerprint, key_fingerprint=run.key_fingerprint,
    )
