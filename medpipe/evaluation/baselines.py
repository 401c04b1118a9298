"""Simple baselines evaluated beside every model, on the same cases, metrics and bootstrap resamples.

A network is only worth its cost if it beats what a few lines of classical image analysis already achieve.

* Classification
  - ``majority``: always predicts the most frequent class of the TRAIN split (ties: lowest class index).
  - ``intensity_logreg``: a scikit-learn logistic regression on per-image intensity statistics
    (:func:`intensity_features`), standardised and fitted on TRAIN; its regularisation ``C`` is chosen on VAL by
    log loss (never on test). Without a usable VAL split (empty, or one class only) ``C = 1.0`` is used, and the
    result says so.
* Segmentation
  - ``otsu``: an Otsu threshold computed per image (scikit-image); the rule — foreground above or below the
    Otsu threshold, or above the upper / below the lower of two multi-Otsu thresholds — is chosen on TRAIN by
    mean foreground Dice. Foreground is predicted as class 1.

Each baseline's metrics come from :mod:`medpipe.evaluation.metrics` and its intervals from
:func:`medpipe.evaluation.bootstrap.with_confidence_intervals` with the model's ``n_boot``/``seed``, so the
resamples are the same test cases as the model's; model-minus-baseline differences get paired bootstrap CIs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from medpipe.evaluation.bootstrap import (
    batched_accuracy,
    batched_auroc,
    batched_f1_macro,
    bootstrap_ci,
    with_confidence_intervals,
)
from medpipe.evaluation.metrics import classification_metrics, mean_foreground_dice, segmentation_metrics
from medpipe.store import SPLIT_CODES, get_array, get_group, open_store, read_sample_table
from medpipe.task import Task

__all__ = [
    "C_GRID",
    "FEATURE_NAMES",
    "OTSU_RULES",
    "classification_baselines",
    "fit_intensity_logreg",
    "intensity_features",
    "majority_class",
    "otsu_masks",
    "paired_differences",
    "segmentation_baselines",
]

C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
DEFAULT_C = 1.0
OTSU_RULES: tuple[str, ...] = ("above", "below", "above_upper", "below_lower")
MAX_TRAIN_OTSU = 512  # train cases (seeded subset) used to choose the Otsu rule
_PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
FEATURE_NAMES: tuple[str, ...] = ("mean", "std", "min", "max", *(f"p{q}" for q in _PERCENTILES), "skewness",
                                  "kurtosis", "frac_above_mean_2sd", "frac_above_mean_3sd")
CLASSIFICATION_KEYS = (("accuracy", "Accuracy"), ("f1_macro", "Macro F1"), ("auroc", "AUROC"))
SEGMENTATION_KEYS = (("dice_mean", "Mean Dice"), ("iou_mean", "Mean IoU"), ("hd95_mean", "Mean HD95"))


# ---- reading ---------------------------------------------------------------------------------------------------------


def _iter_rows(arr: Any, indices: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions into ``indices``, rows) blocks of ``arr[indices]``, reading each covering chunk once.

    Within a block, rows are in ascending store-index order (so ``indices[positions]`` is sorted).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return
    c = int(arr.chunks[0])
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    chunk_of = sorted_idx // c
    for cid in np.unique(chunk_of):
        sel = chunk_of == cid
        lo = int(cid) * c
        block = np.asarray(arr[lo : min(lo + c, arr.shape[0])])
        yield order[sel], block[sorted_idx[sel] - lo]


def _split_indices(table: Mapping[str, np.ndarray], split: str) -> np.ndarray:
    return np.flatnonzero(np.asarray(table["split"]) == SPLIT_CODES[split]).astype(np.int64)


# ---- classification --------------------------------------------------------------------------------------------------


def intensity_features(images: np.ndarray) -> np.ndarray:
    """(N, F) float64 intensity statistics of (N, C, *spatial) images, F = len(FEATURE_NAMES).

    Mean, std, min, max, percentiles 1..99, skewness, excess kurtosis and the fractions of elements above
    mean + 2 sd / mean + 3 sd, over all channels and elements of each image (no spatial information).
    """
    x = np.asarray(images, dtype=np.float64)
    if x.shape[0] == 0:
        return np.zeros((0, len(FEATURE_NAMES)))
    x = x.reshape(x.shape[0], -1)
    mean = x.mean(axis=1)
    std = x.std(axis=1)
    safe = np.where(std > 1e-12, std, 1.0)
    z = (x - mean[:, None]) / safe[:, None]
    pct = np.percentile(x, _PERCENTILES, axis=1).T
    feats = np.column_stack([
        mean, std, x.min(axis=1), x.max(axis=1), pct,
        (z**3).mean(axis=1), (z**4).mean(axis=1) - 3.0, (z > 2).mean(axis=1), (z > 3).mean(axis=1),
    ])
    return feats


def majority_class(train_labels: np.ndarray, num_classes: int) -> int:
    """Most frequent label in ``train_labels`` (N,) among 0..num_classes-1 (unlabelled -1 ignored; ties: lowest)."""
    labels = np.asarray(train_labels, dtype=np.int64)
    labels = labels[(labels >= 0) & (labels < num_classes)]
    if labels.size == 0:
        raise ValueError("the train split has no labelled cases: no majority class")
    return int(np.bincount(labels, minlength=num_classes).argmax())


def _logreg(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def _proba(model: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities; classes the model never saw in training get 0."""
    p = np.zeros((x.shape[0], num_classes))
    p[:, model.classes_.astype(np.int64)] = model.predict_proba(x)
    return p


