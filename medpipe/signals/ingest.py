"""A signal ingest run: the driver-side steps around the mapped (parallel) ones.

    prepare_signal_ingest -> read_record_shard (mapped: read, check, de-identify, resample, cut windows into
    staging) -> plan_signal_store (lead set, units, row order, splits) -> assemble_signal_shard (mapped: whole
    shards of the `signals` array) -> finish_signal_ingest (table, reports, content hash; staging removed)

`run_signal_ingest_steps` runs the sequence with a `mapper` for the parallel steps and a `driver` for the others
(the Prefect flow maps task runs on its Dask task runner; tests and benchmarks run them serially or on bare
Dask), exactly as `medpipe.ingest.pipeline.run_ingest_steps` does for images. What crosses between steps is
pseudonyms, keyed hashes, counts and store-relative paths: never a source path or a header value.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from medpipe import __version__
from medpipe.codecs import WRITE_CONFIG, for_writing
from medpipe.deid import DeidAudit, DeidKey, Pseudonymizer, key_check_record
from medpipe.errors import write_traceback
from medpipe.ingest.discover import discover_files, is_local_fs, make_shards, source_fs
from medpipe.ingest.limits import prepare_worker
from medpipe.ingest.lock import check_lock
from medpipe.ingest.pipeline import TASKS_PER_WORKER, Driver, Mapper, check_source_and_store, check_store_key
from medpipe.manifest import Manifest, check_references, load_manifest
from medpipe.signals.config import SignalIngestConfig
from medpipe.signals.leads import canonical_lead
from medpipe.signals.quality import fill_short_gaps, signal_problem
from medpipe.signals.readers import is_signal_file, read_signal, wfdb_segment_names
from medpipe.signals.records import SignalReadError, SignalRecord
from medpipe.signals.signal_deid import DeidentifiedSignal, deidentify_record
from medpipe.signals.store import (SIGNALS, SIGNALS_KIND, SignalStoreError, create_signal_array, finish_signal_store,
                                   window_digests, windows_per_shard, write_window_table)
from medpipe.signals.windows import cut_windows, resample_signals, to_millivolts, window_starts
from medpipe.splits import patient_labels, split_patients, split_warnings
from medpipe.store import ATTRS_KEY, attrs_of, get_array, open_store, remove_path, write_json

STAGING = "work/signal-staging"
T = TypeVar("T")


@dataclass
class SignalRun:
    """What the steps of one run share: where from, where to, the record files (with their companions)."""

    source: str
    store: str
    config: SignalIngestConfig
    records: list[str]                   # relative paths of record files (.hea, .edf, .dcm, .csv, ...)
    companions: dict[str, list[str]]     # record path -> the other files it needs (.dat, .atr, ...)
    manifest: Manifest
    skipped: int                         # files in SOURCE that are not signal records nor their companions
    run_fingerprint: str
    run_id: str
    previous: dict[str, Any] | None = None

    @property
    def up_to_date(self) -> bool:
        """The store holds a completed run of exactly these inputs: nothing to do."""
        return bool(self.previous and self.previous.get("complete")
                    and self.previous.get("run_fingerprint") == self.run_fingerprint)

    def shards(self) -> list[list[str]]:
        """Record paths per read task: `files_per_shard` at least, about TASKS_PER_WORKER tasks per worker."""
        per_task = max(self.config.files_per_shard, -(-len(self.records) // (TASKS_PER_WORKER * self.config.workers)))
        return make_shards(self.records, per_task)


@dataclass(frozen=True)
class RecordWindows:
    """One readable record after de-identification, resampling and windowing (its windows are in staging)."""

    record: str                  # keyed hash of the record's path
    patient: str                 # pseudonym
    label: int                   # class index, -1 unlabelled
    leads: tuple[str, ...]
    units: tuple[str, ...]
    starts: tuple[int, ...]      # window starts, samples at the store's rate
    staging: str                 # store-relative path of its (W, leads, T) staging array
    format: str
    seconds: float               # record length


@dataclass
class ShardOutcome:
    """What a read task returns: its records, the quarantined ones (hash, reason, detail) and the de-id audit."""

    records: list[RecordWindows] = field(default_factory=list)
    quarantined: list[dict[str, str]] = field(default_factory=list)
    audit: DeidAudit = field(default_factory=DeidAudit)


@dataclass(frozen=True)
class StorePlan:
    """The store's rows: lead set, units, the kept records in row order, and each assembly task's rows."""

    leads: tuple[str, ...]
    units: tuple[str, ...]
    records: tuple[RecordWindows, ...]
    offsets: tuple[int, ...]     # first row of each record
    n: int
    per_shard: int
    tasks: tuple[tuple[int, int], ...]  # (start, stop) rows of each assembly task: whole shards
    quarantined: tuple[dict[str, str], ...]


# ------------------------------------------------------------------------------------------------ prepare

def record_files(paths: Sequence[str]) -> tuple[list[str], dict[str, list[str]], int]:
    """Split a listing into record files (`is_signal_file`), each record's companions (files of the same folder
    and stem: a WFDB record's .dat and annotations) and the count of other files (skipped)."""
    records = sorted(p for p in paths if is_signal_file(p))
    stems = {_stem(p): p for p in records}
    companions: dict[str, list[str]] = {p: [] for p in records}
    skipped = 0
    for path in paths:
        if path in companions:
            continue
        owner = stems.get(_stem(path))
        if owner is not None:
            companions[owner].append(path)
        else:
            skipped += 1
    return records, companions, skipped


