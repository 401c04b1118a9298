"""3D segmentation evaluated on whole volumes in each case's **source** grid (volumes-layout stores).

For each case of a split: sliding-window prediction on the stored volume, probabilities mapped back to the source
grid and argmax (`medpipe.predict`), then Dice / HD95 (mm) / surface Dice against the archived mask at the source
spacing (`volume_metrics.case_metrics`). An Otsu-threshold baseline (rule chosen on train cases, in the source grid
too) is scored on the same cases; bootstrap CIs resample cases, the same resamples for model, baseline and their
paired difference. Outputs: metrics.json, per_case.csv, report.html with the per-case table and 3-plane overlays,
predictions/<unit>.nii.gz (source affine) and, optionally, the labels in the store under predictions/<run-id>/.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from medpipe.config import StoreConfig
from medpipe.errors import UserError
from medpipe.evaluation.baselines import OTSU_RULES, _choose_otsu_rule, otsu_masks
from medpipe.evaluation.plots import plot_case_overlays, plot_training_curves
from medpipe.evaluation.report import markdown_summary, write_report
from medpipe.evaluation.volume_metrics import METRICS, case_metrics, summarize_cases
from medpipe.ingest.records import ArchiveRecord
from medpipe.predict import (
    PredictError,
    PredictionMismatchWarning,
    VolumeModel,
    checkpoint_lineage,
    iter_case_predictions,
    load_volume_model,
    preprocessing_warnings,
    split_cases,
    write_nifti,
)
from medpipe.store import ATTRS_KEY, open_store, read_archive_image, read_sample_table, store_attrs
from medpipe.task import Task
from medpipe.volumes import CaseGeometry, store_layout, volume_chunks

__all__ = ["MAX_OVERLAYS", "PREDICTIONS_GROUP", "StorePredictionWriter", "choose_volume_otsu_rule",
           "evaluate_volumes", "open_store_writer", "paired_volume_differences", "write_case_table"]

MAX_OVERLAYS = 12  # cases drawn as 3-plane overlays (the first ones of the split)
MAX_TRAIN_VOLUMES = 64  # train cases (seeded subset) on which the Otsu rule is chosen
TOLERANCE_MM = 2.0  # surface Dice tolerance
PREDICTIONS_GROUP = "predictions"
# report metric key -> volume_metrics key
REPORT_KEYS = (("dice_mean", "dice"), ("hd95_mean", "hd95_mm"), ("surface_dice_mean", "surface_dice"))


# ---- Otsu baseline in the source grid --------------------------------------------------------------------------------


class _ArchiveRows:
    """The archive images (or masks) of some cases, indexable like a fixed-layout training array with one case per
    chunk, so that `baselines._choose_otsu_rule` scores its rules on whole source volumes of different shapes."""

    def __init__(self, read: Any, n: int, part: int) -> None:
        self._read, self._part = read, part
        self.chunks, self.shape = (1,), (n,)
        self.oindex = self

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = range(*key.indices(self.shape[0])) if isinstance(key, slice) else np.atleast_1d(key).tolist()
        return np.stack([self._read(int(i))[self._part] for i in rows])


def choose_volume_otsu_rule(root: zarr.Group, units: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """The Otsu rule (baselines.OTSU_RULES) with the best mean foreground Dice on these train cases' source images
    and archive masks (a seeded subset of MAX_TRAIN_VOLUMES when more); returns the tuning record."""
    units = list(units)
    if len(units) > MAX_TRAIN_VOLUMES:
        pick = np.random.default_rng(seed).choice(len(units), MAX_TRAIN_VOLUMES, replace=False)
        units = [units[i] for i in sorted(pick)]

    @functools.lru_cache(maxsize=1)
    def read(i: int) -> tuple[np.ndarray, np.ndarray]:
        pixels, mask, _ = read_archive_image(root, units[i])
        return pixels, np.zeros((1, *pixels.shape[1:]), np.uint8) if mask is None else mask[:1]

    rows = np.arange(len(units), dtype=np.int64)
    tuning = _choose_otsu_rule(_ArchiveRows(read, len(units), 0), _ArchiveRows(read, len(units), 1), rows, seed)
    tuning["note"] = (f"rule '{tuning['rule']}' chosen on {len(units)} train volumes (source grid) by mean "
                      "foreground Dice.")
    return tuning


# ---- predictions in the store ----------------------------------------------------------------------------------------


class StorePredictionWriter:
    """Writes source-grid label maps into STORE/predictions/<run_id>/<unit> while holding the store's lock."""

    def __init__(self, store_url: str, run_id: str, lineage: Mapping[str, Any]) -> None:
        from medpipe.ingest.lock import acquire_lock

        self.store_url, self.run_id = store_url, run_id
        acquire_lock(store_url, run_id)
        try:
            root = open_store(store_url, mode="r+")
            attrs = store_attrs(root)
            self.config = StoreConfig.model_validate(((attrs.get("config") or {}).get("store")) or {})
            self.group = root.require_group(PREDICTIONS_GROUP).create_group(run_id, overwrite=True)
            self.group.attrs[ATTRS_KEY] = dict(lineage)
        except BaseException:
            self.close()
            raise

    def write(self, unit: str, labels: np.ndarray, geometry: CaseGeometry) -> None:
        """One case: uint8 (1, Z, Y, X) on the source grid (aligned with archive/<unit>/labels/mask/0)."""
        from medpipe.ingest.lock import check_lock
        from medpipe.codecs import codec_chain

        check_lock(self.store_url, self.run_id)  # still ours; extends the lease
        data = np.asarray(labels, dtype=np.uint8)[None]
        chunks, shards = volume_chunks(data.shape, self.config.volume_chunk)
        arr = self.group.create_array(unit, shape=data.shape, dtype="uint8", chunks=chunks, shards=shards,
                                      fill_value=0, **codec_chain("volume_mask", self.config, "uint8"),
                                      dimension_names=("c", "z", "y", "x"), overwrite=True)
        arr[...] = data
        arr.attrs[ATTRS_KEY] = {"unit": unit, "grid": "source", "run": self.run_id,
                                "source_affine": [list(r) for r in geometry.source_affine],
                                "spacing": list(geometry.source_spacing)}

    def close(self) -> None:
        """Release the store's lock."""
        from medpipe.ingest.lock import release_lock

        release_lock(self.store_url, self.run_id)


