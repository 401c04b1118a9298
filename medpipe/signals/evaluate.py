"""Evaluate a signal model: predictions -> metrics beside naive baselines, with patient-bootstrap CIs -> report.

Windows of one patient are correlated, so every confidence interval resamples *patients* with replacement (all
windows of a drawn patient come along, as often as the patient is drawn) — the same resamples for the model and its
baselines, so the differences are paired. :func:`signal_metrics` is a pure function over the prediction dict of
``medpipe.signals.train.predict_signals``, the store's per-window table and its attributes;
:func:`evaluate_signal_checkpoint` loads a checkpoint, predicts and writes metrics.json, PNGs and report.html.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.evaluation.bootstrap import (_ci_entry, batched_accuracy, batched_auroc, batched_f1_macro,
                                          bootstrap_ci)
from medpipe.evaluation.metrics import classification_metrics
from medpipe.signals.baselines import beat_period, majority_class, persistence_forecast, seasonal_forecast

__all__ = ["PatientResampling", "baseline_forecasts", "classification_summary", "evaluate_predictions",
           "evaluate_signal_checkpoint", "forecast_summary", "signal_metrics"]

TRAIN_CODE = 0
CLASSIFY, FORECAST = "classify", "forecast"
FORECASTER_TITLES = {"model": "model", "persistence": "Persistence (last value held)",
                     "seasonal": "Seasonal naive (previous beat)"}
_CLASS_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "accuracy": batched_accuracy, "f1_macro": batched_f1_macro, "auroc": batched_auroc}
Stat = Callable[[np.ndarray], np.ndarray]  # window multiplicities (B, N) -> one value per resample (B,)


def _names(values: np.ndarray) -> np.ndarray:
    """Python-str array of pseudonyms (the store's columns come as numpy StringDType or object arrays)."""
    return np.array([str(v) for v in np.asarray(values).ravel()], dtype=object)


MIN_PATIENTS_FOR_CI = 2  # a bootstrap over fewer patients has no spread to show


@dataclass(frozen=True)
class PatientResampling:
    """Cluster bootstrap over patients: ``groups`` (N,) is the patient index 0..n_patients-1 of each window."""

    groups: np.ndarray
    n_patients: int
    n_boot: int = 1000
    seed: int = 0
    alpha: float = 0.05

    @classmethod
    def of(cls, patients: np.ndarray, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
           ) -> PatientResampling:
        """Resampling of the windows whose patients (pseudonyms) are ``patients`` (N,)."""
        names, groups = np.unique(_names(patients), return_inverse=True)
        return cls(groups=groups.astype(np.int64), n_patients=int(names.size), n_boot=n_boot, seed=seed, alpha=alpha)

    def multiplicities(self, patient_draws: np.ndarray) -> np.ndarray:
        """(B, N) how often each window is in each resample, from (B, n_patients) drawn patient indices."""
        b, p = patient_draws.shape[0], self.n_patients
        flat = (np.arange(b)[:, None] * p + patient_draws).ravel()
        counts = np.bincount(flat, minlength=b * p).reshape(b, p)
        return counts[:, self.groups]

    def interval(self, stat: Stat) -> tuple[float, float]:
        """Percentile interval of ``stat`` over patient resamples (medpipe.evaluation.bootstrap.bootstrap_ci); NaN
        with fewer than MIN_PATIENTS_FOR_CI patients (resampling one patient says nothing about the spread)."""
        if self.n_patients < MIN_PATIENTS_FOR_CI:
            return math.nan, math.nan
        return bootstrap_ci(lambda draws: stat(self.multiplicities(draws)), np.arange(self.n_patients),
                            n_boot=self.n_boot, seed=self.seed, alpha=self.alpha, batched=True)

    def ci(self, stat: Stat) -> dict[str, Any]:
        """A CI entry {low, high, level, n_boot, method, unit, n_units} of ``stat``."""
        entry = _ci_entry(*self.interval(stat), self.n_boot, self.alpha, "patients")
        entry["method"] += " (every window of a drawn patient kept)"
        return {**entry, "unit": "patients", "n_units": self.n_patients}

    def difference(self, value: float, stat: Stat) -> dict[str, Any]:
        """{value, low, high, level, unit, n_units} of a paired difference ``stat`` (model minus baseline)."""
        low, high = self.interval(stat)
        return {"value": value, "low": low, "high": high, "level": 1 - self.alpha, "unit": "patients",
                "n_units": self.n_patients}

    def info(self) -> dict[str, Any]:
        """How the intervals were made (for metrics.json)."""
        return {"unit": "patients", "n_units": self.n_patients, "n_boot": self.n_boot, "seed": self.seed,
                "level": 1 - self.alpha}


def _below_zero(diff: Mapping[str, Any]) -> bool:
    high = diff.get("high")
    return high is not None and math.isfinite(float(high)) and float(high) < 0


def _above_zero(diff: Mapping[str, Any]) -> bool:
    low = diff.get("low")
    return low is not None and math.isfinite(float(low)) and float(low) > 0


# ---- classification ------------------------------------------------------------------------------------------------


def _resampled_metric(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], y_true: np.ndarray,
                      *probs: np.ndarray) -> Stat:
    """Stat of ``fn`` (a batched metric of medpipe.evaluation.bootstrap) on each resample's windows; with two
    probability arrays the paired difference fn(first) - fn(second)."""
    rows = np.arange(y_true.shape[0])

    def stat(mult: np.ndarray) -> np.ndarray:
        out = np.empty(mult.shape[0])
        for b in range(mult.shape[0]):
            take = np.repeat(rows, mult[b])
            values = [float(fn(y_true[take][None], p[take][None])[0]) for p in probs]
            out[b] = values[0] if len(values) == 1 else values[0] - values[1]
        return out

    return stat