def group_wfdb_segments(records: Sequence[str], companions: dict[str, list[str]],
                        read_text: Callable[[str], str]) -> tuple[list[str], dict[str, list[str]]]:
    """A multi-segment WFDB record (MIMIC's waveform records: a master header listing `<name>_0001`, ..., often
    a `<name>_layout` segment) is one record, read joined by the WFDB reader: the headers and data of the segments
    its master lists become the master's companions instead of records of their own, which would put every sample
    in the store twice. Only headers that share their folder with another header named `<stem>_...` are read
    (`read_text`, by relative path)."""
    headers = [r for r in records if r.lower().endswith(".hea")]
    stems: dict[str, list[str]] = defaultdict(list)
    for header in headers:
        folder, _, name = header.rpartition("/")
        stems[folder].append(name[: -len(".hea")])
    grouped = {r: list(c) for r, c in companions.items()}
    for master in headers:
        folder, _, name = master.rpartition("/")
        stem = name[: -len(".hea")]
        if master not in grouped or not any(other.startswith(f"{stem}_") for other in stems[folder]):
            continue
        segments = wfdb_segment_names(read_text(master))
        for segment in segments or ():
            header = f"{folder}/{segment}.hea" if folder else f"{segment}.hea"
            if header != master and header in grouped:
                grouped[master] += [header, *grouped.pop(header)]
    return [r for r in records if r in grouped], grouped


def _stem(path: str) -> str:
    p = PurePosixPath(path)
    return str(p.with_name(p.name.split(".", 1)[0]))


def check_signal_inputs(source: str, store: str, config: SignalIngestConfig, key: DeidKey) -> None:
    """Fail fast, before any flow starts: missing source, unusable manifest, a store made with another key or
    holding images."""
    previous = check_source_and_store(source, store, config.manifest, config.classes, key)
    if previous and previous.get("kind") not in (None, SIGNALS_KIND):
        raise SignalStoreError(f"{store} holds an image store; ingest signals into another store path")


def prepare_signal_ingest(source: str, store: str, config: SignalIngestConfig, key: DeidKey,
                          run_id: str) -> SignalRun:
    """Discover record files, load the manifest, check the key; mark a store being rebuilt incomplete (the caller
    holds the store's lock for `run_id`)."""
    fs, root = source_fs(source)
    pseudonyms = Pseudonymizer(key)
    manifest, manifest_path = load_manifest(fs, root, config.manifest, config.classes, pseudonyms.path)
    exclude = [manifest_path[len(root):].lstrip("/")] if manifest_path and manifest_path.startswith(root) else []
    listing = discover_files(source, exclude=exclude, store=store)
    check_references(manifest, set(listing.paths), pseudonyms.path)
    records, companions, skipped = record_files(listing.paths)
    records, companions = group_wfdb_segments(records, companions,
                                              lambda rel: fs.cat_file(f"{root}/{rel}").decode("latin-1"))
    if config.manifest_only:
        listed = [r for r in records if r in manifest.rows]
        skipped += sum(1 + len(companions[r]) for r in records if r not in manifest.rows)
        records, companions = listed, {r: companions[r] for r in listed}
    manifest_digest = hashlib.sha256(fs.cat_file(manifest_path) if manifest_path else b"").hexdigest()
    fingerprint = hashlib.sha256(json.dumps(
        [listing.fingerprint(), manifest_digest, config.lineage_dict(), key.identity, __version__],
        sort_keys=True).encode()).hexdigest()
    previous = check_store_key(store, key)
    run = SignalRun(source, store, config, records, companions, manifest, skipped, fingerprint, run_id, previous)
    if not run.up_to_date:
        check_lock(store, run_id)
        group = open_store(store, mode="a")
        check = previous.get("key_check") if previous else None
        group.attrs[ATTRS_KEY] = {"kind": SIGNALS_KIND, "complete": False, "key_check": check or key_check_record(key)}
    return run