def open_store_writer(store_url: str, run_id: str, lineage: Mapping[str, Any]
                            ) -> tuple[StorePredictionWriter | None, str | None]:
    """(writer, None), or (None, why not) when the store cannot be written now (read-only, locked by an ingest)."""
    try:
        return StorePredictionWriter(store_url, run_id, lineage), None
    except (UserError, OSError) as exc:
        return None, (f"predictions were not written into the store ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:200]})")


# ---- metrics in the report's format ----------------------------------------------------------------------------------


def _report_metrics(summary: Mapping[str, Any], notes: Sequence[str] = ()) -> dict[str, Any]:
    """`summarize_cases` output -> the report's segmentation metrics dict (dice_mean, hd95_mean, surface_dice_mean
    with "ci" entries; per label under "per_class")."""
    info = summary["ci"]
    out: dict[str, Any] = {"task": Task.segment, "layout": "volumes", "grid": "source", "n": summary["n_cases"],
                           "hd95_units": "mm", "hd95_excluded": summary["hd95_excluded"],
                           "tolerance_mm": TOLERANCE_MM, "ci": {}, "per_class": {}, "notes": list(notes)}
    for key, name in REPORT_KEYS:
        out[key] = summary[name]["mean"]
        out["ci"][key] = {"low": summary[name]["low"], "high": summary[name]["high"], "level": info["level"],
                          "n_boot": info["n_boot"], "method": info["method"]}
    for label, block in summary["per_label"].items():
        out["per_class"][f"label {label}"] = {**{key: block[name]["mean"] for key, name in REPORT_KEYS},
                                              "hd95_excluded": block["hd95_excluded"]}
    return out


