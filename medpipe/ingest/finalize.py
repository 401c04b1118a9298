"""Finalize: accounting (discovered = ingested + quarantined), reports, content hash, completion attributes."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from medpipe import __version__
from medpipe.deid import DeidAudit
from medpipe.store import ATTRS_KEY, SCHEMA_VERSION, content_hash, open_store, remove_path, write_json


class AccountingError(RuntimeError):
    """Some discovered file is neither ingested nor quarantined (a bug: never silently lose a file)."""


def account(discovered: int, records: list[dict[str, Any]], quarantine: list[dict[str, Any]]) -> dict[str, int]:
    """Count files: every discovered file must be in the archive (image or mask) or quarantined, exactly once."""
    ingested = sum(r["files"] + (1 if r.get("has_mask") else 0) for r in records)
    counts = {"discovered": discovered, "ingested": ingested, "quarantined": len(quarantine)}
    if ingested + len(quarantine) != discovered:
        raise AccountingError(f"accounting mismatch: {counts}")
    return counts


def accounting_line(counts: dict[str, int]) -> str:
    """The line every run prints and stores."""
    return f"discovered {counts['discovered']} = ingested {counts['ingested']} + quarantined {counts['quarantined']}"


def finalize_store(store_url: str, *, records: list[dict[str, Any]], quarantine: list[dict[str, Any]],
                   excluded: list[dict[str, Any]], manifest_issues: list[dict[str, Any]], counts: dict[str, int],
                   fingerprint: dict[str, Any], config: dict[str, Any], classes: list[str], splits: dict[str, int],
                   samples: int, sample_shape: list[int], run_fingerprint: str, key_fingerprint: str) -> dict[str, Any]:
    """Write reports and root attributes; drop archive units not in this run; returns the summary."""
    root = open_store(store_url, mode="a")
    keep = {r["id"] for r in records}
    if "archive" in root:
        for stale in sorted(set(root["archive"].group_keys()) - keep):
            remove_path(store_url, f"archive/{stale}")
    audit = DeidAudit()
    for r in records:
        audit.merge(DeidAudit.from_compact(r.get("audit", [])))
    quarantine_public = sorted(({k: v for k, v in q.items() if k != "index"} for q in quarantine),
                               key=lambda q: (q["source_hash"], q["reason"]))
    reasons: dict[str, int] = {}
    for q in quarantine_public:
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
    write_json(store_url, "reports/quarantine.json", quarantine_public)
    write_json(store_url, "reports/excluded.json", excluded)
    write_json(store_url, "reports/manifest_issues.json", manifest_issues)
    write_json(store_url, "reports/deid_audit.json", audit.to_dict())
    write_json(store_url, "reports/fingerprint.json", fingerprint)
    extra = [f"{r['id']}:{r['checksum']}:{json.dumps(r['dicom'], sort_keys=True)}"
             for r in sorted(records, key=lambda r: r["id"])]
    extra += [f"q:{q['source_hash']}:{q['reason']}" for q in quarantine_public] + [f"classes:{classes}"]
    summary = {
        "schema_version": SCHEMA_VERSION,
        "code_version": __version__,
        "config": config,
        "fingerprint": fingerprint,
        "classes": classes,
        "kind": config["preprocess"]["kind"],
        "sample_shape": sample_shape,
        "samples": samples,
        "splits": splits,
        "counts": counts,
        "accounting": accounting_line(counts),
        "quarantine_reasons": reasons,
        "excluded": len(excluded),
        "manifest_issues": len(manifest_issues),
        "archive_images": len(records),
        "run_fingerprint": run_fingerprint,
        "key_fingerprint": key_fingerprint,
        "content_hash": content_hash(root, extra),
        "completed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
    }
    root.attrs[ATTRS_KEY] = summary
    return summary