# ------------------------------------------------------------------------------------------------ read (mapped)

@contextmanager
def local_copy(source: str, relative: str, companions: Sequence[str]) -> Iterator[str]:
    """A local path of `relative` with its companions beside it: the file itself on a local disk, else a copy in
    a temporary folder (readers such as wfdb open a record's other files by name)."""
    fs, root = source_fs(source)
    if is_local_fs(fs):
        yield f"{root}/{relative}"
        return
    folder = Path(tempfile.mkdtemp(prefix="medpipe-signal-"))
    try:
        for path in (relative, *companions):
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{path}", str(folder / path))
        yield str(folder / relative)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def patient_identifier(record_patient: str | None, manifest_patient: str | None, relative: str,
                       depth: int) -> str:
    """Who a record belongs to: the manifest's patient_id, else the header's, else the first `depth` folders of
    its path, else the path itself (a record of its own)."""
    if manifest_patient:
        return manifest_patient
    if record_patient:
        return record_patient
    parts = PurePosixPath(relative).parts[:-1]
    if depth > 0 and len(parts) >= depth:
        return "/".join(parts[:depth])
    return relative


def windows_of(raw: SignalRecord, pseudonyms: Pseudonymizer, patient_id: str, config: SignalIngestConfig
               ) -> tuple[np.ndarray, np.ndarray, DeidentifiedSignal, tuple[str, ...]] | tuple[str, str]:
    """A record's windows (W, leads, T) at the store's rate in mV, their starts, its de-identified form and units;
    or (reason, detail) when it is to be quarantined (quality checks, a rate no resampler takes, no whole window).
    Pure: no I/O."""
    problem = signal_problem(raw.signals, raw.fs, min_seconds=config.min_record_seconds,
                             max_nan_seconds=config.max_nan_seconds, flat_seconds=config.flat_seconds)
    if problem is not None:
        return problem
    deid = deidentify_record(raw, pseudonyms, patient_id)
    try:
        signals, units = to_millivolts(fill_short_gaps(deid.signals), deid.units)
        signals = resample_signals(signals, deid.fs, config.rate_hz)
    except ValueError as exc:  # a rate no resampler takes (the message names rates only)
        return "unusable_signal", str(exc)
    starts = window_starts(signals.shape[1], config.window_samples, config.stride_samples, config.last_partial)
    if len(starts) == 0:
        return "too_short", f"no whole {config.window_s:g} s window"
    return cut_windows(signals, starts, config.window_samples), starts, deid, tuple(units)


def read_record_shard(run: SignalRun, key: DeidKey, shard_index: int, paths: Sequence[str]) -> ShardOutcome:
    """Read, check, de-identify, convert to mV, resample and window every record of a shard; each record's
    windows go to a staging array in the store. Bad records are quarantined, never raised."""
    prepare_worker()  # in a Dask worker: codec threads and freed memory as for the image ingest
    check_lock(run.store, run.run_id)
    config = run.config
    pseudonyms = Pseudonymizer(key)
    root = open_store(run.store, mode="a")
    outcome = ShardOutcome()
    for i, relative in enumerate(paths):
        path_hash = pseudonyms.path(relative)
        try:
            with local_copy(run.source, relative, run.companions.get(relative, [])) as local:
                raw = read_signal(local, table_rate_hz=config.table_rate_hz)
        except SignalReadError as exc:
            outcome.quarantined.append({"source_hash": path_hash, "reason": exc.reason, "detail": exc.detail})
            continue
        row = run.manifest.rows.get(relative)
        patient_id = patient_identifier(raw.patient_id, row.patient_id if row else None, relative,
                                        config.patient_folder_depth)
        try:
            made = windows_of(raw, pseudonyms, patient_id, config)
        except Exception as exc:  # noqa: BLE001 - a record medpipe cannot process is quarantined, not the run
            # only the exception's type leaves the worker (its message could quote a header value); the traceback
            # goes to a local file readable by the user only
            write_traceback(exc)
            made = ("processing_error", f"{type(exc).__name__} while processing the record (traceback in the "
                                        "worker's medpipe error folder)")
        if isinstance(made[0], str):
            outcome.quarantined.append({"source_hash": path_hash, "reason": made[0], "detail": str(made[1])})
            continue
        windows, starts, deid, units = made
        outcome.audit.merge(deid.audit)
        staging = f"{STAGING}/{shard_index}/{i}"
        root.create_array(staging, shape=windows.shape, dtype="float32", chunks=windows.shape, overwrite=True,
                          config=WRITE_CONFIG)[...] = \
            windows
        label = run.manifest.class_index(row.label if row else None)
        outcome.records.append(RecordWindows(
            record=path_hash, patient=deid.patient, label=label, leads=tuple(canonical_lead(n) for n in deid.leads),
            units=tuple(units), starts=tuple(int(s) for s in starts), staging=staging, format=deid.format,
            seconds=raw.signals.shape[1] / raw.fs))
    return outcome


