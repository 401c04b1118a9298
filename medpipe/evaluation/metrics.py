"""Point estimates for classification and segmentation test sets.

Everything returned is plain Python (floats, ints, lists, dicts, ``None`` or NaN) so it can be written to JSON by
:func:`medpipe.evaluation.report.to_jsonable`. Undefined values are NaN here and become ``null`` in JSON.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, multiclass_confusion_matrix

from medpipe.task import Task

NAN = float("nan")

__all__ = [
    "auroc_per_class",
    "classification_metrics",
    "dice_iou",
    "mean_foreground_dice",
    "segmentation_metrics",
]


def _check_classification_inputs(y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.ndim != 1:
        raise ValueError(f"y_true must have shape (N,), got {y_true.shape}")
    if y_true.shape[0] == 0:
        raise ValueError("cannot compute metrics on an empty test set (N=0)")
    k = len(classes)
    if k < 2:
        raise ValueError(f"need at least 2 classes, got {k}")
    if y_prob.shape != (y_true.shape[0], k):
        raise ValueError(f"y_prob must have shape (N, K)=({y_true.shape[0]}, {k}), got {y_prob.shape}")
    if not np.all(np.isfinite(y_prob)):
        raise ValueError("y_prob contains NaN or infinite values")
    if np.any(y_true < 0) or np.any(y_true >= k) or not np.all(np.equal(np.mod(y_true, 1), 0)):
        raise ValueError(f"y_true must hold integer labels in [0, {k - 1}]")
    return y_true.astype(np.int64), y_prob


def auroc_per_class(y_true: np.ndarray, y_prob: np.ndarray) -> list[float]:
    """One-vs-rest AUROC for each class; NaN for a class that has no positives or no negatives in ``y_true``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    out: list[float] = []
    for k in range(y_prob.shape[1]):
        pos = y_true == k
        if pos.all() or not pos.any():
            out.append(NAN)
            continue
        out.append(float(binary_auroc(torch.from_numpy(y_prob[:, k]), torch.from_numpy(pos.astype(np.int64)))))
    return out


