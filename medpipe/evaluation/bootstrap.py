"""Percentile-bootstrap confidence intervals (resampling test cases with replacement).

:func:`bootstrap_ci` takes any metric; with ``batched=True`` the metric receives all resamples at once
(arrays of shape (B, N, ...)) and returns B values, which is how the built-in accuracy / macro-F1 / AUROC /
mean-Dice intervals stay well under a second for 1000 resamples of 1000 cases.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import rankdata

from medpipe.task import Task

__all__ = [
    "batched_accuracy",
    "batched_auroc",
    "batched_f1_macro",
    "bootstrap_ci",
    "with_confidence_intervals",
]

NAN = float("nan")


def bootstrap_ci(
    metric_fn: Callable[..., Any],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    batched: bool = False,
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` of ``metric_fn(*arrays)`` at level ``1 - alpha``.

    Cases (the first axis of every array) are resampled with replacement ``n_boot`` times. Resamples where the
    metric is undefined (NaN, or it raises ValueError) are skipped; ``(nan, nan)`` if fewer than half are usable.
    ``batched=True``: ``metric_fn`` gets arrays of shape (n_boot, N, ...) and returns ``n_boot`` values.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    arrays = tuple(np.asarray(a) for a in arrays)
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError("all arrays must have the same first dimension")
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample (N=0)")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    if batched:
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            values = np.asarray(metric_fn(*(a[idx] for a in arrays)), dtype=np.float64).reshape(n_boot)
    else:
        values = np.empty(n_boot)
        for b in range(n_boot):
            try:
                values[b] = float(metric_fn(*(a[idx[b]] for a in arrays)))
            except ValueError:
                values[b] = NAN
    values = values[np.isfinite(values)]
    if values.size < max(1, n_boot // 2):
        return NAN, NAN
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# ---- vectorised metrics over a batch of resamples: y_true (B, N) int, y_prob (B, N, K) --------------------------


def batched_accuracy(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """Accuracy of argmax predictions for each resample."""
    return (y_prob.argmax(axis=-1) == y_true).mean(axis=1)


def _batched_confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    b = y_true.shape[0]
    flat = (np.arange(b)[:, None] * k * k + y_true * k + y_pred).ravel()
    return np.bincount(flat, minlength=b * k * k).reshape(b, k, k)


def batched_f1_macro(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """Macro F1 per resample, averaging over classes present in truth or prediction (as torchmetrics does)."""
    k = y_prob.shape[-1]
    cm = _batched_confusion(y_true, y_prob.argmax(axis=-1), k).astype(np.float64)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    fp = cm.sum(axis=1) - tp
    fn = cm.sum(axis=2) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    active = denom > 0
    return (f1 * active).sum(axis=1) / np.maximum(active.sum(axis=1), 1)


def _batched_binary_auroc(pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC per row (ties count 1/2); NaN where a row has no positives or no negatives."""
    ranks = rankdata(score, axis=1)
    n_pos = pos.sum(axis=1).astype(np.float64)
    n_neg = pos.shape[1] - n_pos
    rank_sum = (ranks * pos).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = NAN
    return auc


def batched_auroc(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """Binary AUROC of class 1 (K=2) or one-vs-rest macro AUROC over defined classes (K>2), per resample."""
    k = y_prob.shape[-1]
    if k == 2:
        return _batched_binary_auroc(y_true == 1, y_prob[..., 1])
    per_class = np.stack([_batched_binary_auroc(y_true == c, y_prob[..., c]) for c in range(k)], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(per_class, axis=1)


def _batched_nanmean(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=1)


def _ci_entry(low: float, high: float, n_boot: int, alpha: float, unit: str) -> dict[str, Any]:
    return {
        "low": low,
        "high": high,
        "level": 1 - alpha,
        "n_boot": n_boot,
        "method": f"percentile bootstrap, resampling test {unit} with replacement",
    }


def with_confidence_intervals(
    metrics: dict[str, Any],
    y_true: np.ndarray | None = None,
    y_prob: np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Return a copy of ``metrics`` with a ``"ci"`` block of ``{low, high, level, n_boot, method}`` entries.

    ``metrics["task"]`` is a :class:`~medpipe.task.Task`. ``Task.classify`` (needs ``y_true`` (N,) and ``y_prob``
    (N, K)): accuracy, f1_macro, auroc. ``Task.segment``: dice_mean, iou_mean and hd95_mean, resampled from
    ``metrics["per_sample"]``. The same ``seed``/``n_boot`` draw the same resamples for every model evaluated on
    the same N cases, so intervals of a model and of its baselines are paired.
    """
    out = copy.deepcopy(metrics)
    ci: dict[str, Any] = {}
    kw: dict[str, Any] = {"n_boot": n_boot, "alpha": alpha, "seed": seed, "batched": True}
    task = metrics.get("task")
    if task == Task.classify:
        if y_true is None or y_prob is None:
            raise ValueError("classification confidence intervals need y_true and y_prob")
        y_true = np.asarray(y_true, dtype=np.int64)
        y_prob = np.asarray(y_prob, dtype=np.float64)
        for name, fn in (("accuracy", batched_accuracy), ("f1_macro", batched_f1_macro), ("auroc", batched_auroc)):
            ci[name] = _ci_entry(*bootstrap_ci(fn, y_true, y_prob, **kw), n_boot, alpha, "images")
    elif task == Task.segment:
        per_sample = metrics["per_sample"]
        for name, key in (("dice_mean", "dice"), ("iou_mean", "iou"), ("hd95_mean", "hd95")):
            vals = np.asarray(per_sample[key], dtype=np.float64)
            ci[name] = _ci_entry(*bootstrap_ci(_batched_nanmean, vals, **kw), n_boot, alpha, "cases")
    else:
        raise ValueError(f"unknown task {task!r}: expected one of {[t.value for t in Task]}")
    out["ci"] = ci
    return out
