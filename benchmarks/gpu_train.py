"""GPU training throughput fed by the Zarr loaders against the same batches already on the GPU, plus peak GPU
memory, for 2D classification (ZarrImageDataset, block-shuffled batches) and 3D patches (PatchDataset).

Each case runs one warm-up epoch (cudnn autotune, worker start), then one timed epoch fed by the DataLoader
(workers, pinned memory, non-blocking copies, bf16/fp16 autocast, channels-last) and one timed epoch over the
same batches held on the GPU. Goal: zarr-fed / gpu-tensor >= 0.9. Without CUDA it says so and exits 0;
`--dry-run` runs the CPU side (stores, datasets, loaders, one batch each) on tiny data.

    python benchmarks/gpu_train.py [--samples 16384] [--batch 256] [--workers 4] [--model small-cnn]
                                   [--cases 4] [--shape 96 192 192] [--patch 64 128 128] [--patch-batch 2]
                                   [--patches 64] [--dry-run]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.patches import write_cases  # noqa: E402
from medpipe.planning import plan_segmentation  # noqa: E402
from medpipe.training.data import (BlockShuffleSampler, ZarrImageDataset, collate_samples, seed_worker,  # noqa: E402
                                   worker_context)
from medpipe.training.models import build_model, build_plan_unet  # noqa: E402
from medpipe.training.patches import PatchDataset  # noqa: E402
from training_store import synthetic_2d, write_store  # noqa: E402

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def loader_2d(url: str, batch: int, workers: int, pin: bool) -> tuple[DataLoader, BlockShuffleSampler]:
    """The 2D classification loader as training builds it (sampler told the workers, persistent workers)."""
    ds = ZarrImageDataset(url, "train", cache="none")
    sampler = BlockShuffleSampler(ds, batch, seed=0, workers=workers)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_samples, num_workers=workers, pin_memory=pin,
                        worker_init_fn=seed_worker, multiprocessing_context=worker_context(workers),
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    return loader, sampler


def loader_3d(url: str, cases: int, shape: tuple[int, int, int], patch: tuple[int, int, int], batch: int,
              patches: int, workers: int, pin: bool) -> DataLoader:
    """Random raw patches of a synthetic volumes store (foreground-oversampled, as patch training draws them)."""
    volumes = write_cases(url, cases, shape)
    ds = PatchDataset([v.image for v in volumes], [v.mask for v in volumes], patch, patches, rule="last",
                      batch_size=batch)
    return DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=pin, worker_init_fn=seed_worker,
                      multiprocessing_context=worker_context(workers), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None)


def pairs(loader: DataLoader, target: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input, target) of each batch: 2D labels, or 3D masks as class maps."""
    for batch in loader:
        y = batch[target]
        yield batch["image"], (y[:, 0].long() if target == "mask" else y)


def timed_epoch(step: Callable[[torch.Tensor, torch.Tensor], None], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                fmt: torch.memory_format) -> tuple[float, int]:
    """(seconds, images) of one epoch of `step` over batches moved to the GPU (non-blocking from pinned memory)."""
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    for x, y in batches:
        step(x.cuda(non_blocking=True).contiguous(memory_format=fmt), y.cuda(non_blocking=True))
        n += x.shape[0]
    torch.cuda.synchronize()
    return time.perf_counter() - start, n