def fit_intensity_logreg(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                         num_classes: int, c_grid: Sequence[float] = C_GRID) -> tuple[Any, dict[str, Any]]:
    """Fit standardised logistic regression on (N, F) train features; choose C on val by log loss.

    Returns (fitted sklearn pipeline, tuning record {"C", "chosen_on", "val_log_loss" by C, "note"}). Raises
    ValueError when the train labels hold fewer than two classes.
    """
    from sklearn.metrics import log_loss

    y_train = np.asarray(y_train, dtype=np.int64)
    y_val = np.asarray(y_val, dtype=np.int64)
    if np.unique(y_train).size < 2:
        raise ValueError("the train split holds fewer than two classes: logistic regression cannot be fitted")
    tuning: dict[str, Any] = {"c_grid": [float(c) for c in c_grid], "criterion": "validation log loss"}
    usable_val = y_val.size > 0 and np.unique(y_val).size >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on separable data; the fit is still usable
        if not usable_val:
            why = "the validation split is empty" if y_val.size == 0 else "the validation split holds one class only"
            tuning.update(C=DEFAULT_C, chosen_on="default",
                          note=f"C was not tuned because {why}; the default C = {DEFAULT_C:g} was used.")
            return _logreg(DEFAULT_C).fit(x_train, y_train), tuning
        losses: dict[str, float] = {}
        best: tuple[float, float] | None = None
        for c in c_grid:
            model = _logreg(float(c)).fit(x_train, y_train)
            loss = float(log_loss(y_val, np.clip(_proba(model, x_val, num_classes), 1e-7, 1.0),
                                  labels=list(range(num_classes))))
            losses[f"{c:g}"] = loss
            if best is None or loss < best[0] - 1e-12:
                best = (loss, float(c))
        assert best is not None
        tuning.update(C=best[1], chosen_on="val", val_log_loss=losses,
                      note=f"C = {best[1]:g} chosen on the validation split ({int(y_val.size)} cases) by log loss.")
        return _logreg(best[1]).fit(x_train, y_train), tuning


def _features_of(images: Any, indices: np.ndarray) -> np.ndarray:
    out = np.zeros((len(indices), len(FEATURE_NAMES)))
    for pos, rows in _iter_rows(images, indices):
        out[pos] = intensity_features(rows)
    return out