def _class_ci(resampling: PatientResampling, y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, Any]:
    return {key: resampling.ci(_resampled_metric(fn, y_true, y_prob)) for key, fn in _CLASS_METRICS.items()}


def classification_summary(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str],
                           resampling: PatientResampling, train_labels: np.ndarray) -> dict[str, Any]:
    """medpipe.evaluation.metrics.classification_metrics of labelled windows, patient-bootstrap CIs of accuracy,
    macro F1 and AUROC, and the majority-class baseline (class chosen on ``train_labels``) with paired differences;
    ``beats_majority`` = the accuracy difference's CI lies above 0."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    metrics = classification_metrics(y_true, y_prob, classes)
    metrics["ci"] = _class_ci(resampling, y_true, y_prob)
    baselines: dict[str, Any] = {}
    try:
        major = majority_class(train_labels, len(classes))
    except ValueError as exc:
        baselines["majority"] = {"title": "Majority class", "skipped": str(exc)}
    else:
        prob = np.zeros_like(y_prob)
        prob[:, major] = 1.0
        base = classification_metrics(y_true, prob, classes)
        base["ci"] = _class_ci(resampling, y_true, prob)
        labelled = np.asarray(train_labels)[np.asarray(train_labels) >= 0]
        baselines["majority"] = {
            "title": "Majority class",
            "description": f"always predicts '{classes[major]}', the most frequent class of the train windows "
                          f"({int((labelled == major).sum())} of {labelled.size}); constant scores, so AUROC 0.5",
            "tuning": {"class": classes[major], "chosen_on": "train"},
            "metrics": base,
            "difference": {key: resampling.difference(float(metrics[key]) - float(base[key]),
                                                      _resampled_metric(fn, y_true, y_prob, prob))
                           for key, fn in _CLASS_METRICS.items()}}
    metrics["baselines"] = baselines
    diff = (baselines["majority"].get("difference") or {}).get("accuracy") or {}
    metrics["beats_majority"] = _above_zero(diff)
    return metrics


# ---- forecasting ---------------------------------------------------------------------------------------------------


def baseline_forecasts(context: np.ndarray, horizon: int, rate_hz: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({"persistence": (N, L, H), "seasonal": (N, L, H)}, beat periods (N,) in samples) from the context only."""
    period = beat_period(context, rate_hz)
    return ({"persistence": persistence_forecast(context, horizon),
             "seasonal": seasonal_forecast(context, horizon, period)}, period)


def _weighted_mean(values: np.ndarray) -> Stat:
    """Stat: resample mean of per-window ``values`` (N,)."""
    def stat(mult: np.ndarray) -> np.ndarray:
        w = mult.astype(np.float64)
        return (w @ values) / w.sum(axis=1)
    return stat


