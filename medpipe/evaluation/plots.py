"""Report figures (matplotlib, Agg backend). Every function writes one PNG and returns its path.

Sample panels are titled by their position in the grid (#1, #2, ...) only; no identifiers are drawn.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import binary_roc  # noqa: E402

from medpipe.evaluation.metrics import auroc_per_class  # noqa: E402

__all__ = [
    "plot_case_overlays",
    "plot_confusion_matrix",
    "plot_gradcam_grid",
    "plot_roc_curves",
    "plot_sample_predictions",
    "plot_segmentation_samples",
    "plot_training_curves",
]

DPI = 110


def _save(fig: plt.Figure, out_path: str | Path) -> str:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return str(out)


def _grid(n: int, max_cols: int = 4, size: float = 2.6) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = max(1, min(max_cols, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.3), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat:
        ax.axis("off")
    return fig, flat


def _display_slice(image: np.ndarray) -> np.ndarray:
    """(C, H, W) or (C, D, H, W) -> (H, W): channel 0, middle slice of the first spatial axis for 3D."""
    img = np.asarray(image, dtype=np.float32)
    img = img[0] if img.ndim >= 3 else img
    if img.ndim == 3:
        img = img[img.shape[0] // 2]
    return img


def _t(text: object) -> str:
    """Data string safe for matplotlib text ('$' would start mathtext)."""
    return str(text).replace("$", r"\$")


def _window(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def plot_roc_curves(y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str], out_path: str | Path) -> str:
    """One-vs-rest ROC curve per class (binary: the positive class only), AUROC in the legend."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    aucs = auroc_per_class(y_true, y_prob)
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    which = [1] if len(classes) == 2 else range(len(classes))
    drawn = 0
    for c in which:
        if math.isnan(aucs[c]):
            continue
        fpr, tpr, _ = binary_roc(torch.from_numpy(y_prob[:, c]), torch.from_numpy((y_true == c).astype(np.int64)))
        ax.plot(fpr.numpy(), tpr.numpy(), lw=2, label=f"{_t(classes[c])} (AUROC {aucs[c]:.3f})")
        drawn += 1
    if drawn == 0:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class in the test set", ha="center", va="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title="ROC curves (one class vs rest)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out_path)


