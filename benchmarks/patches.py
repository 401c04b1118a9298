"""Does the patch loader keep pace with training? Patches/s fed by PatchDataset (zarr volumes-layout cases, reads
only the chunks a patch touches, augmented) against (a) the same patches cropped from volumes already in memory
and (b) the patches/s the plan's U-Net consumes in training steps on this machine's device (CUDA when present).

Prints one ratio line each: loader / in-memory crop (the cost of reading from the store), and loader / training
appetite (>= 1 means the GPU, or CPU, never waits for data). Everything is measured in the same run.

    python benchmarks/patches.py [--cases 4] [--shape 128 256 256] [--patch 64 128 128] [--workers 0 2] [--steps 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ratio_line  # noqa: E402
from medpipe.config import StoreConfig  # noqa: E402
from medpipe.planning import plan_segmentation  # noqa: E402
from medpipe.training.data import seed_worker, worker_context  # noqa: E402
from medpipe.training.models import build_plan_unet  # noqa: E402
from medpipe.training.patches import PatchDataset, patch_augmentation  # noqa: E402
from medpipe.volumes import open_case, plan_geometry, write_case  # noqa: E402


def write_cases(url: str, n: int, shape: tuple[int, int, int]) -> list:
    """n synthetic CT-like cases (body ellipsoid, a bright sphere lesion) written as a volumes-layout store."""
    root = zarr.open_group(url, mode="w")
    rng = np.random.default_rng(0)
    z, y, x = shape
    zz, yy, xx = np.ogrid[:z, :y, :x]
    for i in range(n):
        body = ((yy - y / 2) / (0.45 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1
        image = np.where(body, 0.5, -2.0).astype(np.float32) + rng.normal(0, 0.2, shape).astype(np.float32)
        c = rng.integers([z // 4, y // 4, x // 4], [3 * z // 4, 3 * y // 4, 3 * x // 4])
        mask = (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= (min(shape) // 8) ** 2).astype(np.uint8)
        image[mask.astype(bool)] += 1.5
        geometry = plan_geometry(shape, np.diag([0.8, 0.8, 2.0, 1.0]), None)
        write_case(root, i, image[None], mask[None], geometry, f"case{i}", StoreConfig())
    return [open_case(zarr.open_group(url, mode="r"), i) for i in range(n)]


def _loader_rate(dataset: PatchDataset, batch: int, workers: int, batches: int) -> float:
    """Patches/s over `batches` batches after one warm-up batch (workers started)."""
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, worker_init_fn=seed_worker,
                        multiprocessing_context=worker_context(workers), persistent_workers=workers > 0)
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += next(it)["image"].shape[0]
    return n / (time.perf_counter() - start)


def _memory_crop_rate(volumes: list[np.ndarray], dataset: PatchDataset, patches: int) -> float:
    """Patches/s of cropping the same origins from in-memory volumes (no store, no augmentation)."""
    start = time.perf_counter()
    for i in range(patches):
        case, origin = dataset.draw(i)
        sl = tuple(slice(int(o), int(o) + p) for o, p in zip(origin, dataset.patch))
        np.ascontiguousarray(volumes[case][(slice(None), *sl)])
    return patches / (time.perf_counter() - start)


def _training_appetite(patch: tuple[int, int, int], batch: int, steps: int) -> tuple[float, str]:
    """Patches/s consumed by training steps of the planned U-Net on synthetic batches already on the device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = plan_segmentation(spacings=[(2.0, 0.8, 0.8)], shapes=[patch], overrides={"patch_size": list(patch),
                             "batch_size": batch, "memory_budget_bytes": 8 << 30})
    model = build_plan_unet(plan, 1, 2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, *patch, device=device)
    y = torch.randint(0, 2, (batch, *patch), device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return steps * batch / (time.perf_counter() - start), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 192, 192])
    parser.add_argument("--patch", type=int, nargs=3, default=[48, 96, 96])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=20, help="timed loader batches per setting")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    args = parser.parse_args()
    patch = (args.patch[0], args.patch[1], args.patch[2])
    with tempfile.TemporaryDirectory() as tmp:
        cases = write_cases(f"{tmp}/store.zarr", args.cases, tuple(args.shape))
        memory = [np.asarray(c.image[...]) for c in cases]
        per_epoch = args.batch * (args.batches + 1)

        def dataset(augment: bool) -> PatchDataset:
            return PatchDataset([c.image for c in cases], [c.mask for c in cases], patch, per_epoch,
                                rule="last", batch_size=args.batch,
                                transform=patch_augmentation() if augment else None)

        crop = _memory_crop_rate(memory, dataset(False), 50)
        appetite, device = _training_appetite(patch, args.batch, args.steps)
        print(f"cases {args.cases} x {args.shape}, patch {list(patch)}, batch {args.batch}; in-memory crop "
              f"{crop:.0f} patches/s; training on {device} consumes {appetite:.1f} patches/s")
        for workers in args.workers:
            for augment in (False, True):
                rate = _loader_rate(dataset(augment), args.batch, workers, args.batches)
                what = f"{workers} workers, {'augmented' if augment else 'raw'}: {rate:.1f} patches/s"
                label = f"{'augmented' if augment else 'raw'}, {workers} workers"
                print(ratio_line(f"loader / in-memory crop ({label})", rate / crop, "-", what))
                print(ratio_line(f"loader / training appetite ({label})", rate / appetite, ">= 1", what))

if __name__ == "__main__":
    main()
