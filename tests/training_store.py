"""Small synthetic medpipe stores for the training tests and benchmarks (written with medpipe.store functions).

2D images look like the demo X-rays in miniature: a smooth noisy background in [0, 1] and, for class "lesion",
a bright round blob. 3D volumes look like the demo CT after z-scoring: a body ellipsoid in air with a brighter
sphere lesion, mask label 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from medpipe.config import StoreConfig
from medpipe.store import ATTRS_KEY, SCHEMA_VERSION, content_hash, create_training_arrays, write_sample_table


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Low-frequency noise with unit standard deviation (Gaussian-filtered white noise)."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def synthetic_2d(n: int, size: int = 32, seed: int = 0, amplitude: float = 0.22,
                 radius: tuple[float, float] = (3.0, 7.0), noise: float = 0.015) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (n, 1, size, size) in [0, 1], labels int64 (n,)): half 'none' (0), half 'lesion' (1)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2).astype(np.int64)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.empty((n, 1, size, size), dtype=np.float32)
    r_scale = size / 64.0
    for i in range(n):
        img = 0.5 + 0.08 * _smooth_noise(rng, (size, size), size / 8) + rng.normal(0, noise, (size, size))
        if labels[i] == 1:
            r = rng.uniform(*radius) * r_scale
            cy, cx = rng.uniform(r + 2, size - r - 2, size=2)
            img += amplitude * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (r**2)) ** 2)
        lo, hi = img.min(), img.max()
        images[i, 0] = (img - lo) / (hi - lo)
    return images, labels


def synthetic_3d(n: int, shape: tuple[int, int, int] = (16, 32, 32), seed: int = 0,
                 radius: tuple[float, float] = (4.0, 9.0), lesion_fraction: float = 0.8
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(volumes float32 (n, 1, Z, Y, X) z-scored, masks uint8 (n, 1, Z, Y, X), labels int64 (n,))."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    zz, yy, xx = np.mgrid[:z, :y, :x].astype(np.float32)
    vols = np.empty((n, 1, *shape), dtype=np.float32)
    masks = np.zeros((n, 1, *shape), dtype=np.uint8)
    labels = np.zeros(n, dtype=np.int64)
    scale = y / 64.0
    for i in range(n):
        hu = np.full(shape, -1000.0, dtype=np.float32)
        body = ((yy - y / 2) / (0.42 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1
        hu[body] = 40.0
        if rng.random() < lesion_fraction:
            r = rng.uniform(*radius) * scale
            rz = max(1.5, r * z / y * 2)  # slices are thicker than pixels
            cy, cx = rng.uniform(y / 2 - 0.3 * y + r, y / 2 + 0.3 * y - r, size=2)
            cz = rng.uniform(rz, z - rz)
            sphere = ((zz - cz) / rz) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1
            hu[sphere] += 120.0
            masks[i, 0][sphere] = 1
            labels[i] = 1
        hu = hu + rng.normal(0, 15, shape).astype(np.float32) * body
        hu = np.clip(hu, -1000, 300)
        vols[i, 0] = (hu + 500.0) / 500.0  # stand-in for the fingerprint z-score
    return vols, masks, labels


def write_store(
    url: str,
    images: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None = None,
    classes: list[str] | None = None,
    split: np.ndarray | None = None,
    complete: bool = True,
    store_config: StoreConfig | None = None,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a store with training arrays, sample table and root attrs (as ingest does); returns the URL."""
    config = store_config or StoreConfig()
    n = images.shape[0]
    kwargs = {"storage_options": storage_options} if storage_options else {}
    root = zarr.open_group(url, mode="w", **kwargs)
    create_training_arrays(root, n, images.shape[1:], masks is not None, config)
    root["training/images"][...] = images
    root["training/labels"][...] = labels
    if masks is not None:
        root["training/masks"][...] = masks
    if split is None:
        split = np.random.default_rng(seed + 1).choice(3, size=n, p=[0.7, 0.15, 0.15]).astype(np.int8)
    spatial = images.shape[2:]
    write_sample_table(root, {
        "patient": np.array([f"p{i:05d}" for i in range(n)], dtype=object),
        "study": np.array([f"s{i:05d}" for i in range(n)], dtype=object),
        "series": np.array([f"r{i:05d}" for i in range(n)], dtype=object),
        "unit": np.array([f"u{i:05d}" for i in range(n)], dtype=object),
        "source_hash": np.array([f"h{i:05d}" for i in range(n)], dtype=object),
        "modality": np.array(["CT" if len(spatial) == 3 else "OT"] * n, dtype=object),
        "split": np.asarray(split, dtype=np.int8), "label": np.asarray(labels, dtype=np.int64),
        "has_mask": np.array([masks is not None] * n, dtype=bool),
        "spacing": np.ones((n, 3), dtype=np.float64),
        "shape": np.array([[images.shape[1], spatial[0] if len(spatial) == 3 else 1, *spatial[-2:]]] * n, np.int64),
    })
    root.attrs[ATTRS_KEY] = {
        "schema_version": SCHEMA_VERSION, "complete": complete, "content_hash": content_hash(root),
        "classes": classes if classes is not None else ["none", "lesion"],
        "kind": "3d" if len(spatial) == 3 else "2d", "sample_shape": [int(s) for s in images.shape[1:]],
        "counts": {"samples": n},
        "splits": {k: int((np.asarray(split) == c).sum()) for k, c in (("train", 0), ("val", 1), ("test", 2))},
    }
    return url