def _error_stats(sq: bool, err: np.ndarray, lead: int | None) -> np.ndarray:
    """Per-window mean absolute (or squared) error (N,) over samples of one lead, or of all leads."""
    e = err[:, lead] if lead is not None else err
    e = e**2 if sq else np.abs(e)
    return e.reshape(e.shape[0], -1).mean(axis=1).astype(np.float64)


def _metric_stat(name: str, err: np.ndarray, lead: int | None) -> tuple[float, Stat]:
    """(point value, resample stat) of "mae" or "rmse" of errors ``err`` (N, L, H), overall or of one lead."""
    per_window = _error_stats(name == "rmse", err, lead)
    mean = _weighted_mean(per_window)
    if name == "mae":
        return float(per_window.mean()), mean
    return float(math.sqrt(per_window.mean())), lambda mult: np.sqrt(mean(mult))


def _minus(a: Stat, b: Stat) -> Stat:
    """Stat of the paired difference a - b (the same resamples)."""
    return lambda mult: a(mult) - b(mult)


def forecast_summary(y_true: np.ndarray, forecasts: Mapping[str, np.ndarray], leads: list[str],
                     resampling: PatientResampling) -> dict[str, Any]:
    """MAE and RMSE (overall and per lead) of every forecaster in ``forecasts`` ({"model", baseline names}: (N, L,
    H)), patient-bootstrap CIs, and paired differences model - baseline; ``beats_<baseline>`` = the CIs of both the
    MAE and the RMSE differences lie below 0."""
    y_true = np.asarray(y_true, dtype=np.float64)
    errors = {name: np.asarray(pred, dtype=np.float64) - y_true for name, pred in forecasts.items()}
    out: dict[str, Any] = {}
    for name, err in errors.items():
        entry: dict[str, Any] = {"title": FORECASTER_TITLES.get(name, name), "ci": {}, "per_lead": {}}
        for metric in ("mae", "rmse"):
            value, stat = _metric_stat(metric, err, None)
            entry[metric] = value
            entry["ci"][metric] = resampling.ci(stat)
        for i, lead in enumerate(leads):
            lead_entry: dict[str, Any] = {"ci": {}}
            for metric in ("mae", "rmse"):
                value, stat = _metric_stat(metric, err, i)
                lead_entry[metric] = value
                lead_entry["ci"][metric] = resampling.ci(stat)
            entry["per_lead"][lead] = lead_entry
        out[name] = entry
    differences: dict[str, Any] = {}
    for name in errors:
        if name == "model":
            continue
        differences[name] = {}
        for metric in ("mae", "rmse"):
            mv, ms = _metric_stat(metric, errors["model"], None)
            bv, bs = _metric_stat(metric, errors[name], None)
            differences[name][metric] = resampling.difference(mv - bv, _minus(ms, bs))
    summary: dict[str, Any] = {"mae": out["model"]["mae"], "rmse": out["model"]["rmse"], "ci": out["model"]["ci"],
                               "forecasters": out, "differences": differences}
    for name, diff in differences.items():
        summary[f"beats_{name}"] = _below_zero(diff["mae"]) and _below_zero(diff["rmse"])
    return summary


# ---- the pure evaluation -------------------------------------------------------------------------------------------


def _task_of(predictions: Mapping[str, Any]) -> str:
    task = getattr(predictions.get("task"), "value", predictions.get("task"))
    if task not in (CLASSIFY, FORECAST):
        raise ValueError(f"predictions of task {task!r}: expected {CLASSIFY!r} or {FORECAST!r}")
    return str(task)


