"""Finalize: accounting (discovered = ingested + quarantined), reports, content hash, completion attributes."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from medpipe import __version__
from medpipe.deid import DeidAudit
from medpipe.fingerprint import CT_FOREGROUND_HU
from medpipe.ingest.records import ArchiveFailure, ArchiveRecord, ArchiveResult, Collision, QuarantineRecord, Unit
from medpipe.ingest.training import TrainingLayout
from medpipe.ingest.volume_cases import volume_count
from medpipe.store import (ATTRS_KEY, SCHEMA_VERSION, StoreError, attrs_of, content_hash, get_array, get_group,
                           open_store, read_json, read_sample_table, remove_path, store_attrs, write_json)


@dataclass(frozen=True)
class Accounting:
    """Every listed file's fate: the counts and the final quarantine list (one record per quarantined file)."""

    counts: dict[str, int]
    quarantine: list[QuarantineRecord]


def account(discovered: int, units: list[Unit], results: list[ArchiveResult], quarantine: list[QuarantineRecord],
            hash_of: Callable[[int], str]) -> Accounting:
    """Give each of the `discovered` files exactly one fate: ingested or quarantined. Holds by construction.

    A file is ingested when an archived unit holds it (as an image, or as the mask it kept); an ingested file is
    never also quarantined, even when another unit that shares it (a mask named twice, one frame stack of a
    multi-frame file) failed. Each quarantined file keeps the first reason found: the scan/plan reason, then
    the archive reason. A file no step took (a bug) is quarantined as `not_ingested` instead of failing the run
    after all the work is done."""
    unit_by_id = {u.id: u for u in units}
    ingested: set[int] = set()
    fates: dict[int, QuarantineRecord] = {}
    for q in quarantine:
        fates.setdefault(q.index, q)
    late: list[QuarantineRecord] = []
    for result in results:
        unit = unit_by_id[result.id]
        if isinstance(result, ArchiveFailure):
            late.extend(QuarantineRecord(i, h, result.reason, result.detail) for i, h in zip(unit.indices, unit.hashes))
            if unit.mask_index is not None and unit.mask_hash is not None:
                late.append(QuarantineRecord(unit.mask_index, unit.mask_hash, "mask_without_image",
                                             "its image could not be decoded"))
            continue
        ingested.update(result.indices)
        if result.has_mask and result.mask_index is not None:
            ingested.add(result.mask_index)
        elif unit.mask_index is not None and unit.mask_hash is not None:
            late.append(QuarantineRecord(unit.mask_index, unit.mask_hash, result.mask_reason or "mask_shape_mismatch",
                                         "mask not usable for its image"))
    for q in late:
        fates.setdefault(q.index, q)
    for index in ingested:
        fates.pop(index, None)
    for index in range(discovered):
        if index not in ingested and index not in fates:
            fates[index] = QuarantineRecord(index, hash_of(index), "not_ingested",
                                            "no step took this file (a medpipe bug: please report it)")
    counts = {"discovered": discovered, "ingested": len(ingested), "quarantined": len(fates)}
    return Accounting(counts, [fates[i] for i in sorted(fates)])


def accounting_line(counts: dict[str, int]) -> str:
    """The line every run prints and stores."""
    return f"discovered {counts['discovered']} = ingested {counts['ingested']} + quarantined {counts['quarantined']}"


def unit_report(records: list[ArchiveRecord]) -> list[dict[str, Any]]:
    """reports/units.json: each archive image with how it was assembled (no PHI: pseudonyms and facts only)."""
    return [{"unit": r.id, "kind": str(r.kind), "series": r.series, "acquisition": r.acquisition,
             "modality": r.modality, "shape": list(r.shape), "spacing": list(r.spacing), "files": r.files,
             "patient_source": str(r.patient_source), "notes": list(r.notes)}
            for r in sorted(records, key=lambda r: r.id)]


