"""Plan: turn scan records into archive units (one image, one multi-frame file, one DICOM series, one volume).

Also decides the file-level quarantine that needs the whole listing: duplicate instances and series whose slices
have mixed sizes. Every file index ends in exactly one unit, as a unit's mask, or in the quarantine list.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from posixpath import dirname
from typing import Any

from medpipe.deid import Pseudonymizer
from medpipe.manifest import Manifest

VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}


@dataclass
class UnitPlan:
    """Units to archive and files quarantined before decoding."""

    units: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)


def _row_for(manifest: Manifest, paths: list[str]):
    for path in paths:
        if path in manifest.rows:
            return manifest.rows[path]
    folder = dirname(paths[0])
    return manifest.rows.get(folder) if folder else None


def plan_units(records: list[dict[str, Any]], paths: tuple[str, ...], manifest: Manifest,
               pseudonyms: Pseudonymizer) -> UnitPlan:
    """Group scan records into units; attach manifest labels/masks; quarantine duplicates and mixed series."""
    plan = UnitPlan()
    mask_paths = manifest.mask_paths
    index_of = {p: i for i, p in enumerate(paths)}

    def quarantine(index: int, reason: str, detail: str) -> None:
        plan.quarantine.append({"source_hash": pseudonyms.path(paths[index]), "reason": reason, "detail": detail,
                                "index": index})

    dicom_by_series: dict[str, list[dict]] = defaultdict(list)
    seen_sop: dict[str, int] = {}
    singles: list[tuple[str, list[dict]]] = []
    for rec in sorted(records, key=lambda r: r["index"]):
        if rec.get("reason"):
            quarantine(rec["index"], rec["reason"], rec.get("detail", ""))
        elif paths[rec["index"]] in mask_paths:
            continue  # attached to its image below
        elif rec["kind"] == "dicom":
            if rec["sop"] in seen_sop:
                quarantine(rec["index"], "duplicate_instance", "same SOPInstanceUID as an earlier file")
                continue
            seen_sop[rec["sop"]] = rec["index"]
            dicom_by_series[rec["series"]].append(rec)
        else:
            singles.append((rec["kind"], [rec]))

    for series, recs in sorted(dicom_by_series.items()):
        is_volume = (len(recs) > 1 and all(r["frames"] == 1 and r["has_position"] for r in recs)
                     and recs[0]["modality"] in VOLUME_MODALITIES)
        if not is_volume:
            singles.extend(("dicom-file", [r]) for r in recs)
            continue
        if len({(r["rows"], r["columns"], r["samples_per_pixel"]) for r in recs}) > 1:
            for r in recs:
                quarantine(r["index"], "mixed_series_sizes", f"series of {len(recs)} slices with differing Rows/Columns")
            continue
        singles.append(("dicom-series", recs))

    for kind, recs in singles:
        files = [paths[r["index"]] for r in recs]
        row = _row_for(manifest, files)
        first = recs[0]
        if kind in ("nifti", "raster"):
            patient_key = row.patient_id if row and row.patient_id else f"folder:{dirname(files[0])}"
            patient = pseudonyms.patient(patient_key)
            study = series = pseudonyms.uid(f"folder:{dirname(files[0])}")
            modality = "OT" if kind == "raster" else "MR"
        else:
            patient, study, series, modality = first["patient"], first["study"], first["series"], first["modality"]
        mask = row.mask if row and row.mask and row.mask in index_of else None
        plan.units.append({
            "id": pseudonyms.path("\n".join(files)),
            "kind": "dicom-file" if kind == "dicom" else kind,
            "files": files,
            "indices": [r["index"] for r in recs],
            "mask": mask,
            "mask_index": index_of.get(mask) if mask else None,
            "hashes": [pseudonyms.path(f) for f in files],
            "mask_hash": pseudonyms.path(mask) if mask else None,
            "label": row.label if row else None,
            "patient": patient, "study": study, "series": series, "modality": modality,
        })
    taken = {u["mask_index"] for u in plan.units if u["mask_index"] is not None}
    for rec in records:
        if not rec.get("reason") and paths[rec["index"]] in mask_paths and rec["index"] not in taken:
            quarantine(rec["index"], "mask_without_image", "a manifest mask whose image is missing or quarantined")
    plan.units.sort(key=lambda u: u["id"])
    return plan
