"""Batch prediction of newly arrived studies with a trained model (`medpipe predict FOLDER RUN OUT`).

Volumes-layout (3D segmentation) models go to `medpipe.predict.predict_folder`. A fixed-layout classification
model (2D or 3D) gets the folder ingested into OUT/store.zarr the way its training data were prepared (kind,
channels, sample shape from the checkpoint; fit, intensity statistics, 3D spacing and reader settings from the
training store's recorded ingest config when the training store is given) with the same de-identification key, and
every ingested sample is classified:

- OUT/predictions.csv: one row per unit, pseudonyms only (unit, patient, study, series), modality, the predicted
  class name and one probability column per class (`p_<class>`).
- OUT/predictions.json: counts (new, already predicted, excluded), predicted classes, the model's sha256, the
  ingested store's content hash and the ingest accounting.

Rerunning on the same OUT after the source gained studies ingests incrementally (archived units are reused) and
classifies only the units not in predictions.csv yet, appending them; the summary says how many were new.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medpipe.config import IngestConfig
from medpipe.errors import UserError
from medpipe.evaluation.evaluate import resolve_checkpoint
from medpipe.predict import INGESTED_STORE, is_volumes_checkpoint, predict_folder
from medpipe.store import read_json, read_sample_table, store_attrs
from medpipe.task import Task
from medpipe.training.checkpoints import file_sha256, load_model

__all__ = ["BatchPredictError", "PREDICTIONS_CSV", "PREDICTIONS_JSON", "classifier_ingest_config", "classify_rows",
           "csv_columns", "predict_new_studies"]

PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSON = "predictions.json"
ID_COLUMNS = ("unit", "patient", "study", "series", "modality")
BATCH = 32


class BatchPredictError(UserError, ValueError):
    """A model, store, source or output folder that batch prediction cannot use (the message says why)."""


def csv_columns(classes: Sequence[str]) -> list[str]:
    """predictions.csv header: pseudonymous ids, modality, predicted class, one probability per class."""
    return [*ID_COLUMNS, "predicted", *(f"p_{c}" for c in classes)]


def _normalization(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The intensity statistics the training store's fixed-layout samples were normalised with (ingest uses the
    fingerprint's per-modality intensity entry; a volumes store records them as `normalization`)."""
    if attrs.get("normalization"):
        return dict(attrs["normalization"])
    modalities = (attrs.get("fingerprint") or {}).get("modalities") or {}
    return {m: entry.get("intensity") for m, entry in modalities.items() if isinstance(entry, Mapping)}


def classifier_ingest_config(meta: Mapping[str, Any], training_attrs: Mapping[str, Any] | None = None
                             ) -> tuple[IngestConfig, list[str]]:
    """(ingest config that prepares new studies as the classifier's training data, notes). Kind, channels and
    sample shape come from the checkpoint; with the training store's attributes also its recorded ingest config
    (fit, reader settings), intensity statistics and 3D training spacing; without them those are defaults and a
    note says so. The model's classes are declared; the manifest is SOURCE/labels.csv when present."""
    shape = [int(v) for v in meta["sample_shape"]]
    if shape[0] not in (1, 3) or len(shape) not in (3, 4):
        raise BatchPredictError(f"the checkpoint takes samples of shape {shape}; ingest makes (1 or 3 channels) x "
                                "2D or 3D samples")
    kind = "2d" if len(shape) == 3 else "3d"
    notes: list[str] = []
    recorded: dict[str, Any] = {}
    if training_attrs is not None:
        if training_attrs.get("content_hash") != meta.get("store_content_hash"):
            raise BatchPredictError(
                f"the given training store (content hash {str(training_attrs.get('content_hash'))[:12]}…) is not "
                f"the one the model was trained on ({str(meta.get('store_content_hash'))[:12]}…)")
        recorded = dict(training_attrs.get("config") or {})
        if not recorded:
            notes.append("the training store records no ingest config: default preprocessing besides the sample "
                         "shape")
    else:
        notes.append("no training store given: kind, channels and sample shape follow the checkpoint, the rest of "
                     "the preprocessing (fit, intensity statistics) is the default; pass the training store to "
                     "prepare new studies exactly as the training data")
    pre = dict(recorded.get("preprocess") or {})
    pre.update(kind=kind, channels=shape[0], shape=shape[1:], layout="fixed")
    if training_attrs is not None:
        pre["normalization"] = _normalization(training_attrs) or None
        if kind == "3d" and training_attrs.get("training_spacing"):
            pre["target_spacing"] = [float(v) for v in training_attrs["training_spacing"]]
    config = {k: v for k, v in recorded.items() if k not in ("manifest", "classes", "preprocess")}
    return IngestConfig.model_validate({**config, "preprocess": pre, "classes": list(meta.get("classes") or [])}), notes


@torch.no_grad()
def classify_rows(model: torch.nn.Module, store: str, rows: np.ndarray, device: str = "auto") -> np.ndarray:
    """Class probabilities (len(rows), K) of the store's training samples at `rows` (sorted store indices)."""
    from medpipe.training.data import ZarrImageDataset
    from medpipe.training.engine import resolve_device

    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, 0), np.float32)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    ds = ZarrImageDataset(store, "all", Task.classify, cache="none", rows=rows)
    if not np.array_equal(ds.indices, rows):
        raise BatchPredictError("rows to classify must be sorted, unique store indices")
    out = []
    for start in range(0, len(ds), BATCH):
        images = ds.read_arrays(np.arange(start, min(start + BATCH, len(ds))))["images"]
        out.append(torch.softmax(model(torch.from_numpy(images).to(dev)).float(), dim=1).cpu().numpy())
    return np.concatenate(out)


