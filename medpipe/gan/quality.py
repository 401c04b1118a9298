"""Synthetic image quality without downloads: a feature space trained in this project, Fréchet distance,
precision/recall/density/coverage and per-class diversity (mode collapse).

The feature space is the penultimate layer of a classifier checkpoint of this project (`feature_extractor`):
the input of its final linear layer, e.g. the 2x128 average+max pooled channels of `small-cnn`. No Inception
weights are needed, and the features encode what separates the classes of *this* data. See
docs/augmentation.md (quality and memorisation) for the choices and how to read the numbers.

Shapes: images (N, C, *spatial) float32 as stored in `training/images`; features (N, D); labels (N,) int.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prdc import compute_prdc
from scipy.spatial.distance import pdist
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits
from torch import nn
from torch.nn import functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from medpipe.gan import GanError
from medpipe.task import Task
from medpipe.training.checkpoints import load_model

Extractor = Callable[[np.ndarray], np.ndarray]

MIN_DIVERSITY_RATIO = 0.5      # synthetic mean pairwise distance below this fraction of real: mode collapse
DUPLICATE_RADIUS = 0.1         # near-duplicate: a same-class synthetic neighbour within this x real median NN dist
MAX_DUPLICATE_FRACTION = 0.1   # more near-duplicates than this fraction of a class: mode collapse


class FeatureExtractor:
    """Callable: images (N, C, *spatial) -> features (N, D) float64, in batches, eval mode, no gradients.

    `description` says which feature space it is (stored in reports)."""

    def __init__(self, module: nn.Module, description: str, in_channels: int | None = None,
                 batch_size: int = 64, device: str | torch.device = "cpu") -> None:
        self.module = module.eval().to(device)
        self.description = description
        self.in_channels = in_channels
        self.batch_size = batch_size
        self.device = torch.device(device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim not in (4, 5):
            raise GanError(f"images must be (N, C, H, W) or (N, C, D, H, W), got shape {images.shape}")
        if self.in_channels is not None and images.shape[1] != self.in_channels:
            raise GanError(f"images have {images.shape[1]} channels, the feature network takes {self.in_channels}")
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size], np.float32))
                out.append(self.module(batch.to(self.device)).flatten(1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))


class _Penultimate(nn.Module):
    """A classifier's penultimate features: the input of its last nn.Linear (captured with a pre-hook)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise GanError(f"{type(model).__name__} has no linear layer: no penultimate features")
        self.model = model
        self.last = linears[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.last.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[-1]


class _PooledPixels(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.adaptive_avg_pool2d if x.ndim == 4 else F.adaptive_avg_pool3d
        return pool(x, self.size)


def feature_extractor(checkpoint_path: str | Path, batch_size: int = 64,
                      device: str | torch.device = "cpu") -> FeatureExtractor:
    """Penultimate-layer features (N, D) of a project classifier checkpoint (best.pt of `medpipe train`, task
    classify) for images (N, C, *spatial) normalised as in the store; small-cnn: D = 256."""
    model, meta = load_model(checkpoint_path, map_location=device)
    if meta["task"] is not Task.classify:
        raise GanError(f"{checkpoint_path} is a {meta['task'].value} checkpoint; features need a classifier")
    return FeatureExtractor(_Penultimate(model), f"penultimate layer of {meta['model_name']} ({checkpoint_path}, "
                            f"epoch {meta['epoch']})", int(meta["sample_shape"][0]), batch_size, device)


def pooled_pixel_extractor(size: int = 8) -> FeatureExtractor:
    """Fallback without a checkpoint (tests, smoke runs): area-mean pixels on a size^2 (3D: size^3) grid per
    channel, (N, C * size^2). Low-frequency content only: not a substitute for a trained feature space."""
    return FeatureExtractor(_PooledPixels(size), f"area-pooled pixels ({size} per axis)")


def _features(x: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < min_rows:
        raise GanError(f"{name} must be (N, D) with N >= {min_rows}, got shape {x.shape}")
    return x


class _Identity(nn.Module):
    """Features are already computed: torchmetrics' FID 'feature module' passes them through."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real_feats: np.ndarray, fake_feats: np.ndarray) -> float:
    """Fréchet distance |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2) between Gaussians fitted to (N_r, D)
    and (N_f, D) features (torchmetrics' FID with the features as its feature module). Biased upwards for
    small N (compare only at equal N)."""
    real = _features(real_feats, "real_feats", 2)
    fake = _features(fake_feats, "fake_feats", 2)
    if real.shape[1] != fake.shape[1]:
        raise GanError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]))
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    # one BLAS/OpenMP thread: as fast for D x D matrices, and 100x faster than 2 spinning threads on a busy CPU
    with threadpool_limits(1):
        return max(0.0, float(metric.compute()))


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """k-NN manifold metrics of fake (N_f, D) against real (N_r, D) features (the `prdc` package of Naeem et al.):
    precision/recall (Kynkäänniemi et al. 2019), density/coverage (Naeem et al. 2020). Needs N >= k + 2."""
    real = _features(real, "real", k + 2)
    fake = _features(fake, "fake", k + 2)
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes
        result = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    return {name: float(result[name]) for name in ("precision", "recall", "density", "coverage")}


def nearest_neighbours(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean nearest reference row of each query row: (distances (Q,), reference indices (Q,))."""
    nn_search = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(reference)
    dist, idx = nn_search.kneighbors(query)
    return dist[:, 0].astype(np.float64), idx[:, 0].astype(np.int64)


def _class_spread(x: np.ndarray, max_pairs_samples: int, rng: np.random.Generator) -> tuple[float | None, np.ndarray]:
    """(mean pairwise distance, or None under 2 samples; each sample's nearest-other-sample distance)."""
    if len(x) < 2:
        return None, np.zeros(0)
    nn_dist = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(x).kneighbors()[0][:, 0]
    sub = x[rng.choice(len(x), max_pairs_samples, replace=False)] if len(x) > max_pairs_samples else x
    mean = float(pdist(sub).mean())
    return mean, nn_dist


def _labels(labels: np.ndarray | None, n: int) -> np.ndarray:
    if labels is None:
        return np.zeros(n, dtype=np.int64)
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != (n,):
        raise GanError(f"labels must be ({n},), got shape {labels.shape}")
    return labels


def per_class_diversity(feats: np.ndarray, labels: np.ndarray | None = None, max_samples: int = 2000,
                        seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per class of (N,) labels (None: one class "0"): n, mean pairwise distance of its (N, D) features
    (on a seeded subsample of max_samples) and median nearest-neighbour distance within the class."""
    x = _features(feats, "feats")
    y = _labels(labels, len(x))
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    for c in np.unique(y):
        mean, nn_dist = _class_spread(x[y == c], max_samples, rng)
        out[str(int(c))] = {"n": int((y == c).sum()), "mean_pairwise_distance": mean,
                            "median_nn_distance": float(np.median(nn_dist)) if nn_dist.size else None}
    return out


def mode_collapse(real_feats: np.ndarray, fake_feats: np.ndarray, real_labels: np.ndarray | None = None,
                  fake_labels: np.ndarray | None = None, min_ratio: float = MIN_DIVERSITY_RATIO,
                  duplicate_radius: float = DUPLICATE_RADIUS, max_duplicate_fraction: float = MAX_DUPLICATE_FRACTION,
                  max_samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Synthetic vs real diversity per class ((N, D) features, (N,) labels; either None = all one class "0").

    A class collapses when its synthetic mean pairwise distance < min_ratio x the real one, when more than
    max_duplicate_fraction of its synthetic samples have a synthetic neighbour of the class within
    duplicate_radius x the real median nearest-neighbour distance, or when it has no synthetic sample."""
    real, fake = _features(real_feats, "real_feats"), _features(fake_feats, "fake_feats")
    if real_labels is None or fake_labels is None:  # labels on one side only: compare the sets as one class
        real_labels = fake_labels = None
    ry, fy = _labels(real_labels, len(real)), _labels(fake_labels, len(fake))
    rng = np.random.default_rng(seed)
    classes: dict[str, dict[str, Any]] = {}
    collapsed: list[str] = []
    for c in np.union1d(np.unique(ry), np.unique(fy)):
        real_mean, real_nn = _class_spread(real[ry == c], max_samples, rng)
        fake_mean, fake_nn = _class_spread(fake[fy == c], max_samples, rng)
        entry: dict[str, Any] = {"n_real": int((ry == c).sum()), "n_fake": int((fy == c).sum()),
                                 "real_mean_pairwise_distance": real_mean, "fake_mean_pairwise_distance": fake_mean,
                                 "diversity_ratio": None, "duplicate_fraction": None, "reasons": []}
        if entry["n_fake"] == 0:
            entry["reasons"].append("no synthetic samples")
        if real_mean is not None and fake_mean is not None:
            entry["diversity_ratio"] = fake_mean / real_mean if real_mean > 0 else None
            if real_mean > 0 and fake_mean < min_ratio * real_mean:
                entry["reasons"].append(f"diversity {fake_mean / real_mean:.2f} x real < {min_ratio}")
            radius = duplicate_radius * float(np.median(real_nn))
            entry["duplicate_fraction"] = float((fake_nn <= radius).mean())
            if entry["duplicate_fraction"] > max_duplicate_fraction:
                entry["reasons"].append(f"{entry['duplicate_fraction']:.0%} near-duplicates (within {radius:.4g})")
        entry["mode_collapse"] = bool(entry["reasons"])
        classes[str(int(c))] = entry
        if entry["mode_collapse"]:
            collapsed.append(str(int(c)))
    return {"mode_collapse": bool(collapsed), "collapsed_classes": collapsed, "classes": classes,
            "thresholds": {"min_ratio": min_ratio, "duplicate_radius": duplicate_radius,
                           "max_duplicate_fraction": max_duplicate_fraction}}


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x[np.sort(rng.choice(len(x), n, replace=False))] if len(x) > n else x


def _set_metrics(train: np.ndarray, test: np.ndarray, fake: np.ndarray, k: int, fd: bool,
                 rng: np.random.Generator) -> dict[str, Any]:
    """Fake and real test features scored against train at the same size m = min(N_test, N_fake)."""
    m = min(len(test), len(fake))
    sets = {"fake": _subsample(fake, m, rng), "real_test": _subsample(test, m, rng)}
    out: dict[str, Any] = {"n_matched": m}
    ok = m >= k + 2 and len(train) >= k + 2
    out["prdc"] = {name: precision_recall_density_coverage(train, x, k) if ok else None for name, x in sets.items()}
    if fd:
        out["frechet_distance"] = {name: frechet_distance(train, x) if m >= 2 else None for name, x in sets.items()}
    return out


def quality_report(real_train: np.ndarray, real_test: np.ndarray, fake: np.ndarray, extractor: Extractor, *,
                   train_labels: np.ndarray | None = None, test_labels: np.ndarray | None = None,
                   fake_labels: np.ndarray | None = None, k: int = 5, seed: int = 0) -> dict[str, Any]:
    """JSON-able quality of fake images (N_f, C, *spatial) against the real train split, with the real test split
    scored the same way as the reference a perfect generator would reach.

    Fake and test features are subsampled (seeded) to the same size before scoring against all train features:
    Fréchet distance and PRDC depend on set sizes. Keys: feature_space, n, frechet_distance {fake, real_test},
    prdc {fake, real_test}, per_class {class: {prdc}} (labels given), diversity (`mode_collapse` vs train)."""
    feats = {name: _features(extractor(x), name) for name, x in
             (("real_train", real_train), ("real_test", real_test), ("fake", fake))}
    rng = np.random.default_rng(seed)
    overall = _set_metrics(feats["real_train"], feats["real_test"], feats["fake"], k, True, rng)
    report: dict[str, Any] = {
        "feature_space": getattr(extractor, "description", repr(extractor)), "k": k,
        "n": {**{name: len(x) for name, x in feats.items()}, "matched": overall["n_matched"]},
        "frechet_distance": overall["frechet_distance"], "prdc": overall["prdc"],
    }
    if train_labels is not None and test_labels is not None and fake_labels is not None:
        ys = {name: _labels(y, len(feats[name])) for name, y in
              (("real_train", train_labels), ("real_test", test_labels), ("fake", fake_labels))}
        of = {c: {name: feats[name][ys[name] == c] for name in feats} for c in np.unique(ys["real_train"])}
        report["per_class"] = {str(int(c)): _set_metrics(x["real_train"], x["real_test"], x["fake"], k, False, rng)
                               for c, x in of.items()}
    report["diversity"] = mode_collapse(feats["real_train"], feats["fake"], train_labels, fake_labels, seed=seed)
    return report
