"""Per-case 3D segmentation metrics in a case's own (source) grid, and their summary over cases.

Cases may have different shapes and spacings, so each is scored on its own with :func:`case_metrics` (Dice, HD95 and
surface Dice in mm via MONAI, volumes in ml); :func:`summarize_cases` then averages the per-case results and adds
percentile-bootstrap confidence intervals over cases. Everything returned is plain Python (JSON-able; NaN allowed).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from medpipe.evaluation.bootstrap import bootstrap_ci
from medpipe.evaluation.metrics import dice_iou

__all__ = ["case_metrics", "summarize_cases"]

NAN = float("nan")
METRICS = ("dice", "hd95_mm", "surface_dice")


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else NAN


def _check_labels(name: str, arr: np.ndarray, num_classes: int) -> np.ndarray:
    integral = arr.dtype.kind in "biu" or (arr.dtype.kind == "f" and np.array_equal(arr, np.round(arr)))
    if not integral or arr.min() < 0 or arr.max() >= num_classes:
        raise ValueError(f"{name} must hold integer labels in [0, {num_classes - 1}]")
    return arr.astype(np.int64)


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(Z, Y, X) integer labels -> (1, K, Z, Y, X) boolean tensor."""
    classes = np.arange(num_classes).reshape(num_classes, 1, 1, 1)
    return torch.from_numpy(labels[None] == classes)[None]


def case_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    spacing: tuple[float, float, float],
    num_classes: int,
    tolerance_mm: float = 2.0,
) -> dict[str, Any]:
    """Dice, HD95 (mm), surface Dice and volumes (ml) of one case, per foreground label 1..num_classes-1.

    ``pred`` and ``true`` are integer label maps (Z, Y, X) of the same shape; ``spacing`` is (dz, dy, dx) in mm.
    Returns ``{"per_label": {"1": {"dice", "hd95_mm", "surface_dice", "volume_true_ml", "volume_pred_ml"}, ...},
    "dice", "hd95_mm", "surface_dice", "tolerance_mm", "spacing_mm"}``; the case-level values are means over labels
    (HD95: over the labels where it is defined, NaN if none).

    Conventions per label: Dice of an empty prediction against an empty truth is 1.0. HD95 (MONAI: the larger of
    the two directed 95th-percentile surface distances) is NaN when either mask is empty. Surface Dice at
    ``tolerance_mm`` (MONAI, boundary voxels within the tolerance of the other boundary) is 1.0 when both masks are
    empty and 0.0 when exactly one is. Volume = voxel count * dz * dy * dx / 1000.
    """
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape or pred.ndim != 3 or pred.size == 0:
        raise ValueError(f"pred and true must be non-empty (Z, Y, X) arrays of the same shape, "
                         f"got {pred.shape} and {true.shape}")
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2 (background + at least one foreground class)")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive (dz, dy, dx) values in mm, got {spacing!r}")
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm!r}")
    pred_oh = _one_hot(_check_labels("pred", pred, num_classes), num_classes)
    true_oh = _one_hot(_check_labels("true", true, num_classes), num_classes)

    k = num_classes - 1
    with warnings.catch_warnings():
        # emptiness is handled below; MONAI also warns about its own use of a deprecated argument
        warnings.filterwarnings("ignore", message=r"the (ground truth|prediction) of class .* is all 0")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        hd95 = compute_hausdorff_distance(pred_oh, true_oh, percentile=95, spacing=sp)[0].numpy()
        nsd = compute_surface_dice(pred_oh, true_oh, class_thresholds=[float(tolerance_mm)] * k, spacing=sp)[0].numpy()
    dice = dice_iou(pred_oh[:, 1:].numpy(), true_oh[:, 1:].numpy())[0][0]
    n_pred = pred_oh[0, 1:].sum(dim=(1, 2, 3)).numpy()
    n_true = true_oh[0, 1:].sum(dim=(1, 2, 3)).numpy()
    ml_per_voxel = sp[0] * sp[1] * sp[2] / 1000.0

    per_label: dict[str, dict[str, float]] = {}
    for c in range(k):
        both_empty = n_pred[c] == 0 and n_true[c] == 0
        one_empty = (n_pred[c] == 0) != (n_true[c] == 0)
        per_label[str(c + 1)] = {
            "dice": float(dice[c]),
            "hd95_mm": NAN if (both_empty or one_empty) else float(hd95[c]),
            "surface_dice": 1.0 if both_empty else 0.0 if one_empty else float(nsd[c]),
            "volume_true_ml": float(n_true[c]) * ml_per_voxel,
            "volume_pred_ml": float(n_pred[c]) * ml_per_voxel,
        }
    out: dict[str, Any] = {"per_label": per_label}
    for m in METRICS:
        out[m] = _nanmean([v[m] for v in per_label.values()])
    out["tolerance_mm"] = float(tolerance_mm)
    out["spacing_mm"] = list(sp)
    return out


def _mean_ci(values: np.ndarray, n_boot: int, seed: int, alpha: float) -> dict[str, float]:
    """``{"mean", "low", "high"}`` of (N,) per-case values; NaN cases are left out of the mean of each resample."""
    low, high = bootstrap_ci(partial(np.nanmean, axis=1), values, n_boot=n_boot, alpha=alpha, seed=seed, batched=True)
    return {"mean": _nanmean(values), "low": low, "high": high}


def summarize_cases(cases: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Means over cases of Dice, HD95 (mm) and surface Dice, overall and per label, with bootstrap CIs.

    ``cases`` are :func:`case_metrics` results sharing the same labels. Each metric becomes ``{"mean", "low",
    "high"}``: the mean over cases and the percentile-bootstrap interval at level ``1 - alpha`` (cases resampled
    with replacement; the same resamples for every metric). Cases whose HD95 is NaN are left out of its mean and
    counted in ``hd95_excluded`` (also per label).
    """
    if not cases:
        raise ValueError("cannot summarise an empty list of cases")
    labels = list(cases[0]["per_label"])
    if any(list(c["per_label"]) != labels for c in cases):
        raise ValueError("all cases must have the same labels (computed with the same num_classes)")

    def block(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in METRICS:
            out[m] = _mean_ci(np.array([r[m] for r in rows], dtype=np.float64), n_boot, seed, alpha)
        out["hd95_excluded"] = sum(1 for r in rows if math.isnan(r["hd95_mm"]))
        return out

    return {
        "n_cases": len(cases),
        **block(cases),
        "per_label": {lab: block([c["per_label"][lab] for c in cases]) for lab in labels},
        "ci": {
            "level": 1 - alpha,
            "n_boot": n_boot,
            "seed": seed,
            "method": "percentile bootstrap, resampling test cases with replacement",
        },
    }