def classification_baselines(store_url: str, indices: np.ndarray, y_true: np.ndarray, classes: Sequence[str], *,
                             model_prob: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0
                             ) -> dict[str, dict[str, Any]]:
    """Majority-class and intensity-logistic-regression baselines on the store rows ``indices`` (N,).

    ``y_true`` (N,) are the labels of those rows (all >= 0). Fitting uses the store's train split (C chosen on
    val). Returns {name: {"title", "description", "tuning", "metrics" (with "ci"), "difference"}}; "difference"
    (model minus baseline, paired bootstrap CI) only when ``model_prob`` (N, K) is given.
    """
    root = open_store(store_url)
    table = read_sample_table(root)
    labels = np.asarray(get_array(root, "training/labels")[...], dtype=np.int64)
    k = len(classes)
    y_true = np.asarray(y_true, dtype=np.int64)
    train = _split_indices(table, "train")
    train = train[(labels[train] >= 0) & (labels[train] < k)]
    val = _split_indices(table, "val")
    val = val[(labels[val] >= 0) & (labels[val] < k)]
    out: dict[str, dict[str, Any]] = {}
    if train.size == 0:
        return out
    kw: dict[str, Any] = {"n_boot": n_boot, "seed": seed}

    major = majority_class(labels[train], k)
    prob = np.zeros((y_true.size, k))
    prob[:, major] = 1.0
    out["majority"] = _classification_entry(
        "Majority class", f"always predicts '{classes[major]}', the most frequent class of the train split "
        f"({int((labels[train] == major).sum())} of {train.size} train cases); its scores are constant, so its "
        "AUROC is 0.5", {"class": classes[major], "chosen_on": "train"}, y_true, prob, classes, model_prob, kw)

    images = get_array(root, "training/images")
    try:
        model, tuning = fit_intensity_logreg(_features_of(images, train), labels[train], _features_of(images, val),
                                             labels[val], k)
    except ValueError as exc:
        out["intensity_logreg"] = {"title": "Intensity logistic regression", "skipped": str(exc)}
        return out
    prob = _proba(model, _features_of(images, np.asarray(indices, dtype=np.int64)), k)
    out["intensity_logreg"] = _classification_entry(
        "Intensity logistic regression",
        f"logistic regression on {len(FEATURE_NAMES)} per-image intensity statistics (mean, sd, min/max, "
        "percentiles, skewness, kurtosis, bright-pixel fractions), fitted on the train split; no spatial "
        "information", tuning, y_true, prob, classes, model_prob, kw)
    return out


def _classification_entry(title: str, description: str, tuning: dict[str, Any], y_true: np.ndarray,
                          prob: np.ndarray, classes: Sequence[str], model_prob: np.ndarray | None,
                          kw: dict[str, Any]) -> dict[str, Any]:
    metrics = with_confidence_intervals(classification_metrics(y_true, prob, list(classes)), y_true, prob, **kw)
    entry = {"title": title, "description": description, "tuning": tuning, "metrics": metrics}
    if model_prob is not None:
        entry["difference"] = paired_differences(Task.classify, y_true, model_prob, prob, **kw)
    return entry


# ---- segmentation ----------------------------------------------------------------------------------------------------


def otsu_masks(images: np.ndarray, rule: str) -> np.ndarray:
    """(N, 1, *spatial) uint8 masks (1 = foreground) of (N, C, *spatial) images by a per-image Otsu rule.

    ``rule``: "above"/"below" the Otsu threshold, "above_upper" the upper or "below_lower" the lower of the two
    3-class multi-Otsu thresholds. Channels are averaged first; a constant image gives an empty mask.
    """
    from skimage.filters import threshold_multiotsu, threshold_otsu

    if rule not in OTSU_RULES:
        raise ValueError(f"unknown Otsu rule {rule!r}; use one of {OTSU_RULES}")
    images = np.asarray(images, dtype=np.float32)
    out = np.zeros((images.shape[0], 1, *images.shape[2:]), dtype=np.uint8)
    for i, img in enumerate(images):
        x = img.mean(axis=0)
        if not np.isfinite(x).all() or float(x.max()) <= float(x.min()):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if rule in ("above", "below"):
                t = float(threshold_otsu(x))
                fg = x > t if rule == "above" else x <= t
            else:
                try:
                    lo, hi = (float(v) for v in threshold_multiotsu(x, classes=3))
                except ValueError:  # too few distinct values for two thresholds
                    continue
                fg = x > hi if rule == "above_upper" else x <= lo
        out[i, 0] = fg
    return out


def _choose_otsu_rule(images: Any, masks: Any, train: np.ndarray, seed: int) -> dict[str, Any]:
    if train.size > MAX_TRAIN_OTSU:
        train = np.sort(np.random.default_rng(seed).choice(train, MAX_TRAIN_OTSU, replace=False))
    scores = {rule: 0.0 for rule in OTSU_RULES}
    for pos, rows in _iter_rows(images, train):  # rows come in ascending store order
        true = (np.asarray(masks.oindex[train[pos]]) > 0).astype(np.uint8)
        for rule in OTSU_RULES:
            scores[rule] += mean_foreground_dice(otsu_masks(rows, rule), true, 2) * len(pos)
    scores = {r: s / max(train.size, 1) for r, s in scores.items()}
    best = max(OTSU_RULES, key=lambda r: scores[r])  # first listed wins ties
    return {"rule": best, "chosen_on": "train", "train_cases": int(train.size), "train_mean_dice": scores,
            "note": f"rule '{best}' chosen on {int(train.size)} train cases by mean foreground Dice."}


