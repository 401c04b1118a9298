"""Lineage of a pipeline run: store content hash -> checkpoints (sha256) -> reports -> predictions."""

from __future__ import annotations

from typing import Any, Mapping

from medpipe.pipeline.records import StageRecord

MODEL_STAGES = ("train", "retrain")
REPORT_STAGES = ("evaluate", "augment", "retrain", "promote")


def build_lineage(content_hash: str, records: Mapping[str, StageRecord],
                  promoted: Mapping[str, Any] | None) -> dict[str, Any]:
    """The lineage section of OUTPUT/pipeline.json, from the stages that ran or were skipped (both published)."""
    done = {name: r for name, r in records.items() if r.status != "refused"}
    checkpoints = {name: {"key": r.key, "url": r.summary.get("model"), "sha256": r.summary.get("sha256"),
                          "trained_on": content_hash}
                   for name, r in done.items() if name in MODEL_STAGES and r.summary.get("model")}
    reports = {name: {"key": r.key, "url": r.summary.get("report"), "model_key": r.summary.get("model_key")}
               for name, r in done.items() if name in REPORT_STAGES and r.summary.get("report")}
    predictions = None
    if "predict" in done:
        p = done["predict"]
        predictions = {"key": p.key, "url": p.summary.get("predictions"), "model_key": p.summary.get("model_key"),
                       "model_sha256": p.summary.get("model_sha256")}
    return {"store_content_hash": content_hash, "ingest_key": records["ingest"].key if "ingest" in records else None,
            "checkpoints": checkpoints, "reports": reports, "predictions": predictions,
            "promoted": dict(promoted) if promoted else None}
