"""What the GAN reads from a store: checks that a store fits (complete, fixed 2D layout, labelled train classes),
the labelled train samples in block-shuffled batches, and their intensity range.

Only train-split samples with a label (split 0, label >= 0) are ever read: the loader reads the train split through
`ZarrImageDataset`, drops unlabelled rows, and `TrainRows.check` refuses any batch holding another store row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medpipe.gan import GanInputError
from medpipe.gan.config import GanConfig
from medpipe.gan.models import check_sample_shape
from medpipe.store import SPLIT_CODES, attrs_of, get_array, get_group
from medpipe.training.config import TrainConfig
from medpipe.training.data import ZarrImageDataset, open_group
from medpipe.training.engine import _loader
from medpipe.volumes import store_layout


@dataclass(frozen=True)
class TrainRows:
    """The store rows a GAN may read: `allowed` (N,) bool marks split 0 rows with a label >= 0."""

    allowed: np.ndarray

    def check(self, indices: torch.Tensor | np.ndarray) -> None:
        """RuntimeError unless every store row of a batch is a labelled train row (a medpipe bug otherwise)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and not (((idx >= 0) & (idx < self.allowed.size)).all() and self.allowed[idx].all()):
            raise RuntimeError("the GAN was given a sample outside the labelled train split")


def gan_store_facts(store_url: str, min_per_class: int) -> dict[str, Any]:
    """Check that a store can train the GAN; returns {"content_hash", "classes" (names), "num_classes",
    "sample_shape" [C, H, W], "class_counts" (labelled train samples per class), "rows" (TrainRows)}.
    GanInputError (one line) for an incomplete store, another layout, unsupported shapes, no labelled train
    samples or a class with fewer than `min_per_class` of them."""
    root = open_group(store_url)
    attrs = attrs_of(root)
    if not attrs or not attrs.get("complete"):
        raise GanInputError(f"{store_url} is not a complete medpipe store: finish `medpipe ingest` first")
    layout = store_layout(attrs)
    if layout != "fixed" or attrs.get("kind", "2d") != "2d":
        raise GanInputError(f"the GAN trains on 2D stores of the fixed layout; {store_url} is a "
                            f"{attrs.get('kind', '?')} store of layout {layout!r}")
    if "training" not in root or "images" not in get_group(root, "training") or "samples" not in root:
        raise GanInputError(f"{store_url} has no training arrays or sample table: was ingestion completed?")
    shape = list(check_sample_shape(get_array(root, "training/images").shape[1:]))
    split = np.asarray(get_array(root, "samples/split")[...])
    labels = np.asarray(get_array(root, "training/labels")[...], dtype=np.int64)
    train = split == SPLIT_CODES["train"]
    allowed = train & (labels >= 0)
    if not allowed.any():
        raise GanInputError(f"{store_url} has no labelled samples in the train split ({int(train.sum())} train "
                            "samples): the class-conditional GAN needs labels (ingest with a labels manifest)")
    names = [str(c) for c in attrs.get("classes") or []]
    num_classes = max(len(names), int(labels[allowed].max()) + 1)
    names += [f"class {k}" for k in range(len(names), num_classes)]
    counts = np.bincount(labels[allowed], minlength=num_classes)
    few = [f"{names[k]!r} ({int(n)})" for k, n in enumerate(counts) if n < min_per_class]
    if few:
        raise GanInputError(f"the GAN needs at least {min_per_class} labelled train samples per class "
                            f"(min_per_class); {store_url} has fewer for {', '.join(few)}")
    return {"content_hash": attrs.get("content_hash"), "classes": names, "num_classes": num_classes,
            "sample_shape": shape, "class_counts": [int(n) for n in counts], "rows": TrainRows(allowed)}


def train_dataset(store_url: str) -> ZarrImageDataset:
    """The store's train split (all of it; unlabelled rows are dropped per batch by `labelled_batch`)."""
    return ZarrImageDataset(store_url, "train", task="classify", cache="auto")


def intensity_range(ds: ZarrImageDataset, rows: TrainRows) -> dict[str, float]:
    """{"min", "max", "mean", "std"} over the labelled train images of `ds`, read chunk-wise."""
    lo, hi, total, total_sq, count = np.inf, -np.inf, 0.0, 0.0, 0
    for block in ds.blocks():
        arrays = ds.read_arrays(block)
        keep = arrays["labels"] >= 0
        rows.check(arrays["indices"][keep])
        images = arrays["images"][keep].astype(np.float64)
        if images.size:
            lo, hi = min(lo, float(images.min())), max(hi, float(images.max()))
            total, total_sq, count = total + float(images.sum()), total_sq + float((images**2).sum()), count + images.size
    mean = total / count
    return {"min": lo, "max": hi, "mean": mean, "std": float(np.sqrt(max(total_sq / count - mean**2, 0.0)))}


def train_loader(ds: ZarrImageDataset, config: GanConfig, device: torch.device) -> DataLoader:
    """Block-shuffled batches {"image" (B, C, H, W) float32, "label" (B,), "index" (B,)} from the training engine's
    loader (`medpipe.training.engine._loader`: chunk-wise reads, seeded workers); the order of an epoch is a function
    of (seed, epoch), set by `medpipe.training.engine._start_epoch`."""
    settings = TrainConfig(seed=config.seed, num_workers=config.num_workers)  # the loader's settings only
    return _loader(ds, settings, config.batch_size, shuffle=True, drop_last=len(ds) > config.batch_size,
                   device=device)


def labelled_batch(batch: dict[str, torch.Tensor], rows: TrainRows) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a batch's labelled rows, after checking they are all labelled train rows."""
    keep = batch["label"] >= 0
    rows.check(batch["index"][keep])
    return batch["image"][keep], batch["label"][keep]
