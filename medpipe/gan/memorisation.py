"""Memorisation check: is any synthetic image closer to a training image than real held-out images ever are?

For each synthetic sample: the distance to its nearest training image in pixel space and (with an extractor) in
feature space. Reference, per space: each real test image's distance to its nearest training image; the
threshold is the closest real pair, min over test images t of min over training images r of d(t, r). A synthetic
sample is flagged when it is closer to training than that threshold, strictly, in either space.
See docs/augmentation.md (quality and memorisation).

Shapes: images (N, C, *spatial) float32 as stored in `training/images`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import binom

from medpipe.evaluation.plots import _display_slice, _save, _window
from medpipe.gan import GanError
from medpipe.gan.quality import Extractor, nearest_neighbours

PixelNorm = Literal["zscore", "none"]


def pixel_vectors(images: np.ndarray, norm: PixelNorm = "zscore") -> np.ndarray:
    """(N, C, *spatial) -> (N, P) float32, scaled so Euclidean distance is the RMS pixel difference.

    norm="zscore" standardises each image (mean 0, std 1 over all its pixels; constant images -> 0): the
    distance is then sqrt(2 (1 - r)) with r the pixel correlation of the two images, blind to a brightness or
    contrast change. norm="none" keeps the store's normalised intensities."""
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    if norm == "zscore":
        std = x.std(axis=1, keepdims=True)
        x = np.where(std > 1e-8, (x - x.mean(axis=1, keepdims=True)) / np.maximum(std, 1e-8), 0.0)
    elif norm != "none":
        raise GanError(f"pixel norm must be 'zscore' or 'none', got {norm!r}")
    return (x / math.sqrt(max(x.shape[1], 1))).astype(np.float32)


def _space(train: np.ndarray, test: np.ndarray, fake: np.ndarray) -> dict[str, Any]:
    """Nearest-train distances of fake and test rows (N, D) and the flags against the closest real pair."""
    fake_d, fake_i = nearest_neighbours(fake, train)
    test_d, test_i = nearest_neighbours(test, train)
    threshold = float(test_d.min())
    return {"threshold": threshold, "distances": fake_d.tolist(), "nn_index": fake_i.tolist(),
            "flagged": np.flatnonzero(fake_d < threshold).tolist(),
            "test_distances": test_d.tolist(), "test_nn_index": test_i.tolist(),
            "test_median_distance": float(np.median(test_d))}


def chance_flagged_fraction(n_test: int, n_fake: int, n_spaces: int = 2, alpha: float = 0.05) -> float:
    """Largest flagged fraction that samples drawn fresh from the real data distribution reach with probability
    >= 1 - alpha (so a gate at it fails such an ideal generator at most alpha of the time).

    A fresh sample lies below the minimum of n_test exchangeable test distances with probability F(min), where
    P(F(min) > x) = (1 - x)^n_test <= exp(-n_test x): with probability >= 1 - alpha/2 the rate is at most
    p = n_spaces ln(2 n_spaces / alpha) / n_test (union over spaces); the flagged count is then at most the
    1 - alpha/2 quantile of Binomial(n_fake, p)."""
    if n_test < 1 or n_fake < 1:
        raise GanError("need at least one test and one synthetic sample")
    p = min(1.0, n_spaces * math.log(2 * n_spaces / alpha) / n_test)
    return float(binom.ppf(1 - alpha / 2, n_fake, p)) / n_fake