def assembly_summary(records: list[ArchiveRecord], collisions: list[Collision]) -> dict[str, Any]:
    """How series were assembled and patients identified: the counts `medpipe info` shows."""
    notes = Counter(n.split(":")[0].split(" (")[0] for r in records for n in r.notes)
    return {
        "series_split": len({r.series for r in records if r.acquisition}),  # series split by assembly rules
        "acquisitions": dict(sorted(Counter(r.acquisition.split("-")[0].rstrip("0123456789")
                                            for r in records if r.acquisition).items())),
        "volumes": sum(1 for r in records if r.is_volume),
        "images_2d": sum(1 for r in records if not r.is_volume),
        "notes": dict(sorted(notes.items())),
        "uid_collisions": len(collisions),
        "patient_sources": dict(sorted(Counter(str(r.patient_source) for r in records).items())),
    }


def content_extras(records: list[ArchiveRecord], quarantine_public: list[dict[str, str]],
                   classes: list[str]) -> list[str]:
    """What the content hash covers besides the training arrays and the sample table."""
    extra = [f"{r.id}:{r.checksum}:{json.dumps(r.dicom, sort_keys=True)}:{r.acquisition}:{list(r.notes)}"
             for r in sorted(records, key=lambda r: r.id)]
    return extra + [f"q:{q['source_hash']}:{q['reason']}" for q in quarantine_public] + [f"classes:{classes}"]