def make_2d_store(url: str, n: int = 256, size: int = 32, seed: int = 0,
                  radius: tuple[float, float] = (3.0, 7.0), **kwargs: Any) -> str:
    """A synthetic 2D none/lesion classification store (radius in px at 64 px, scaled with size)."""
    images, labels = synthetic_2d(n, size, seed, radius=radius)
    return write_store(url, images, labels, seed=seed, **kwargs)


def make_3d_store(url: str, n: int = 48, shape: tuple[int, int, int] = (16, 32, 32), seed: int = 0,
                  radius: tuple[float, float] = (4.0, 9.0), **kwargs: Any) -> str:
    """A synthetic 3D segmentation store (masks, label 1 = lesion; radius in voxels at 64 px, scaled)."""
    vols, masks, labels = synthetic_3d(n, shape, seed, radius=radius)
    return write_store(url, vols, labels, masks=masks, seed=seed, **kwargs)


SENTINEL = 12345.0


def write_sentinel_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn (importable by spawned workers): write SENTINEL into the first element of the
    worker's copy of the dataset's image cache, so the parent can tell a shared cache from a private copy."""
    import torch

    dataset = torch.utils.data.get_worker_info().dataset
    dataset._cache["images"].reshape(-1)[0] = SENTINEL


def check_kill_and_resume(train_fn: Any, store: str, out: Any, config: Any, epochs: int) -> None:
    """`train_fn(store, run_dir, config, ...)` (an engine entry point) killed after epoch 2 leaves last.pt at epoch 2,
    refuses a fresh run into the folder, resumes epochs 3..`epochs` with the history and metrics.csv complete, and
    repeats an uninterrupted run's training losses."""
    import csv

    import pytest

    from medpipe.training import CheckpointExistsError
    from medpipe.training.checkpoints import load_checkpoint

    def kill_after_two(epoch: int, metrics: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt("simulated kill")

    run = out / "run"
    with pytest.raises(KeyboardInterrupt):
        train_fn(store, run, config, progress=False, on_epoch_end=kill_after_two)
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    with pytest.raises(CheckpointExistsError, match="resume"):
        train_fn(store, run, config, progress=False)
    seen: list[int] = []
    resumed = train_fn(store, run, config, resume=True, progress=False, on_epoch_end=lambda e, m: seen.append(e))
    everything = list(range(1, epochs + 1))
    assert seen == everything[2:] and [h["epoch"] for h in resumed.history] == everything
    assert load_checkpoint(run / "last.pt")["epoch"] == epochs
    assert [int(r["epoch"]) for r in csv.DictReader((run / "metrics.csv").open())] == everything
    straight = train_fn(store, out / "straight", config, progress=False)
    assert [h["train_loss"] for h in straight.history] == pytest.approx(
        [h["train_loss"] for h in resumed.history], rel=1e-4), "a resumed run repeats the uninterrupted one"