def memorisation_check(train_images: np.ndarray, test_images: np.ndarray, fake_images: np.ndarray,
                       extractor: Extractor | None = None, *, pixel_norm: PixelNorm = "zscore",
                       max_flagged_fraction: float | None = None, alpha: float = 0.05) -> dict[str, Any]:
    """Flag synthetic images (N_f, C, *spatial) closer to a training image than any real test image is.

    Per space ("pixel": `pixel_vectors(pixel_norm)`; "feature": extractor(images), when given): distances (N_f,)
    and nn_index (N_f,, row of train_images) of each synthetic sample's nearest training image, the threshold
    min_t min_r d(test_t, train_r) (the closest real test-train pair), flagged = distances < threshold, and the
    test images' own nearest-train distances. Top level: flagged (union over spaces), flagged_fraction and
    gate {passed, max_flagged_fraction, rule}; max_flagged_fraction None = `chance_flagged_fraction` at alpha;
    warnings (a space whose threshold is 0 because a test image duplicates a training image flags nothing)."""
    shapes = {np.shape(x)[1:] for x in (train_images, test_images, fake_images)}
    if len(shapes) != 1 or min(len(train_images), len(test_images), len(fake_images)) < 1:
        raise GanError(f"train, test and synthetic images must be non-empty with one sample shape, got {shapes}")
    spaces = {"pixel": _space(*(pixel_vectors(x, pixel_norm) for x in (train_images, test_images, fake_images)))}
    if extractor is not None:
        spaces["feature"] = _space(*(np.asarray(extractor(x), dtype=np.float64)
                                     for x in (train_images, test_images, fake_images)))
    warnings = [f"a test image is as close to training as a copy in {name} space (threshold ~0): that space flags "
                "nothing; look for duplicates across the splits" for name, s in spaces.items()
                if s["threshold"] <= 1e-6 * s["test_median_distance"]]
    flagged = sorted(set().union(*(s["flagged"] for s in spaces.values())))
    n_fake = len(fake_images)
    fraction = len(flagged) / n_fake
    if max_flagged_fraction is None:
        limit = chance_flagged_fraction(len(test_images), n_fake, len(spaces), alpha)
        rule = f"chance level of fresh real samples (alpha={alpha}, {len(test_images)} test images)"
    else:
        limit, rule = float(max_flagged_fraction), "fixed"
    return {"n": {"train": len(train_images), "test": len(test_images), "fake": n_fake},
            "pixel_norm": pixel_norm, "feature_space": getattr(extractor, "description", None) if extractor else None,
            "spaces": spaces, "flagged": flagged, "flagged_fraction": fraction,
            "gate": {"passed": fraction <= limit, "max_flagged_fraction": limit, "rule": rule}, "warnings": warnings}


def plot_memorisation(fake: np.ndarray, train: np.ndarray, flagged: Sequence[int], nn_index: Sequence[int],
                      out_path: str | Path, max_rows: int = 8, distances: Sequence[float] | None = None) -> str:
    """PNG of flagged synthetic samples (closest first when distances are given) next to their nearest training
    image and the absolute difference; with none flagged, the closest (or first) max_rows samples. Images
    (N, C, *spatial): channel 0, middle slice for 3D; each pair shares one intensity window."""
    order = np.asarray(flagged, dtype=np.int64)
    picked = bool(order.size)
    if not picked:
        order = np.arange(len(fake))
    if distances is not None:
        order = order[np.argsort(np.asarray(distances)[order], kind="stable")]
    order = order[:max_rows]
    fig, axes = plt.subplots(max(1, len(order)), 3, figsize=(7.2, 2.4 * max(1, len(order)) + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, i in enumerate(order):
        j = int(nn_index[i])
        a, b = _display_slice(fake[i]), _display_slice(train[j])
        lo, hi = _window(np.concatenate([a.ravel(), b.ravel()]))
        d = f" (d={float(distances[i]):.3g})" if distances is not None else ""
        for ax, img, title, kw in ((axes[row, 0], a, f"synthetic #{i}{d}", {"vmin": lo, "vmax": hi}),
                                   (axes[row, 1], b, f"nearest training #{j}", {"vmin": lo, "vmax": hi}),
                                   (axes[row, 2], np.abs(a - b), "|difference|", {"vmin": 0, "vmax": hi - lo})):
            ax.imshow(img, cmap="gray", **kw)
            ax.set_title(title, fontsize=8)
    head = "flagged synthetic samples" if picked else "closest synthetic samples (none flagged)"
    fig.suptitle(f"Memorisation check: {head} and their nearest training images", fontsize=10)
    return _save(fig, out_path)