# ------------------------------------------------------------------------------------------------ plan (driver)

def _lead_key(name: str) -> str:
    return canonical_lead(name).casefold()


def _first_by_lead(leads: Sequence[str], values: Iterable[T]) -> dict[str, T]:
    """{lead key: value} of a record's leads; a lead named twice keeps its first channel."""
    out: dict[str, T] = {}
    for name, value in zip(leads, values):
        out.setdefault(_lead_key(name), value)
    return out


def plan_signal_store(run: SignalRun, outcomes: Sequence[ShardOutcome]) -> StorePlan:
    """Lead set (configured, else the one most records share), units (one per lead: records in other units are
    quarantined), rows ordered by record hash (any sharding gives the same store), assembly tasks of whole
    shards of the `signals` array."""
    records = sorted((r for o in outcomes for r in o.records), key=lambda r: r.record)
    quarantined = [q for o in outcomes for q in o.quarantined]
    if run.config.leads:
        wanted = tuple(canonical_lead(n) for n in run.config.leads)
    else:
        sets = Counter(tuple(r.leads) for r in records)
        wanted = min(sets, key=lambda s: (-sets[s], s)) if sets else ()
    kept: list[RecordWindows] = []
    unit_votes: dict[str, Counter] = {_lead_key(n): Counter() for n in wanted}
    for record in records:
        have = _first_by_lead(record.leads, record.units)
        missing = [n for n in wanted if _lead_key(n) not in have]
        if missing:
            quarantined.append({"source_hash": record.record, "reason": "missing_leads",
                                "detail": f"lacks {len(missing)} of the store's {len(wanted)} leads"})
            continue
        for n in wanted:
            unit_votes[_lead_key(n)][have[_lead_key(n)]] += 1
        kept.append(record)
    units = tuple(unit_votes[_lead_key(n)].most_common(1)[0][0] if unit_votes[_lead_key(n)] else "" for n in wanted)
    final: list[RecordWindows] = []
    for record in kept:
        have = _first_by_lead(record.leads, record.units)
        if any(have[_lead_key(n)] != u for n, u in zip(wanted, units)):
            quarantined.append({"source_hash": record.record, "reason": "unit_mismatch",
                                "detail": "a lead's unit differs from the store's (not a voltage medpipe converts)"})
            continue
        final.append(record)
    per_shard = windows_per_shard(max(len(wanted), 1), run.config.window_samples, run.config.store)
    offsets: list[int] = []
    rows = 0
    for record in final:
        offsets.append(rows)
        rows += len(record.starts)
    shards = -(-rows // per_shard)
    per_task = max(1, -(-shards // (TASKS_PER_WORKER * run.config.workers)))
    tasks = tuple((s * per_shard, min(rows, (s + per_task) * per_shard)) for s in range(0, shards, per_task))
    return StorePlan(wanted, units, tuple(final), tuple(offsets), rows, per_shard, tasks, tuple(quarantined))


# ------------------------------------------------------------------------------------------------ assemble (mapped)

def assemble_signal_shard(run: SignalRun, plan: StorePlan, start: int, stop: int) -> dict[str, str]:
    """Write rows [start, stop) of `signals` (whole shards) from the staging arrays, leads in the store's order;
    returns the digests of the windows written."""
    prepare_worker()
    check_lock(run.store, run.run_id)
    root = open_store(run.store, mode="a")
    block = np.zeros((stop - start, len(plan.leads), run.config.window_samples), np.float32)
    for record, offset in zip(plan.records, plan.offsets):
        first, last = max(offset, start), min(offset + len(record.starts), stop)
        if first >= last:
            continue
        position = _first_by_lead(record.leads, range(len(record.leads)))
        order = [position[_lead_key(n)] for n in plan.leads]
        windows = np.asarray(get_array(root, record.staging)[first - offset : last - offset])
        block[first - start : last - start] = windows[:, order]
    for_writing(get_array(root, SIGNALS))[start:stop] = block
    return window_digests(start, block)


# ------------------------------------------------------------------------------------------------ finish (driver)

def finish_signal_ingest(run: SignalRun, plan: StorePlan, outcomes: Sequence[ShardOutcome],
                         digests: dict[str, str]) -> dict[str, Any]:
    """Window table, splits, reports and the store's attributes (content hash from the reported digests); removes
    staging. Returns the run summary (counts, warnings, store facts: no PHI)."""
    config = run.config
    root = open_store(run.store, mode="a")
    patients = sorted({r.patient for r in plan.records})
    split_codes = split_patients(patients, config.split)
    columns: dict[str, list[Any]] = {"patient": [], "record": [], "window": [], "start_s": [], "label": [],
                                     "split": []}
    for record in plan.records:
        for w, start in enumerate(record.starts):
            columns["patient"].append(record.patient)
            columns["record"].append(record.record)
            columns["window"].append(w)
            columns["start_s"].append(start / config.rate_hz)
            columns["label"].append(record.label)
            columns["split"].append(split_codes[record.patient])
    write_window_table(root, {k: np.asarray(v, dtype=object if k in ("patient", "record") else None)
                              for k, v in columns.items()})
    strata = patient_labels([r.patient for r in plan.records], [r.label for r in plan.records])
    warnings = split_warnings(split_codes, strata, config.split, run.manifest.classes)
    reasons = Counter(q["reason"] for q in plan.quarantined)
    counts = {"discovered": len(run.records), "ingested": len(plan.records), "quarantined": len(plan.quarantined),
              "windows": plan.n, "patients": len(patients), "skipped_files": run.skipped}
    audit = DeidAudit()
    for outcome in outcomes:
        audit.merge(outcome.audit)
    write_json(run.store, "reports/quarantine.json", sorted(plan.quarantined, key=lambda q: q["source_hash"]))
    write_json(run.store, "reports/accounting.json", {"counts": counts, "quarantine_reasons": dict(reasons),
                                                       "formats": dict(Counter(r.format for r in plan.records))})
    write_json(run.store, "reports/deid.json", audit.to_dict())
    remove_path(run.store, STAGING)
    attrs = {"key_check": attrs_of(open_store(run.store)).get("key_check"), "rate_hz": config.rate_hz, "leads": list(plan.leads),
             "units": list(plan.units), "window": config.window_samples, "stride": config.stride_samples,
             "classes": list(run.manifest.classes), "counts": counts, "config": config.lineage_dict(),
             "run_fingerprint": run.run_fingerprint, "code_version": __version__,
             "split_counts": {name: int(sum(1 for c in columns["split"] if c == code))
                              for name, code in (("train", 0), ("val", 1), ("test", 2))}}
    final = finish_signal_store(root, attrs, digests)
    return {"store": run.store, "counts": counts, "quarantine_reasons": dict(reasons), "warnings": warnings,
            "leads": list(plan.leads), "units": list(plan.units), "rate_hz": config.rate_hz,
            "window": config.window_samples, "stride": config.stride_samples, "classes": list(run.manifest.classes),
            "split_counts": attrs["split_counts"], "content_hash": final["content_hash"]}


def resize_signals(run: SignalRun, plan: StorePlan) -> None:
    """Create the `signals` array with its final shape (rows, the plan's leads, window): shards of
    `plan.per_shard` windows."""
    root = open_store(run.store, mode="a")
    per_shard = create_signal_array(root, plan.n, max(len(plan.leads), 1), run.config.window_samples,
                                    run.config.store)
    if per_shard != plan.per_shard:  # both come from windows_per_shard: a bug if they differ
        raise RuntimeError(f"signals array shards of {per_shard} windows, planned {plan.per_shard}")


def run_signal_ingest_steps(run: SignalRun, key: DeidKey, mapper: Mapper, driver: Driver) -> dict[str, Any]:
    """read shards (mapped) -> plan -> create the array -> assemble whole shards (mapped) -> finish."""
    outcomes: list[ShardOutcome] = mapper("read", read_record_shard,
                                          [(run, key, i, paths) for i, paths in enumerate(run.shards())])
    plan: StorePlan = driver("plan", plan_signal_store, run, outcomes)
    driver("create", resize_signals, run, plan)
    digests: dict[str, str] = {}
    for part in mapper("assemble", assemble_signal_shard, [(run, plan, a, b) for a, b in plan.tasks]):
        digests.update(part)
    return driver("finish", finish_signal_ingest, run, plan, outcomes, digests)
