"""Loader throughput: ZarrImageDataset (chunk-wise reads, block-shuffled batches) against in-memory tensors and
MONAI's PersistentDataset / CacheDataset on the same 2D 64x64 samples, batch 256, num_workers 0 and 2.

Goals: >= 0.9x TensorDataset with an uncompressed store, >= 0.6x with the default (zstd) store, >= 20x
PersistentDataset. Every baseline is measured in the same run. Prints one line per ratio.

    python benchmarks/loader.py [--samples 8192] [--epochs 2] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from medpipe.config import StoreConfig  # noqa: E402
from medpipe.training.data import BlockShuffleSampler, ZarrImageDataset, collate_samples  # noqa: E402
from training_store import synthetic_2d, write_store  # noqa: E402

BATCH = 256


def _rate(loader: DataLoader, epochs: int, set_epoch=None) -> float:
    """Best samples/s over `epochs` epochs after one warm-up epoch (workers started, caches filled)."""
    best = 0.0
    for epoch in range(epochs + 1):
        if set_epoch is not None:
            set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for batch in loader:
            images = batch["image"] if isinstance(batch, dict) else batch[0]
            n += images.shape[0]
        if epoch:  # epoch 0 is the warm-up
            best = max(best, n / (time.perf_counter() - start))
    return best


def _kw(workers: int) -> dict:
    return {"num_workers": workers, "persistent_workers": workers > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up) per loader")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    from monai.data import CacheDataset, PersistentDataset
    from monai.transforms import EnsureTyped

    images, labels = synthetic_2d(args.samples, 64, seed=0)
    split = np.zeros(args.samples, dtype=np.int8)  # every sample in train: the loaders see the same samples
    with tempfile.TemporaryDirectory() as tmp:
        stores = {codec: write_store(f"{tmp}/{codec}.zarr", images, labels, split=split,
                                     store_config=StoreConfig(codec=codec))
                  for codec in ("none", "zstd")}
        items = [{"image": images[i], "label": int(labels[i])} for i in range(args.samples)]
        transform = EnsureTyped(keys=["image"], track_meta=False)
        persistent = PersistentDataset(items, transform, cache_dir=f"{tmp}/persistent")
        cached = CacheDataset(items, transform, progress=False, num_workers=0)
        tensors = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
        print(f"# {args.samples} samples 1x64x64 float32, batch {BATCH}, best of {args.epochs} epochs; "
              f"torch threads {torch.get_num_threads()}")
        for workers in args.workers:
            g = torch.Generator().manual_seed(0)
            base = _rate(DataLoader(tensors, batch_size=BATCH, shuffle=True, generator=g, **_kw(workers)), args.epochs)
            rates = {}
            for codec, url in stores.items():
                ds = ZarrImageDataset(url, "train", cache="none")
                sampler = BlockShuffleSampler(ds, BATCH, seed=0)
                rates[codec] = _rate(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_samples, **_kw(workers)), args.epochs,
                                     sampler.set_epoch)
            pers = _rate(DataLoader(persistent, batch_size=BATCH, shuffle=True, **_kw(workers)), args.epochs)
            cach = _rate(DataLoader(cached, batch_size=BATCH, shuffle=True, **_kw(workers)), args.epochs)
            print(f"workers={workers} baselines samples/s: tensors {base:,.0f}, PersistentDataset {pers:,.0f}, "
                  f"CacheDataset {cach:,.0f}; zarr none {rates['none']:,.0f}, zarr zstd {rates['zstd']:,.0f}")
            print(f"workers={workers} zarr(codec=none) / TensorDataset     = {rates['none'] / base:.2f}x  (goal >= 0.9)")
            print(f"workers={workers} zarr(zstd)       / TensorDataset     = {rates['zstd'] / base:.2f}x  (goal >= 0.6)")
            print(f"workers={workers} zarr(zstd)       / PersistentDataset = {rates['zstd'] / pers:.1f}x  (goal >= 20)")
            print(f"workers={workers} zarr(zstd)       / CacheDataset      = {rates['zstd'] / cach:.2f}x")


if __name__ == "__main__":
    main()