def classification_metrics(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro/per-class precision, recall, F1, AUROC, confusion matrix and support.

    ``y_true`` is (N,) integer labels, ``y_prob`` (N, K) class probabilities, ``classes`` the K class names.
    Binary tasks report the AUROC of class index 1; multi-class tasks the one-vs-rest macro AUROC over the classes
    for which it is defined. Predicted label = argmax of ``y_prob``.
    """
    y_true, y_prob = _check_classification_inputs(y_true, y_prob, classes)
    k = len(classes)
    n = int(y_true.shape[0])
    preds = torch.from_numpy(y_prob)
    target = torch.from_numpy(y_true)
    kw: dict[str, Any] = {"num_classes": k, "validate_args": False}

    # Confusion matrix from torchmetrics; rates derived from it in float64 (torchmetrics' own rates are float32),
    # with torchmetrics' conventions: zero_division -> 0, macro over classes present in truth or prediction.
    cm = multiclass_confusion_matrix(preds, target, **kw).to(torch.int64).numpy()
    tp = np.diag(cm).astype(np.float64)
    col = cm.sum(axis=0).astype(np.float64)
    row = cm.sum(axis=1).astype(np.float64)
    accuracy = float(tp.sum() / n)
    prec = np.divide(tp, col, out=np.zeros(k), where=col > 0).tolist()
    rec = np.divide(tp, row, out=np.zeros(k), where=row > 0).tolist()
    f1 = np.divide(2 * tp, row + col, out=np.zeros(k), where=(row + col) > 0).tolist()
    support = np.bincount(y_true, minlength=k)
    predicted = cm.sum(axis=0)
    # torchmetrics' macro average leaves out classes that are neither in y_true nor predicted; mirror that here
    # (and in the bootstrap) so a class that simply does not occur does not drag the mean to 0.
    active = (support + predicted) > 0
    notes: list[str] = []

    auc = auroc_per_class(y_true, y_prob)
    for c, name in enumerate(classes):
        if support[c] == 0:
            notes.append(f"Class '{name}' has no cases in the test set: its AUROC and recall are undefined.")
        elif support[c] == n:
            notes.append(f"Every test case is class '{name}': AUROC is undefined for it.")
    if k == 2:
        auroc = auc[1]
        auroc_average = f"binary, positive class '{classes[1]}'"
    else:
        defined = [a for a in auc if not math.isnan(a)]
        auroc = float(np.mean(defined)) if defined else NAN
        auroc_average = f"one-vs-rest macro over {len(defined)} of {k} classes with both positive and negative cases"
    if math.isnan(auroc):
        notes.append("AUROC is undefined: the test set needs cases from more than one class.")

    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(classes):
        per_class[name] = {
            "precision": float(prec[c]) if predicted[c] > 0 else NAN,
            "recall": float(rec[c]) if support[c] > 0 else NAN,
            "f1": float(f1[c]) if support[c] + predicted[c] > 0 else NAN,
            "auroc": auc[c],
            "support": int(support[c]),
            "predicted": int(predicted[c]),
        }
    for c, name in enumerate(classes):
        if predicted[c] == 0 and support[c] > 0:
            notes.append(f"The model never predicted class '{name}': its precision is undefined (counted as 0 in the macro mean).")

    def _macro(values: list[float]) -> float:
        return float(np.mean([v for v, a in zip(values, active) if a]))

    return {
        "task": Task.classify,
        "n": n,
        "classes": list(classes),
        "accuracy": accuracy,
        "precision_macro": _macro(prec),
        "recall_macro": _macro(rec),
        "f1_macro": _macro(f1),
        "auroc": auroc,
        "auroc_average": auroc_average,
        "per_class": per_class,
        "support": {name: int(support[c]) for c, name in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_axes": "rows = true class, columns = predicted class",
        "notes": notes,
    }


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, 1, ...) integer labels -> (N, C, ...) boolean one-hot."""
    lab = labels[:, 0]
    return np.stack([lab == c for c in range(num_classes)], axis=1)


def dice_iou(pred_oh: np.ndarray, true_oh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU per (sample, channel) from boolean one-hot arrays (N, C, ...); empty-vs-empty scores 1.0."""
    axes = tuple(range(2, pred_oh.ndim))
    inter = np.logical_and(pred_oh, true_oh).sum(axis=axes).astype(np.float64)
    p = pred_oh.sum(axis=axes).astype(np.float64)
    t = true_oh.sum(axis=axes).astype(np.float64)
    union = p + t - inter
    empty = (p + t) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(empty, 1.0, 2.0 * inter / np.where(empty, 1.0, p + t))
        iou = np.where(empty, 1.0, inter / np.where(empty, 1.0, union))
    return dice, iou


def mean_foreground_dice(pred: np.ndarray, true: np.ndarray, num_classes: int) -> float:
    """Mean Dice over samples and foreground classes 1..num_classes-1 of integer label maps.

    ``pred``/``true`` are (N, 1, *spatial) (or (N, *spatial)) integer label maps of the same shape. Each
    (sample, class) pair is scored with :func:`dice_iou`, so a class absent from both prediction and ground truth
    scores 1.0 (empty-vs-empty convention, the same as the evaluation report); the result is the plain mean of the
    N x (num_classes - 1) scores. NaN for N = 0.
    """
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {pred.shape} and {true.shape}")
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2 (background + at least one foreground class)")
    if pred.ndim < 2:
        raise ValueError(f"expected (N, *spatial) label maps, got shape {pred.shape}")
    if pred.shape[0] == 0:
        return NAN
    if pred.ndim < 4 or pred.shape[1] != 1:
        pred, true = pred[:, None], true[:, None]
    dice, _ = dice_iou(_one_hot(pred, num_classes)[:, 1:], _one_hot(true, num_classes)[:, 1:])
    return float(dice.mean())


def segmentation_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    spacing: float | Sequence[float] | Sequence[Sequence[float]] | None = None,
    num_classes: int = 2,
) -> dict[str, Any]:
    """Per-sample and mean Dice, IoU and HD95 over the foreground classes (1..num_classes-1).

    ``pred``/``true`` are (N, 1, *spatial) integer label maps. Dice/IoU of an empty prediction against an empty
    ground truth is 1.0. HD95 (via MONAI) is NaN when either mask is empty and such cases are excluded from its
    mean, with the number excluded reported. ``spacing`` is the size of one array element along each spatial axis
    (a scalar, one sequence of len(spatial), or one such sequence per sample) in mm, and HD95 is then in mm;
    ``None`` measures HD95 in array elements ("pixels" for 2D, "voxels" for 3D), recorded in ``hd95_units``.
    """
    from monai.metrics import compute_hausdorff_distance

    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {pred.shape} and {true.shape}")
    if pred.ndim < 4 or pred.shape[1] != 1:
        raise ValueError(f"expected (N, 1, *spatial) label maps with 2 or 3 spatial dims, got {pred.shape}")
    if pred.shape[0] == 0:
        raise ValueError("cannot compute metrics on an empty test set (N=0)")
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2 (background + at least one foreground class)")
    for name, arr in (("pred", pred), ("true", true)):
        if arr.min() < 0 or arr.max() >= num_classes:
            raise ValueError(f"{name} labels must be in [0, {num_classes - 1}]")

    n_spatial = pred.ndim - 2
    if spacing is not None and not np.isscalar(spacing) and np.shape(spacing)[-1] != n_spatial:
        raise ValueError(f"spacing must give {n_spatial} values per sample for {n_spatial}D label maps, "
                         f"got shape {np.shape(spacing)}")
    pred_oh = _one_hot(pred, num_classes)[:, 1:]
    true_oh = _one_hot(true, num_classes)[:, 1:]
    dice, iou = dice_iou(pred_oh, true_oh)

    axes = tuple(range(2, pred_oh.ndim))
    either_empty = np.asarray(~(pred_oh.any(axis=axes) & true_oh.any(axis=axes)))  # (N, C-1) bool
    hd = np.full(dice.shape, NAN)
    ok = ~either_empty.all(axis=1)  # samples with at least one class where both masks are non-empty
    if ok.any():
        sp = spacing
        if spacing is not None and not np.isscalar(spacing) and np.ndim(spacing) == 2:
            per_sample_spacing = cast(Sequence[Sequence[float]], spacing)
            sp = [per_sample_spacing[int(i)] for i in np.flatnonzero(ok)]  # per-sample spacing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = compute_hausdorff_distance(
                torch.from_numpy(pred_oh[ok].astype(np.uint8)),
                torch.from_numpy(true_oh[ok].astype(np.uint8)),
                include_background=True,
                percentile=95,
                spacing=sp,
            ).numpy().astype(np.float64)
        hd[ok] = res
    hd[either_empty] = NAN

    n, n_fg = dice.shape
    sample_dice = dice.mean(axis=1)
    sample_iou = iou.mean(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sample_hd = np.nanmean(hd, axis=1)  # NaN only if no class had both masks non-empty
    excluded = int(np.isnan(sample_hd).sum())
    per_class = {}
    for c in range(n_fg):
        col = hd[:, c]
        per_class[str(c + 1)] = {
            "dice_mean": float(dice[:, c].mean()),
            "iou_mean": float(iou[:, c].mean()),
            "hd95_mean": float(np.nanmean(col)) if (~np.isnan(col)).any() else NAN,
            "hd95_excluded": int(np.isnan(col).sum()),
        }
    notes = [
        "Dice and IoU of an empty prediction against an empty ground truth count as 1.0.",
        f"HD95 is undefined when the prediction or the ground truth is empty; {excluded} of {n} cases were "
        "excluded from its mean.",
    ]
    return {
        "task": Task.segment,
        "n": int(n),
        "num_classes": int(num_classes),
        "foreground_classes": list(range(1, num_classes)),
        "dice_mean": float(sample_dice.mean()),
        "iou_mean": float(sample_iou.mean()),
        "hd95_mean": float(np.nanmean(sample_hd)) if excluded < n else NAN,
        "hd95_excluded": excluded,
        "hd95_units": ("pixels" if pred.ndim == 4 else "voxels") if spacing is None else "mm",
        "hd95_spacing": None if spacing is None else np.asarray(spacing, dtype=np.float64).tolist(),
        "empty_vs_empty_score": 1.0,
        "per_class": per_class,
        "per_sample": {
            "dice": sample_dice.tolist(),
            "iou": sample_iou.tolist(),
            "hd95": sample_hd.tolist(),
        },
        "notes": notes,
    }
