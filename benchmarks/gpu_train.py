"""GPU training throughput: images/s of one training epoch fed by ZarrImageDataset (DataLoader workers, pinned
memory, bf16/fp16 autocast, channels-last) against the same epoch fed from tensors already on the GPU, plus peak
GPU memory. Without CUDA it says so and exits 0.

    python benchmarks/gpu_train.py [--samples 16384] [--batch 256] [--workers 4] [--model small-cnn] [--store URL]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _epoch(model, optimizer, batches, amp: torch.dtype, fmt) -> tuple[float, int]:
    """One epoch over an iterable of (x, y) on the GPU; returns (seconds, images)."""
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    for x, y in batches:
        x = x.cuda(non_blocking=True).contiguous(memory_format=fmt)
        y = y.cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += x.shape[0]
    torch.cuda.synchronize()
    return time.perf_counter() - start, n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--store", default=None, help="an existing 2D classification store (default: synthetic)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: GPU training benchmark skipped")
        return 0

    from medpipe.training.data import BlockShuffleSampler, ZarrImageDataset, collate_samples
    from medpipe.training.models import build_model
    from training_store import synthetic_2d, write_store

    torch.backends.cudnn.benchmark = True
    amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with tempfile.TemporaryDirectory() as tmp:
        url = args.store
        if url is None:
            images, labels = synthetic_2d(args.samples, 64, seed=0)
            url = write_store(f"{tmp}/bench.zarr", images, labels, split=np.zeros(args.samples, np.int8))
        ds = ZarrImageDataset(url, "train", cache="none")
        sampler = BlockShuffleSampler(ds, args.batch, seed=0)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_samples, num_workers=args.workers, pin_memory=True,
                            persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)
        shape = ds.sample_shape
        fmt = torch.channels_last if len(shape) == 3 else torch.channels_last_3d
        model = build_model(args.model, "classify", len(shape) - 1, shape[0], 2).cuda().to(memory_format=fmt)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def zarr_batches():
            for batch in loader:
                yield batch["image"], batch["label"]

        _epoch(model, optimizer, zarr_batches(), amp, fmt)  # warm-up: cudnn autotune, worker start
        torch.cuda.reset_peak_memory_stats()
        sampler.set_epoch(1)
        zs, zn = _epoch(model, optimizer, zarr_batches(), amp, fmt)
        peak_zarr = torch.cuda.max_memory_allocated()

        arrays = ds.read_arrays(np.arange(len(ds)))
        gx = torch.from_numpy(arrays["images"]).cuda()
        gy = torch.from_numpy(arrays["labels"]).cuda()

        def gpu_batches():
            perm = torch.randperm(gx.shape[0], device="cuda")
            for s in range(0, gx.shape[0], args.batch):
                idx = perm[s : s + args.batch]
                yield gx[idx], gy[idx]

        _epoch(model, optimizer, gpu_batches(), amp, fmt)
        torch.cuda.reset_peak_memory_stats()
        gs, gn = _epoch(model, optimizer, gpu_batches(), amp, fmt)
        peak_gpu = torch.cuda.max_memory_allocated()
    print(f"# {torch.cuda.get_device_name()} model {args.model} {tuple(shape)} batch {args.batch} "
          f"workers {args.workers} amp {amp}")
    print(f"zarr-fed epoch: {zn / zs:,.0f} images/s, peak GPU memory {peak_zarr / 2**20:,.0f} MiB")
    print(f"gpu-tensor epoch: {gn / gs:,.0f} images/s, peak GPU memory {peak_gpu / 2**20:,.0f} MiB")
    print(f"zarr-fed / gpu-tensor = {(zn / zs) / (gn / gs):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
