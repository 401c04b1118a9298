"""GAN training throughput: real images/s of `train_gan` (store-fed: chunk reads, DiffAugment, lazy R1, EMA,
checkpoint and sample grid per epoch) against the bare D+G step on image tensors already on the device, same
networks and batch. On CUDA: bf16 autocast (the config's auto). Without CUDA it measures the CPU
(the baseline ratio still holds) and says so.

    python benchmarks/gpu_gan.py [--samples 2048] [--size 64] [--batch 32] [--width 32] [--epochs 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks._common import ratio_line  # noqa: E402
from medpipe.gan.config import GanConfig  # noqa: E402
from medpipe.gan.train import _build, _train_step, train_gan  # noqa: E402
from training_store import synthetic_2d, write_store  # noqa: E402


def _bare_rate(config: GanConfig, shape: tuple[int, int, int], device: torch.device, steps: int, batch: int
               ) -> float:
    """Real images/s of `_train_step` on random tensors already on the device (no data loading, no checkpoints)."""
    spec = {"latent_dim": config.latent_dim, "num_classes": 2, "sample_shape": list(shape), "width": config.width}
    nets = _build(spec, config, device)
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    real = torch.rand(batch, *shape, device=device) * 2 - 1
    y = torch.randint(0, 2, (batch,), device=device)
    gamma = config.effective_r1_gamma(shape[1], shape[2])
    _train_step(nets, real, y, config, gamma, amp)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        _train_step(nets, real, y, config, gamma, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    config = GanConfig(epochs=args.epochs, width=args.width, batch_size=args.batch, device=device.type)
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = synthetic_2d(args.samples, args.size, seed=0)
        url = write_store(f"{tmp}/gan.zarr", images, labels, split=np.zeros(args.samples, np.int8))
        start = time.perf_counter()
        result = train_gan(url, f"{tmp}/run", config)
        seconds = time.perf_counter() - start
        fed = args.samples * result.epochs_completed / seconds
    steps = max(5, args.samples // args.batch // 4)
    bare = _bare_rate(config, (1, args.size, args.size), device, steps, args.batch)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (no CUDA device: CPU numbers)"
    print(f"# {name}: {args.samples} images 1x{args.size}x{args.size}, batch {args.batch}, width {args.width}")
    print(f"train_gan (store-fed, whole loop): {fed:,.1f} images/s; bare D+G step on device tensors: {bare:,.1f}")
    print(ratio_line("train_gan / bare step", fed / bare, ">= 0.8", "loading, EMA, R1, checkpoints, grids"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