def finite_json(value: Any) -> Any:
    """`value` with every NaN/inf float replaced by None: zarr.json and reports must be strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def exclude_failed_samples(store_url: str, failures: list[dict[str, Any]],
                           table: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
    """Samples whose preprocessing failed: split -1 in the sample table, so no loader ever reads them. `table`: the
    table as written (its split column is used instead of reading it back); returns it as it now is (None without)."""
    if not failures:
        return None if table is None else dict(table)
    root = open_store(store_url, mode="a")
    split = get_array(root, "samples/split")
    values = np.array(table["split"]) if table is not None else np.asarray(split[...])
    for failure in failures:
        values[int(failure["index"])] = -1
    split[...] = values
    return None if table is None else {**table, "split": values}


def verify_store(store_url: str) -> list[str]:
    """Why a store marked complete cannot be trusted as it is (empty when consistent): counts, array shapes, the
    sample table, the quarantine report, the archive, and the content hash recomputed from the data."""
    try:
        root = open_store(store_url)
        attrs = store_attrs(root)
        problems: list[str] = []
        counts = attrs.get("counts", {})
        n = int(attrs.get("samples", -1))
        if counts.get("discovered") != counts.get("ingested", 0) + counts.get("quarantined", 0):
            problems.append("its accounting does not add up")
        if counts.get("discovered") and not counts.get("ingested"):
            problems.append("every file was quarantined")
        names = ("labels",) if attrs.get("layout") == "volumes" else ("images", "labels")
        for name in names:
            if "training" not in root or name not in get_group(root, "training") \
                    or get_array(root, f"training/{name}").shape[0] != n:
                problems.append(f"training/{name} does not hold {n} samples")
        if attrs.get("layout") == "volumes" and volume_count(root) != n - int(attrs.get("assemble_failures", 0)):
            problems.append(f"training/volumes does not hold the {n} cases")
        table = read_sample_table(root)
        if any(len(v) != n for v in table.values()):
            problems.append("the sample table does not match the training arrays")
        quarantine = read_json(store_url, "reports/quarantine.json")
        if quarantine is None or len(quarantine) != counts.get("quarantined"):
            problems.append("reports/quarantine.json does not match the counts")
        archive = get_group(root, "archive") if "archive" in root else None
        records = [ArchiveRecord.from_attrs(attrs_of(get_group(archive, k))) for k in sorted(archive.group_keys())
                   ] if archive is not None else []
        if len(records) != attrs.get("archive_images"):
            problems.append("the archive does not hold the images the store lists")
        if not problems and content_hash(root, content_extras(records, quarantine or [], attrs.get("classes", []))
                                         ) != attrs.get("content_hash"):
            problems.append("its content no longer matches its content hash")
        return problems
    except (StoreError, KeyError, TypeError, ValueError) as exc:
        return [f"it cannot be read as a medpipe store ({type(exc).__name__})"]


def finalize_store(store_url: str, *, records: list[ArchiveRecord], accounting: Accounting,
                   collisions: list[Collision], layout: TrainingLayout, manifest_issues: list[dict[str, Any]],
                   fingerprint: dict[str, Any], config: dict[str, Any], classes: list[str], run_fingerprint: str,
                   key_check: dict[str, Any], links: list[dict[str, str]],
                   assemble_failures: list[dict[str, Any]], mask_checks: list[dict[str, Any]],
                   digests: dict[str, str] | None = None) -> dict[str, Any]:
    """Write reports and root attributes; drop archive units not in this run; returns the summary. `digests`: the
    stored samples' digests the writing tasks reported (the content hash then reads no sample back)."""
    table = exclude_failed_samples(store_url, assemble_failures, layout.table)
    excluded = layout.excluded + [{"unit": f["unit"], "reason": f["reason"]} for f in assemble_failures
                                  if not f.get("quarantined")]
    root = open_store(store_url, mode="a")
    keep = {r.id for r in records}
    if "archive" in root:
        for stale in sorted(set(get_group(root, "archive").group_keys()) - keep):
            remove_path(store_url, f"archive/{stale}")
    audit = DeidAudit()
    for r in records:
        audit.merge(DeidAudit.from_compact(list(r.audit)))
    quarantine_public = sorted((q.to_public() for q in accounting.quarantine),
                               key=lambda q: (q["source_hash"], q["reason"]))
    reasons = dict(sorted(Counter(q["reason"] for q in quarantine_public).items()))
    counts = {**accounting.counts, "training_samples": len(layout.unit_ids) - len(assemble_failures),
              "excluded_from_training": len(excluded)}
    write_json(store_url, "reports/quarantine.json", quarantine_public)
    write_json(store_url, "reports/excluded.json", excluded)
    write_json(store_url, "reports/links.json", links)
    write_json(store_url, "reports/mask_check.json", mask_checks)
    write_json(store_url, "reports/manifest_issues.json", manifest_issues)
    write_json(store_url, "reports/deid_audit.json", audit.to_dict())
    fingerprint = finite_json(fingerprint)
    write_json(store_url, "reports/fingerprint.json", fingerprint)
    write_json(store_url, "reports/units.json", unit_report(records))
    write_json(store_url, "reports/collisions.json", [c.to_dict() for c in collisions])
    summary = {
        "schema_version": SCHEMA_VERSION,
        "code_version": __version__,
        "config": config,
        "fingerprint": fingerprint,
        "classes": classes,
        "kind": config["preprocess"]["kind"],
        "layout": layout.layout,
        "plan": layout.plan,
        "normalization": layout.normalization if layout.layout == "volumes" else None,
        # raw CT training volumes hold every HU below this as this value (medpipe.preprocess.floor_below_ct_foreground)
        "ct_raw_floor_hu": CT_FOREGROUND_HU if layout.layout == "volumes" and "CT" in layout.deferred else None,
        "assemble_failures": len(assemble_failures),
        "sample_shape": list(layout.sample_shape),
        "training_spacing": list(layout.target_spacing) if layout.target_spacing is not None else None,
        "samples": len(layout.unit_ids),
        "splits": layout.splits,
        "split_patients": layout.split_patients,
        "warnings": layout.warnings,
        "counts": counts,
        "accounting": accounting_line(counts),
        "quarantine_reasons": reasons,
        "assembly": assembly_summary(records, collisions),
        "excluded": len(excluded),
        "links_skipped": len(links),
        "masks_checked": len(mask_checks),
        "masks_flagged": sum(1 for c in mask_checks if c["flagged"]),
        "manifest_issues": len(manifest_issues),
        "archive_images": len(records),
        "run_fingerprint": run_fingerprint,
        "key_check": key_check,
        "content_hash": content_hash(root, content_extras(records, quarantine_public, classes), digests, table),
        "completed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
    }
    summary = finite_json(summary)
    root.attrs[ATTRS_KEY] = summary
    return summary