def signal_metrics(predictions: Mapping[str, Any], table: Mapping[str, np.ndarray], attrs: Mapping[str, Any], *,
                   n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Metrics of ``predictions`` (the dict of predict_signals) on the windows ``predictions["indices"]`` of a
    store with per-window ``table`` and attributes ``attrs``; no identifiers in the result (patients are counted)."""
    task = _task_of(predictions)
    indices = np.asarray(predictions["indices"], dtype=np.int64)
    if indices.size == 0:
        raise ValueError("no windows to evaluate: the split is empty")
    patients = np.asarray(table["patient"])[indices]
    info: dict[str, Any] = {"task": task, "n_windows": int(indices.size)}
    if task == CLASSIFY:
        y_true = np.asarray(predictions["y_true"], dtype=np.int64)
        keep = y_true >= 0
        if not keep.any():
            raise ValueError("no labelled windows to evaluate: every window has label -1")
        resampling = PatientResampling.of(patients[keep], n_boot=n_boot, seed=seed, alpha=alpha)
        labels, splits = np.asarray(table["label"]), np.asarray(table["split"])
        metrics = classification_summary(y_true[keep], np.asarray(predictions["y_prob"])[keep],
                                         [str(c) for c in attrs["classes"]], resampling,
                                         labels[splits == TRAIN_CODE])
        if (~keep).any():
            metrics["notes"].append(f"{int((~keep).sum())} unlabelled window(s) were left out.")
    else:
        context, y_true = np.asarray(predictions["context"]), np.asarray(predictions["y_true"])
        rate = float(attrs["rate_hz"])
        horizon = int(y_true.shape[2])
        baselines, period = baseline_forecasts(context, horizon, rate)
        resampling = PatientResampling.of(patients, n_boot=n_boot, seed=seed, alpha=alpha)
        metrics = forecast_summary(y_true, {"model": np.asarray(predictions["y_pred"]), **baselines},
                                   [str(lead) for lead in attrs["leads"]], resampling)
        metrics.update(n=int(indices.size), rate_hz=rate, horizon=horizon, horizon_s=horizon / rate,
                       context_samples=int(context.shape[2]), units=list(attrs.get("units") or []),
                       seasonal_period_s={"median": float(np.median(period)) / rate,
                                          "min": float(period.min()) / rate, "max": float(period.max()) / rate,
                                          "search": "autocorrelation of the context between 0.3 s and 2 s"})
    metrics.update(info)
    metrics["n_patients"] = resampling.n_patients
    metrics["bootstrap"] = resampling.info()
    return metrics


def _display_rows(patients: np.ndarray, labels: np.ndarray | None, per_group: int, total: int) -> np.ndarray:
    """Positions of a few windows to plot, ``per_group`` per class (or overall), one per patient first."""
    if labels is None:
        groups = [np.arange(patients.size)]
    else:
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])]
    chosen: list[int] = []
    for rows in groups:
        _, first = np.unique(_names(patients[rows]), return_index=True)
        firsts = rows[np.sort(first)]
        ordered = list(firsts) + list(np.setdiff1d(rows, firsts))
        chosen += [int(r) for r in ordered[:per_group]]
    return np.asarray(chosen[:total], dtype=np.int64)


def evaluate_predictions(predictions: Mapping[str, Any], table: Mapping[str, np.ndarray], attrs: Mapping[str, Any],
                         out_dir: str | Path, *, signals: Any = None, split: str = "test", n_boot: int = 1000,
                         seed: int = 0, model_info: Mapping[str, Any] | None = None,
                         training_csv: str | Path | None = None) -> dict[str, Any]:
    """signal_metrics + figures + metrics.json and report.html in ``out_dir``; returns the metrics.

    ``signals`` (the store's (N, L, T) array, numpy or zarr) lets the rhythm report draw a few windows;
    ``training_csv`` (the run's metrics.csv) adds the training curves.
    """
    from medpipe.evaluation.plots import plot_confusion_matrix, plot_roc_curves, plot_training_curves
    from medpipe.signals.report import (plot_forecast_errors, plot_forecast_windows, plot_rhythm_windows,
                                        write_signal_report)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = signal_metrics(predictions, table, attrs, n_boot=n_boot, seed=seed)
    indices = np.asarray(predictions["indices"], dtype=np.int64)
    patients = np.asarray(table["patient"])[indices]
    rate = float(attrs["rate_hz"])
    leads = [str(lead) for lead in attrs["leads"]]
    plots: dict[str, str] = {}
    if training_csv is not None and Path(training_csv).is_file():
        plots["training_curves"] = plot_training_curves(training_csv, out / "training_curves.png")
    if metrics["task"] == CLASSIFY:
        y_true = np.asarray(predictions["y_true"], dtype=np.int64)
        y_prob = np.asarray(predictions["y_prob"], dtype=np.float64)
        keep = y_true >= 0
        classes = list(metrics["classes"])
        plots["confusion_matrix"] = plot_confusion_matrix(metrics["confusion_matrix"], classes,
                                                          out / "confusion_matrix.png")
        plots["roc"] = plot_roc_curves(y_true[keep], y_prob[keep], classes, out / "roc.png")
        if signals is not None:
            rows = _display_rows(patients, y_true, per_group=3, total=12)
            windows = np.stack([np.asarray(signals[int(indices[r])]) for r in rows])
            plots["windows"] = plot_rhythm_windows(windows, y_true[rows], y_prob[rows], classes, rate, leads[0],
                                                   out / "windows.png")
    else:
        plots["errors"] = plot_forecast_errors(metrics, out / "errors.png")
        rows = _display_rows(patients, None, per_group=6, total=6)
        context = np.asarray(predictions["context"])[rows]
        y_true = np.asarray(predictions["y_true"])[rows]
        shown, _ = baseline_forecasts(context, y_true.shape[2], rate)
        plots["windows"] = plot_forecast_windows(context, y_true, {"model": np.asarray(predictions["y_pred"])[rows],
                                                                   **shown}, rate, leads, out / "windows.png")
    data_info = {"split": split, "n_windows": int(indices.size), "n_patients": metrics["n_patients"],
                 "rate_hz": rate, "leads": len(leads), "window_s": float(attrs["window"]) / rate,
                 "content_hash": attrs.get("content_hash"), "store_kind": attrs.get("kind")}
    write_signal_report(out, metrics=metrics, plots=plots, model_info=dict(model_info or {}), data_info=data_info)
    return metrics


# ---- from a checkpoint ---------------------------------------------------------------------------------------------


def _training_seconds(run_dir: Path) -> float | None:
    """Training time of a run: summary.json "seconds" when recorded, else the sum of metrics.csv's seconds."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            seconds = json.loads(summary.read_text()).get("seconds")
        except (OSError, ValueError):
            seconds = None
        if isinstance(seconds, (int, float)):
            return float(seconds)
    csv_path = run_dir / "metrics.csv"
    if csv_path.is_file():
        from medpipe.evaluation.plots import _read_numeric_csv

        col = _read_numeric_csv(csv_path).get("seconds")
        if col is not None:
            return float(np.nansum(col))
    return None


def load_checked_signal_model(store_url: str, model_path: str | Path
                              ) -> tuple[Any, dict[str, Any], dict[str, Any], Path, Path]:
    """(model, checkpoint metadata, store attributes, checkpoint path, run folder) of a signal checkpoint (a run
    folder -> its best.pt, or a .pt file) trained on this store; a one-line TrainingError otherwise (no checkpoint,
    not a signal model, another store). The CLI calls it before any flow starts."""
    from medpipe.evaluation.evaluate import resolve_checkpoint
    from medpipe.signals.store import signal_attrs
    from medpipe.signals.train import load_signal_model
    from medpipe.training import CheckpointMismatchError

    checkpoint, run_dir = resolve_checkpoint(model_path)
    attrs = signal_attrs(store_url)
    model, meta = load_signal_model(checkpoint)
    trained_on = meta.get("store_content_hash")
    if trained_on and trained_on != attrs.get("content_hash"):
        raise CheckpointMismatchError(f"{checkpoint.name} was trained on a different store (content hash "
                                      f"{str(trained_on)[:12]}…, this store {str(attrs.get('content_hash'))[:12]}…)")
    return model, meta, attrs, checkpoint, run_dir


def evaluate_signal_checkpoint(store_url: str, model_path: str | Path, out_dir: str | Path, *, split: str = "test",
                               n_boot: int = 1000, device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Evaluate a signal checkpoint (a run folder -> its best.pt, or a .pt file) on ``split`` of its signals store:
    writes metrics.json, report.html and PNGs in ``out_dir``; returns the metrics (see :func:`signal_metrics`)."""
    from medpipe.signals.store import open_signals, read_window_table
    from medpipe.signals.train import predict_signals

    model, meta, attrs, checkpoint, run_dir = load_checked_signal_model(store_url, model_path)
    predictions = predict_signals(model, store_url, split, device=device)
    model_info = {"model_name": meta.get("model_name"), "task": getattr(meta.get("task"), "value", meta.get("task")),
                  "params": int(sum(p.numel() for p in model.parameters())), "epoch": meta.get("epoch"),
                  "code_version": meta.get("code_version"), "config": meta.get("config"),
                  "checkpoint": checkpoint.name, "train_seconds": _training_seconds(run_dir)}
    return evaluate_predictions(predictions, read_window_table(store_url), attrs, out_dir,
                                signals=open_signals(store_url), split=split, n_boot=n_boot, seed=seed,
                                model_info=model_info, training_csv=run_dir / "metrics.csv")