def _previous(out: Path, sha: str, header: list[str]) -> set[str]:
    """Units already in OUT/predictions.csv (made by this model with these columns); empty when none yet."""
    csv_path = out / PREDICTIONS_CSV
    if not csv_path.exists():
        return set()
    summary_path = out / PREDICTIONS_JSON
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    made_by = (summary.get("model") or {}).get("checkpoint_sha256")
    if made_by != sha:
        raise BatchPredictError(f"{out} holds predictions of another model (sha256 {str(made_by)[:12]}…): use a new "
                                "output folder")
    with csv_path.open(newline="") as fh:
        reader = csv.reader(fh)
        if next(reader, None) != header:
            raise BatchPredictError(f"{csv_path} has other columns than this model's predictions: use a new output "
                                    "folder")
        return {row[0] for row in reader if row}


def _append(csv_path: Path, header: list[str], rows: list[list[Any]]) -> None:
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(header)
        writer.writerows(rows)


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write JSON atomically (temporary file + replace): a kill leaves the old or the new document."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    tmp.replace(path)


def _predicted_counts(csv_path: Path) -> dict[str, int]:
    with csv_path.open(newline="") as fh:
        return dict(sorted(Counter(row["predicted"] for row in csv.DictReader(fh)).items()))


def predict_new_studies(source: str, model_run: str, out_dir: str, *, store: str | None = None,
                        key_secret: str | None = None, device: str = "auto", show_progress: bool = False
                        ) -> dict[str, Any]:
    """Predict the studies of SOURCE (a folder or s3:// prefix of images) with a trained model into OUT_DIR; only
    studies not predicted there yet are classified (see the module docstring). `store`: the classifier's training
    store, whose recorded preprocessing new studies get. The key is $MEDPIPE_DEID_KEY or the Prefect Secret
    `key_secret`. Returns the summary written to OUT_DIR/predictions.json."""
    from flows.ingest import run_ingest

    checkpoint, _ = resolve_checkpoint(model_run)
    model, meta = load_model(checkpoint)
    if is_volumes_checkpoint(meta):
        return predict_folder(source, model_run, out_dir, device=device, key_secret=key_secret,
                              show_progress=show_progress)
    if Task(meta["task"]) is not Task.classify:
        raise BatchPredictError(f"{checkpoint.name} is a fixed-layout segmentation model: batch prediction takes a "
                                "classification model or a 3D volumes-layout segmentation model")
    config, notes = classifier_ingest_config(meta, store_attrs(store) if store is not None else None)
    classes = list(meta.get("classes") or [])
    if len(classes) != int(meta["num_outputs"]):
        raise BatchPredictError(f"{checkpoint.name} has {meta['num_outputs']} outputs but {len(classes)} class names")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(checkpoint)
    header = csv_columns(classes)
    done = _previous(out, sha, header)
    model_record = {"checkpoint_sha256": sha, "model_name": meta.get("model_name"), "epoch": meta.get("epoch"),
                    "trained_on_store": meta.get("store_content_hash"), "code_version": meta.get("code_version")}
    if not done:  # name the model before any row is written, so that a run killed midway can be resumed
        _write_json(out / PREDICTIONS_JSON, {"model": model_record, "counts": {"predicted_total": 0}})
    ingested = str(out / INGESTED_STORE)
    ingest = run_ingest(source, ingested, config, key_secret=key_secret, show_progress=show_progress)
    attrs = store_attrs(ingested)
    if not int(attrs.get("samples") or 0):
        raise BatchPredictError(f"no image of SOURCE could be prepared for this model (see OUT/{INGESTED_STORE}/"
                                "reports/ for why)")
    table = read_sample_table(ingested)
    seen = np.array([str(u) in done for u in table["unit"]], dtype=bool)
    usable = np.asarray(table["split"]) >= 0  # -1: preprocessing failed, the sample is zero-filled
    rows = np.flatnonzero(usable & ~seen)
    probs = classify_rows(model, ingested, rows, device)
    _append(out / PREDICTIONS_CSV, header, [
        [*(str(table[c][i]) for c in ID_COLUMNS), classes[int(np.argmax(p))], *(f"{float(v):.6f}" for v in p)]
        for i, p in zip(rows.tolist(), probs)])
    excluded = read_json(ingested, "reports/excluded.json") or []
    summary = {
        "counts": {"new": int(rows.size), "already_predicted": int((usable & seen).sum()),
                   "predicted_total": len(done) + int(rows.size), "excluded": len(excluded),
                   "samples_in_store": int(seen.size)},
        "predicted_classes": _predicted_counts(out / PREDICTIONS_CSV), "classes": classes,
        "model": model_record,
        "store": INGESTED_STORE, "store_content_hash": attrs.get("content_hash"), "csv": PREDICTIONS_CSV,
        "excluded": excluded, "ingest": {"accounting": ingest.get("accounting"), "noop": bool(ingest.get("noop")),
                                         "warnings": ingest.get("warnings", [])},
        "warnings": notes}
    _write_json(out / PREDICTIONS_JSON, summary)
    return summary