def compare(name: str, model: torch.nn.Module, zarr_batches: Batches, fmt: torch.memory_format) -> dict[str, Any]:
    """Images/s and peak memory of a zarr-fed epoch and of an epoch over the same batches on the GPU."""
    amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast("cuda", dtype=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    timed_epoch(step, zarr_batches(), fmt)  # warm-up: cudnn autotune, workers started
    torch.cuda.reset_peak_memory_stats()
    zs, zn = timed_epoch(step, zarr_batches(), fmt)
    peak_zarr = torch.cuda.max_memory_allocated()
    held = [(x.cuda().contiguous(memory_format=fmt), y.cuda()) for x, y in zarr_batches()]
    timed_epoch(step, held, fmt)
    torch.cuda.reset_peak_memory_stats()
    gs, gn = timed_epoch(step, held, fmt)
    peak_gpu = torch.cuda.max_memory_allocated()
    result = {"zarr_images_per_s": zn / zs, "gpu_images_per_s": gn / gs, "ratio": (zn / zs) / (gn / gs),
              "peak_zarr_mib": peak_zarr / 2**20, "peak_gpu_mib": peak_gpu / 2**20}
    print(f"{name}: zarr-fed {result['zarr_images_per_s']:,.1f} images/s (peak {result['peak_zarr_mib']:,.0f} MiB), "
          f"gpu-tensor {result['gpu_images_per_s']:,.1f} images/s (peak {result['peak_gpu_mib']:,.0f} MiB), "
          f"zarr-fed / gpu-tensor = {result['ratio']:.2f}x (goal >= 0.9)")
    return result


def plan_unet(patch: tuple[int, int, int], batch: int) -> torch.nn.Module:
    """The planned 3D U-Net for `patch` (as patch training builds it)."""
    plan = plan_segmentation(spacings=[(2.0, 0.8, 0.8)], shapes=[patch], overrides={
        "patch_size": list(patch), "batch_size": batch, "memory_budget_bytes": 8 << 30})
    return build_plan_unet(plan, 1, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--store", default=None, help="an existing 2D classification store (default: synthetic)")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 192, 192])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128])
    parser.add_argument("--patch-batch", type=int, default=2)
    parser.add_argument("--patches", type=int, default=64, help="patches per 3D epoch")
    parser.add_argument("--dry-run", action="store_true", help="CPU side only, tiny data (no GPU needed)")
    args = parser.parse_args()
    if min(args.samples, args.batch, args.cases, args.patch_batch, args.patches) < 1 or args.workers < 0:
        parser.error("sizes must be >= 1 and --workers >= 0")
    if args.dry_run:
        args.samples, args.batch, args.workers, args.cases = 64, 16, 0, 1
        args.shape, args.patch, args.patches = [16, 32, 32], [8, 16, 16], 4
    elif not torch.cuda.is_available():
        print("no CUDA device: GPU training benchmark skipped")
        return 0
    patch = (args.patch[0], args.patch[1], args.patch[2])
    shape = (args.shape[0], args.shape[1], args.shape[2])
    pin = not args.dry_run
    with tempfile.TemporaryDirectory() as tmp:
        url = args.store
        if url is None:
            images, labels = synthetic_2d(args.samples, 32 if args.dry_run else 64, seed=0)
            url = write_store(f"{tmp}/bench.zarr", images, labels, split=np.zeros(args.samples, np.int8))
        loader2, sampler = loader_2d(url, args.batch, args.workers, pin)
        loader3 = loader_3d(f"{tmp}/volumes.zarr", args.cases, shape, patch, args.patch_batch, args.patches,
                            args.workers, pin)
        sample_shape = loader2.dataset.sample_shape  # type: ignore[attr-defined]
        model2 = build_model(args.model, "classify", len(sample_shape) - 1, sample_shape[0], 2)
        model3 = plan_unet(patch, args.patch_batch)
        if args.dry_run:  # the CPU side: one batch of each loader through its model
            x, y = next(pairs(loader2, "label"))
            x3, y3 = next(pairs(loader3, "mask"))
            with torch.no_grad():
                out2, out3 = model2(x), model3(x3)
            print(f"dry run: 2d batch {tuple(x.shape)} -> {tuple(out2.shape)}, labels {tuple(y.shape)}; "
                  f"3d batch {tuple(x3.shape)} -> {tuple(out3.shape)}, masks {tuple(y3.shape)}")
            return 0
        torch.backends.cudnn.benchmark = True
        print(f"# {torch.cuda.get_device_name()}; workers {args.workers}; 2d {args.model} {tuple(sample_shape)} batch "
              f"{args.batch}; 3d plan U-Net patch {list(patch)} batch {args.patch_batch}")
        epoch = iter(range(10**9))

        def batches_2d() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            sampler.set_epoch(next(epoch))
            return pairs(loader2, "label")

        compare("2d classification", model2.cuda().to(memory_format=torch.channels_last), batches_2d,
                torch.channels_last)
        compare("3d patches", model3.cuda().to(memory_format=torch.channels_last_3d),
                lambda: pairs(loader3, "mask"), torch.channels_last_3d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