def segmentation_baselines(store_url: str, indices: np.ndarray, masks_true: np.ndarray, num_classes: int, *,
                           spacing: float | Sequence[float] | None = None, model_pred: np.ndarray | None = None,
                           n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Otsu baseline on the store rows ``indices`` (N,), scored against ``masks_true`` (N, 1, *spatial).

    The rule is chosen on the store's train split; metrics/HD95 ``spacing`` as for the model. Returns
    {"otsu": {"title", "description", "tuning", "metrics" (with "ci"), "difference"}} ("difference" needs
    ``model_pred`` (N, 1, *spatial)); {} when the train split is empty.
    """
    root = open_store(store_url)
    table = read_sample_table(root)
    train = _split_indices(table, "train")
    if train.size == 0 or "masks" not in get_group(root, "training"):
        return {}
    images, masks = get_array(root, "training/images"), get_array(root, "training/masks")
    tuning = _choose_otsu_rule(images, masks, train, seed)
    indices = np.asarray(indices, dtype=np.int64)
    pred = np.zeros(np.shape(masks_true), dtype=np.uint8)
    for pos, rows in _iter_rows(images, indices):
        pred[pos] = otsu_masks(rows, tuning["rule"])
    metrics = segmentation_metrics(pred, masks_true, spacing=spacing, num_classes=num_classes)
    if num_classes > 2:
        metrics["notes"].append("The Otsu baseline is binary: all its foreground is labelled class 1.")
    kw: dict[str, Any] = {"n_boot": n_boot, "seed": seed}
    entry: dict[str, Any] = {
        "title": "Otsu threshold",
        "description": "a per-image Otsu intensity threshold (scikit-image), with the side taken as foreground "
                       "chosen on the train split; no learning beyond that choice",
        "tuning": tuning, "metrics": with_confidence_intervals(metrics, **kw)}
    if model_pred is not None:
        model_metrics = segmentation_metrics(model_pred, masks_true, spacing=spacing, num_classes=num_classes)
        entry["difference"] = paired_differences(Task.segment, model_metrics["per_sample"], metrics["per_sample"],
                                                 **kw)
    return {"otsu": entry}


# ---- paired model-minus-baseline differences ------------------------------------------------------------------------


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=-1)


def paired_differences(task: Task, a: Any, b: Any, c: Any = None, *, n_boot: int = 1000, seed: int = 0,
                       alpha: float = 0.05) -> dict[str, dict[str, float]]:
    """Model-minus-baseline differences with paired percentile-bootstrap CIs (same resampled cases for both).

    ``Task.classify``: ``a`` = y_true (N,), ``b`` = model y_prob (N, K), ``c`` = baseline y_prob (N, K); keys
    accuracy, f1_macro, auroc. ``Task.segment``: ``a``/``b`` = model/baseline ``per_sample`` dicts (dice, iou,
    hd95 lists); keys dice_mean, iou_mean, hd95_mean (HD95 over cases defined for both). Entries {value, low, high}.
    """
    out: dict[str, dict[str, float]] = {}
    kw: dict[str, Any] = {"n_boot": n_boot, "seed": seed, "alpha": alpha, "batched": True}
    if task == Task.classify:
        y = np.asarray(a, dtype=np.int64)
        pm, pb = np.asarray(b, dtype=np.float64), np.asarray(c, dtype=np.float64)
        fns: dict[str, Callable[..., np.ndarray]] = {"accuracy": batched_accuracy, "f1_macro": batched_f1_macro,
                                                     "auroc": batched_auroc}
        for key, fn in fns.items():
            def diff(yy: np.ndarray, m: np.ndarray, bb: np.ndarray, fn: Callable[..., np.ndarray] = fn) -> np.ndarray:
                return fn(yy, m) - fn(yy, bb)

            value = float(diff(y[None], pm[None], pb[None])[0])
            low, high = bootstrap_ci(diff, y, pm, pb, **kw)
            out[key] = {"value": value, "low": low, "high": high}
        return out
    if task != Task.segment:
        raise ValueError(f"unknown task {task!r}")
    for key, col in (("dice_mean", "dice"), ("iou_mean", "iou"), ("hd95_mean", "hd95")):
        d = np.asarray(a[col], dtype=np.float64) - np.asarray(b[col], dtype=np.float64)
        if not np.isfinite(d).any():
            out[key] = {"value": math.nan, "low": math.nan, "high": math.nan}
            continue
        low, high = bootstrap_ci(_nanmean_rows, d, **kw)
        out[key] = {"value": float(np.nanmean(d)), "low": low, "high": high}
    return out