def _subtract(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Per-case model-minus-baseline values in the `case_metrics` layout (NaN where either is undefined)."""
    return {**{m: a[m] - b[m] for m in METRICS},
            "per_label": {lab: {m: a["per_label"][lab][m] - b["per_label"][lab][m] for m in METRICS}
                          for lab in a["per_label"]}}


def paired_volume_differences(model_cases: Sequence[Mapping[str, Any]], base_cases: Sequence[Mapping[str, Any]],
                              n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """Mean model-minus-baseline difference per report metric with its paired bootstrap CI (the same resamples as
    `summarize_cases` with this seed): {"dice_mean": {"value", "low", "high"}, ...}."""
    summary = summarize_cases([_subtract(a, b) for a, b in zip(model_cases, base_cases, strict=True)], n_boot, seed)
    return {key: {"value": summary[name]["mean"], "low": summary[name]["low"], "high": summary[name]["high"]}
            for key, name in REPORT_KEYS}


# ---- per-case table --------------------------------------------------------------------------------------------------


def _case_row(number: int, case_unit: str, patient: str, geometry: CaseGeometry, spacing: Sequence[float],
              model: Mapping[str, Any], otsu: Mapping[str, Any], overlay: str | None) -> dict[str, Any]:
    return {"case": number, "unit": case_unit, "patient": patient, "prediction": f"predictions/{case_unit}.nii.gz",
            "overlay": overlay, "source_shape": list(geometry.source_shape), "spacing_mm": [float(s) for s in spacing],
            **{m: model[m] for m in METRICS}, "otsu_dice": otsu["dice"],
            "per_label": {lab: {**v, "otsu_dice": otsu["per_label"][lab]["dice"]}
                          for lab, v in model["per_label"].items()}}


CSV_COLUMNS = ("case", "unit", "patient", "label", "dice", "hd95_mm", "surface_dice", "volume_true_ml",
               "volume_pred_ml", "otsu_dice")


def write_case_table(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """per_case.csv: one line per case and foreground label (NaN HD95 written empty)."""
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            for label, v in row["per_label"].items():
                values = [v[c] for c in CSV_COLUMNS[4:]]
                writer.writerow([row["case"], row["unit"], row["patient"], label] +
                                ["" if isinstance(x, float) and math.isnan(x) else x for x in values])
    return path


# ---- evaluation ------------------------------------------------------------------------------------------------------


def _run_id(lineage: Mapping[str, Any]) -> str:
    stamp = dt.datetime.fromisoformat(str(lineage["created_at"])).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{str(lineage['checkpoint_sha256'])[:8]}"


def _volumes_attrs(store_url: str) -> dict[str, Any]:
    attrs = store_attrs(store_url)
    if store_layout(attrs) != "volumes":
        raise PredictError(f"{store_url} is not a volumes-layout store: use evaluate_checkpoint")
    return attrs


def evaluate_volumes(store_url: str, model_path: str | Path, out_dir: str | Path, split: str = "test",
                     n_boot: int = 1000, device: str = "auto", tta_flips: bool = False, write_store: bool = True,
                     seed: int = 0) -> dict[str, Any]:
    """Evaluate a volumes-layout checkpoint on `split` of a volumes-layout store, in each case's source grid.

    Writes into `out_dir`: metrics.json (model, Otsu baseline, paired differences, per-case rows), per_case.csv,
    report.html, overlays/case_NN.png (at most MAX_OVERLAYS), predictions/<unit>.nii.gz (uint8 labels, source
    affine); with `write_store`, the labels also go to STORE/predictions/<run-id>/<unit> with lineage attributes.
    Returns {"report", "metrics_json", "metrics", "baselines", "markdown", "patients", "samples", "per_case",
    "predictions_dir", "store_predictions", "warnings"}."""
    vm: VolumeModel = load_volume_model(model_path, device)
    attrs = _volumes_attrs(store_url)
    root = open_store(store_url)
    table = read_sample_table(root)
    indices = split_cases(table, split)
    has_mask = np.asarray(table["has_mask"], dtype=bool)
    if not has_mask[indices].any():
        raise PredictError(f"the {split} split of the store has no case with a mask: nothing to evaluate")
    warned = preprocessing_warnings(attrs, vm.meta, sorted({str(m) for m in table["modality"][indices]}))
    for note in warned:
        warnings.warn(note, PredictionMismatchWarning, stacklevel=2)
    train = split_cases(table, "train")
    tuning = choose_volume_otsu_rule(root, [str(u) for u in table["unit"][train[has_mask[train]]]], seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lineage = {**checkpoint_lineage(vm, tta_flips), "store_content_hash": attrs.get("content_hash"), "split": split}
    run_id = _run_id(lineage)
    writer, refused = open_store_writer(store_url, run_id, lineage) if write_store else (None, None)
    if refused:
        warnings.warn(refused, UserWarning, stacklevel=2)
        warned.append(refused)

    num_classes = vm.num_classes
    rows: list[dict[str, Any]] = []
    model_cases: list[dict[str, Any]] = []
    otsu_cases: list[dict[str, Any]] = []
    try:
        for case, pred in iter_case_predictions(root, indices, vm, tta_flips):
            write_nifti(pred, case.geometry, out / "predictions", case.unit)
            if writer is not None:
                writer.write(case.unit, pred, case.geometry)
            if not has_mask[case.index]:
                continue
            pixels, mask, archive = read_archive_image(root, case.unit)
            assert mask is not None  # has_mask
            spacing = ArchiveRecord.from_attrs(archive).spacing
            model_cases.append(case_metrics(pred, mask[0], spacing, num_classes, TOLERANCE_MM))
            otsu = otsu_masks(pixels[None], tuning["rule"])[0, 0]
            otsu_cases.append(case_metrics(otsu, mask[0], spacing, num_classes, TOLERANCE_MM))
            number = len(rows) + 1
            overlay = None
            if number <= MAX_OVERLAYS:
                overlay = f"overlays/case_{number:02d}.png"
                plot_case_overlays(pixels[0], mask[0], pred, spacing, out / overlay, title=f"case #{number}")
            rows.append(_case_row(number, case.unit, str(table["patient"][case.index]), case.geometry, spacing,
                                  model_cases[-1], otsu_cases[-1], overlay))
    finally:
        if writer is not None:
            writer.close()

    unscored = int(len(indices) - len(rows))
    notes = [*warned, f"Metrics are computed in each case's source grid (original voxels, spacing in mm): the "
             f"model's probabilities were mapped back from the {vm.meta.get('training_spacing')} mm training grid "
             "before argmax.", f"Surface Dice at a tolerance of {TOLERANCE_MM:g} mm."]
    if unscored:
        notes.append(f"{unscored} case(s) of the split have no mask: predicted, not scored.")
    if num_classes > 2:
        notes.append("The Otsu baseline is binary: all its foreground is labelled class 1.")
    metrics = _report_metrics(summarize_cases(model_cases, n_boot, seed), notes)
    baselines = {"otsu": {
        "title": "Otsu threshold",
        "description": "a per-volume Otsu intensity threshold of the source image (scikit-image); which side is "
                       f"foreground ({', '.join(OTSU_RULES)}) was chosen on the train split",
        "tuning": tuning, "metrics": _report_metrics(summarize_cases(otsu_cases, n_boot, seed)),
        "difference": paired_volume_differences(model_cases, otsu_cases, n_boot, seed)}}
    write_case_table(rows, out / "per_case.csv")
    plots: dict[str, str] = {}
    if (vm.run_dir / "metrics.csv").exists():
        plots["training_curves"] = plot_training_curves(vm.run_dir / "metrics.csv", out / "training_curves.png")
    patients = len({r["patient"] for r in rows})
    store_predictions = f"{PREDICTIONS_GROUP}/{run_id}" if writer is not None else None
    data_info = {"n_patients": patients, "unit": "volumes", "content_hash": attrs.get("content_hash"),
                 "split": split, "store_kind": attrs.get("kind"), "grid": "source (each case's original voxels)",
                 "predictions": f"{len(indices)} NIfTI files in predictions/",
                 "store_predictions": store_predictions or "not written"}
    model_info = {"model_name": vm.meta.get("model_name"), "code_version": vm.meta.get("code_version"),
                  "config": vm.meta.get("config"), "epoch": vm.meta.get("epoch"), "checkpoint": vm.checkpoint.name,
                  "checkpoint_sha256": lineage["checkpoint_sha256"], "patch_size": list(vm.patch),
                  "tta": bool(tta_flips)}
    title = f"medpipe evaluation: {vm.meta.get('model_name')} (3D volumes, source grid) on the {split} split"
    report = write_report(out, title=title, task=Task.segment, metrics=metrics, plots=plots, model_info=model_info,
                          data_info=data_info, baselines=baselines, cases=rows)
    return {"report": str(report), "metrics_json": str(out / "metrics.json"), "metrics": metrics,
            "baselines": baselines, "markdown": markdown_summary(metrics, Task.segment, baselines),
            "patients": patients, "samples": len(rows), "per_case": rows, "predictions_dir": str(out / "predictions"),
            "store_predictions": store_predictions, "warnings": warned}
