"""Model selection on the val split only: which history column the monitor reads, when it improved, and which
epoch count a default should cover.

Every per-epoch metric the engine computes on the val split is stored in the history (and metrics.csv) under a
`val_` name (`val_loss`, `val_accuracy`, `val_macro_f1`, `val_dice`); test metrics are computed once, after
training, and never enter the history. Selection code reads `val_` columns only, so test data cannot leak into
best.pt, early stopping or the choice of a default epoch count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def monitor_key(monitor: str) -> str:
    """History column of a monitor name: "macro_f1" -> "val_macro_f1"; "val_loss" stays "val_loss"."""
    return monitor if monitor.startswith("val_") else f"val_{monitor}"


LOWER_IS_BETTER = ("loss", "mae", "rmse")  # monitor name endings of errors (minimised)


def lower_is_better(monitor: str) -> bool:
    """True for loss and error monitors (loss, mae, rmse: minimised), False for quality metrics (maximised)."""
    return monitor_key(monitor).endswith(LOWER_IS_BETTER)


def improved(value: float, best: float | None, monitor: str) -> bool:
    """Whether a val value beats the best so far (strictly); NaN never improves."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if lower_is_better(monitor) else value > best


def best_val_epoch(history: Sequence[dict[str, float]], monitor: str, tolerance: float = 0.0) -> int:
    """First epoch whose val metric is within `tolerance` of the best val value of the run (0 when the history
    has no val values). Run with `early_stopping_patience=0` and generous epochs, then set the default epochs a
    few above this on several seeds: the choice reads the val column only, never test."""
    key = monitor_key(monitor)
    rows = [(int(row["epoch"]), float(row[key])) for row in history if key in row and not math.isnan(float(row[key]))]
    if not rows:
        return 0
    values = [v for _, v in rows]
    best = min(values) if lower_is_better(monitor) else max(values)
    return next(epoch for epoch, value in rows if abs(value - best) <= tolerance)