def plot_confusion_matrix(cm: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str], out_path: str | Path) -> str:
    """Two panels: counts, and row-normalised (fraction of each true class). Rows true, columns predicted."""
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(rows > 0, cm / np.where(rows > 0, rows, 1), np.nan)
    k = len(classes)
    side = max(3.5, 0.7 * k + 2)
    names = [_t(c) for c in classes]
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side), layout="constrained")
    for ax, data, title, fmt in ((axes[0], cm, "Counts", "d"), (axes[1], norm, "Fraction of each true class", ".2f")):
        shown = np.nan_to_num(data.astype(np.float64), nan=0.0)
        ax.imshow(shown, cmap="Blues", vmin=0, vmax=max(shown.max(), 1e-9) if fmt == "d" else 1.0)
        for i in range(k):
            for j in range(k):
                v = data[i, j]
                txt = "-" if (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
                dark = shown[i, j] > 0.6 * (shown.max() if fmt == "d" else 1.0)
                ax.text(j, i, txt, ha="center", va="center", color="white" if dark else "black", fontsize=9)
        ax.set_xticks(range(k), names, rotation=45, ha="right")
        ax.set_yticks(range(k), names)
        ax.set(xlabel="Predicted class", ylabel="True class", title=title)
    return _save(fig, out_path)


def _read_numeric_csv(csv_path: str | Path) -> dict[str, np.ndarray]:
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    cols: dict[str, np.ndarray] = {}
    for name in rows[0]:
        if name is None:
            continue
        vals = []
        for r in rows:
            try:
                vals.append(float(r.get(name) or "nan"))
            except ValueError:
                break
        else:
            arr = np.asarray(vals)
            if np.isfinite(arr).any():
                cols[name] = arr
    return cols


def plot_training_curves(csv_path: str | Path, out_path: str | Path) -> str:
    """Loss columns (name contains 'loss') in one panel, every other numeric column in a second, vs epoch."""
    cols = _read_numeric_csv(csv_path)
    x = cols.pop("epoch", None)
    n = max((len(v) for v in cols.values()), default=0)
    if x is None:
        x = np.arange(1, n + 1)
    losses = {k: v for k, v in cols.items() if "loss" in k.lower()}
    others = {k: v for k, v in cols.items() if k not in losses and k.lower() not in ("step", "lr", "learning_rate", "time", "seconds")}
    panels = [(losses, "Loss"), (others, "Validation metric")] if others else [(losses, "Loss")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (series, ylabel) in zip(axes[0], panels):
        for name, v in series.items():
            ok = np.isfinite(v)
            ax.plot(x[ok], v[ok], marker="o" if ok.sum() < 30 else None, ms=3, label=name)
        if not series:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.suptitle("Training curves")
    return _save(fig, out_path)


def plot_sample_predictions(
    images: np.ndarray,
    y_true: np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    out_path: str | Path,
    max_samples: int = 16,
) -> str:
    """Grid of images (N, C, *spatial) titled with true label, predicted label and its probability."""
    images = np.asarray(images)
    y_prob = np.asarray(y_prob)
    n = min(len(images), max_samples)
    fig, axes = _grid(n)
    for i in range(n):
        img = _display_slice(images[i])
        lo, hi = _window(img)
        pred = int(np.argmax(y_prob[i]))
        true = int(y_true[i])
        ax = axes[i]
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"#{i + 1} true: {_t(classes[true])}\npred: {_t(classes[pred])} (p={y_prob[i, pred]:.2f})",
                     fontsize=8, color="darkgreen" if pred == true else "firebrick")
    fig.suptitle("Sample predictions (green = correct, red = wrong)", fontsize=10)
    return _save(fig, out_path)


def plot_segmentation_samples(
    images: np.ndarray,
    true_masks: np.ndarray,
    pred_masks: np.ndarray,
    out_path: str | Path,
    max_samples: int = 8,
    dice: Sequence[float] | None = None,
) -> str:
    """Image with ground-truth (green) and predicted (red) contours; middle slice for 3D."""
    images = np.asarray(images)
    n = min(len(images), max_samples)
    fig, axes = _grid(n)
    for i in range(n):
        img = _display_slice(images[i])
        t = _display_slice(np.asarray(true_masks[i]))
        p = _display_slice(np.asarray(pred_masks[i]))
        lo, hi = _window(img)
        ax = axes[i]
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        for mask, color in ((t, "lime"), (p, "red")):
            for lab in np.unique(mask[mask > 0]):
                ax.contour((mask == lab).astype(float), levels=[0.5], colors=color, linewidths=1.2)
        title = f"#{i + 1}" + (f" Dice {dice[i]:.2f}" if dice is not None else "")
        ax.set_title(title, fontsize=8)
    fig.suptitle("Segmentation samples (green = ground truth, red = prediction)", fontsize=10)
    return _save(fig, out_path)


def plot_gradcam_grid(
    images: np.ndarray,
    cams: np.ndarray,
    out_path: str | Path,
    titles: Sequence[str] | None = None,
    max_samples: int = 8,
) -> str:
    """Each image next to its Grad-CAM heat map overlaid (jet, 40% opacity); middle slice for 3D."""
    images = np.asarray(images)
    cams = np.asarray(cams)
    n = min(len(images), max_samples)
    cols = min(4, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.2 * 2 * cols, 2.4 * rows + 0.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        img = _display_slice(images[i])
        cam = _display_slice(cams[i])
        lo, hi = _window(img)
        a0, a1 = axes[r, 2 * c], axes[r, 2 * c + 1]
        a0.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        a0.set_title(_t(titles[i]) if titles else f"#{i + 1}", fontsize=8)
        a1.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        a1.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        a1.set_title("Grad-CAM", fontsize=8)
    fig.suptitle("Grad-CAM: regions that most increased the predicted class score (red = more)", fontsize=10)
    return _save(fig, out_path)


def plot_case_overlays(
    image: np.ndarray,
    true: np.ndarray,
    pred: np.ndarray,
    spacing: tuple[float, float, float],
    out_path: str | Path,
    title: str = "",
) -> str:
    """Axial, coronal and sagittal slices of one case with ground-truth (green) and predicted (red) contours.

    ``image``, ``true`` and ``pred`` are (Z, Y, X); ``spacing`` is (dz, dy, dx) in mm and sets each panel's aspect so
    anisotropic voxels keep their true proportions. The slices pass through the centroid of the ground-truth
    foreground (of the prediction when the truth is empty; the volume centre when both are). In the coronal and
    sagittal panels the Z index increases upwards.
    """
    image, true, pred = np.asarray(image, dtype=np.float32), np.asarray(true), np.asarray(pred)
    if image.ndim != 3 or true.shape != image.shape or pred.shape != image.shape:
        raise ValueError(f"image, true and pred must be (Z, Y, X) arrays of one shape, "
                         f"got {image.shape}, {true.shape}, {pred.shape}")
    dz, dy, dx = (float(s) for s in spacing)
    fg = true > 0 if (true > 0).any() else pred > 0
    z, y, x = (np.argwhere(fg).mean(axis=0).round().astype(int) if fg.any() else np.asarray(image.shape) // 2).tolist()
    # (title, index into the (Z, Y, X) arrays, aspect = row spacing / column spacing, imshow origin)
    panels = (
        (f"Axial (z = {z})", (z, slice(None), slice(None)), dy / dx, "upper"),
        (f"Coronal (y = {y})", (slice(None), y, slice(None)), dz / dx, "lower"),
        (f"Sagittal (x = {x})", (slice(None), slice(None), x), dz / dy, "lower"),
    )
    lo, hi = _window(np.concatenate([image[index].ravel() for _, index, _, _ in panels]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8), layout="constrained")
    for ax, (name, index, aspect, origin) in zip(axes, panels):
        ax.imshow(image[index], cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin=origin, interpolation="nearest")
        for mask, color in ((true[index], "lime"), (pred[index], "red")):
            for lab in np.unique(mask[mask > 0]):
                ax.contour((mask == lab).astype(float), levels=[0.5], colors=color, linewidths=1.2)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    head = f"{_t(title)}\n" if title else ""
    fig.suptitle(f"{head}green = ground truth, red = prediction", fontsize=10)
    return _save(fig, out_path)
