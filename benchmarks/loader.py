"""Loader throughput against the physical limit, every baseline measured in the same run.

2D: ZarrImageDataset (ChunkReader, block-shuffled batches) on a default (blosc-zstd) store of 64x64 float32
samples (`--training-dtype` float16 or uint8: stored so, read as float32; for uint8 the codec's decode includes
the unpacking to float32, which is part of its zarr codec chain), batch 256, at 0 and N DataLoader workers (the store 8x the loader's 64 MiB chunk LRU by default, so no
decoded chunk survives from one epoch to the next: the figures measure decoding, as on a real dataset, not the LRU),
against
  (a) the codec's own decode rate: every chunk's stored bytes read once into memory, then decoded in a tight loop
      (single-threaded, as each loader process decodes): the limit for a compressed store;
  (b) in-memory tensors indexed in batches (`tensor[perm[batch]]`);
  (c) MONAI PersistentDataset and CacheDataset through a DataLoader (0 workers);
  (d) decode + gather without the loader: the sampler's batches of one epoch, each chunk decoded into buffers
      reused as the loader's chunk LRU reuses them, rows gathered with numpy (float32/float16 stores): the floor of
      any design that decodes whole chunks and then gathers a shuffled batch, on this machine.
Chunk-read stage alone: ChunkReader vs zarr slicing vs tensorstore (when installed) on the same chunks.
3D: patches/s of PatchDataset's read_patch (raw, 0 workers) against the codec decode of the chunks each patch
touches (image and mask).

Goals: loader(0 workers) >= 0.8x codec decode; loader(N workers) >= 1.7x loader(0 workers) on 2 cores;
loader >= 20x PersistentDataset. `--json` adds one JSON object of all figures as the last line.

    python benchmarks/loader.py [--samples 32768] [--epochs 2] [--workers 2] [--cases 3] [--patches 40]
                                [--training-dtype float32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import psutil
import torch
import zarr
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks._common import ratio_line  # noqa: E402
from benchmarks.patches import write_cases  # noqa: E402
from medpipe.config import StoreConfig  # noqa: E402
from medpipe.training.chunk_reader import ChunkReader, decode_chunk  # noqa: E402
from medpipe.training.data import (BlockShuffleSampler, ZarrImageDataset, collate_samples, seed_worker,  # noqa: E402
                                   worker_context)
from medpipe.training.patches import PatchDataset  # noqa: E402
from training_store import synthetic_2d, write_store  # noqa: E402

BATCH = 256


CPU_US: dict[str, float] = {}  # CPU microseconds per item of the last best_rate call, by its `name`


def best_rate(run: Callable[[], int], repeats: int, name: str = "") -> float:
    """Best items/s of `repeats` calls of run() (each returns the items it processed); with `name`, also the least
    CPU time per item (this process) into CPU_US[name]: a figure that other load on the machine barely moves."""
    best, cpu = 0.0, float("inf")
    for _ in range(repeats):
        start, cpu0 = time.perf_counter(), time.process_time()
        n = run()
        best = max(best, n / (time.perf_counter() - start))
        cpu = min(cpu, (time.process_time() - cpu0) / max(n, 1) * 1e6)
    if name:
        CPU_US[name] = cpu
    return best


def _cpu_seconds(loader: DataLoader) -> float:
    """CPU seconds used so far by this process and the loader's live workers."""
    iterator = getattr(loader, "_iterator", None)
    pids = [w.pid for w in getattr(iterator, "_workers", [])] if loader.num_workers else []
    return time.process_time() + sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def loader_rate(loader: DataLoader, epochs: int, set_epoch: Callable[[int], None] | None = None
                ) -> tuple[float, float, float]:
    """(best samples/s over `epochs` epochs after one warm-up epoch, seconds to the warm-up's first batch (worker
    start-up), CPU microseconds per sample of the timed epochs, this process and the workers together)."""
    start_s = 0.0
    best = 0.0
    cpu, total = 0.0, 0
    for epoch in range(epochs + 1):
        if set_epoch is not None:
            set_epoch(epoch)
        cpu0 = _cpu_seconds(loader) if epoch else 0.0
        start, n = time.perf_counter(), 0
        for batch in loader:
            if n == 0 and epoch == 0:
                start_s = time.perf_counter() - start
            n += (batch["image"] if isinstance(batch, dict) else batch[0]).shape[0]
        if epoch:
            best = max(best, n / (time.perf_counter() - start))
            cpu, total = cpu + _cpu_seconds(loader) - cpu0, total + n
    return best, start_s, cpu / max(total, 1) * 1e6


def codec_decode_rate(reader: ChunkReader, coords: list[tuple[int, ...]], per_item: list[list[int]],
                      repeats: int) -> float:
    """Items/s of decoding, in a tight loop, the chunks each item needs (`per_item`: indexes into coords), from
    their stored bytes held in memory (read from the store once, before timing)."""
    blobs = [None if b is None else np.array(b) for b in reader.fetch_chunks(coords)]

    def run() -> int:
        for needed in per_item:
            for k in needed:
                reader.recycle(reader.decode(blobs[k]))
        return len(per_item)

    return best_rate(run, repeats, "codec_decode")


def decode_gather_rate(reader: ChunkReader, batches: list[np.ndarray], held: int, repeats: int) -> float:
    """Samples/s of the loader's work without the loader: for each of the sampler's batches (store rows, one run per
    chunk), decode the chunks not yet held (from stored bytes in memory, into `held` buffers reused oldest first, as
    the loader's chunk LRU does) and gather the batch's rows into one output with numpy. The floor of any
    decode-then-gather design on this machine; the gap between it and the codec's own rate is memory traffic (the
    decoded chunks leave the CPU cache before their rows are gathered), the gap to the loader is the loader's own."""
    c = reader.layout.chunk_len
    blobs = [None if b is None else np.array(b) for b in reader.fetch(list(range(reader.n_chunks)))]
    plan = []  # per batch: (chunk id, rows in chunk, output slice)
    for rows in batches:
        chunk_of = rows // c
        edges = [0, *(np.flatnonzero(np.diff(chunk_of)) + 1).tolist(), rows.size]
        plan.append([(int(chunk_of[a]), rows[a:b] - int(chunk_of[a]) * c, slice(a, b)) for a, b in zip(edges, edges[1:])])
    out = np.empty((max(r.size for r in batches), *reader.shape[1:]), reader.layout.dtype)
    buffers = [np.empty(reader.layout.chunk_shape, reader.layout.dtype) for _ in range(held)]

    def run() -> int:
        where: dict[int, int] = {}  # chunk id -> buffer holding it
        owner = [-1] * held
        turn = 0
        for parts in plan:
            for cid, local, sel in parts:
                k = where.get(cid)
                if k is None:
                    k, turn = turn, (turn + 1) % held
                    where.pop(owner[k], None)
                    owner[k], where[cid] = cid, k
                    decode_chunk(blobs[cid], buffers[k], reader.layout.compressor)
                np.take(buffers[k], local, axis=0, out=out[sel], mode="clip")
        return sum(r.size for r in batches)

    rate = best_rate(run, repeats)
    for cid, local, sel in plan[-1]:  # a baseline that gathered other rows would be no baseline
        if not np.array_equal(out[sel], reader.read([cid])[0][local]):
            raise AssertionError(f"decode + gather read other rows than the store holds (chunk {cid})")
    return rate


def zarr_slicing_rate(array: zarr.Array, repeats: int) -> float:
    """Samples/s of reading every row chunk with a zarr slice (the previous loader's read path)."""
    c = int(array.chunks[0])
    return best_rate(lambda: sum(np.asarray(array[s : s + c]).shape[0] for s in range(0, array.shape[0], c)), repeats)


def chunk_reader_rate(reader: ChunkReader, repeats: int, group: int = 8) -> float:
    """Samples/s of ChunkReader.read over every row chunk, `group` chunks per request (a batch's worth)."""
    ids = list(range(reader.n_chunks))

    def run() -> int:
        for s in range(0, len(ids), group):
            for block in reader.read(ids[s : s + group]):
                reader.recycle(block)
        return reader.shape[0]

    return best_rate(run, repeats)


def tensorstore_rate(array_path: str, chunk: int, n: int, repeats: int) -> float | None:
    """Samples/s of tensorstore reading every row chunk (one copy thread, no cache); None when not installed."""
    try:
        import tensorstore as ts
    except ImportError:
        return None
    context = ts.Context({"data_copy_concurrency": {"limit": 1}, "cache_pool": {"total_bytes_limit": 0}})
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": array_path}}, read=True,
                  context=context).result()
    return best_rate(lambda: sum(arr[s : s + chunk].read().result().shape[0] for s in range(0, n, chunk)), repeats)


def tensor_batches_rate(images: torch.Tensor, labels: torch.Tensor, repeats: int) -> float:
    """Samples/s of batches indexed from in-memory tensors with a random permutation's batch of indices."""
    def run() -> int:
        perm = torch.randperm(images.shape[0])
        for s in range(0, images.shape[0], BATCH):
            idx = perm[s : s + BATCH]
            images[idx], labels[idx]
        return int(images.shape[0])

    return best_rate(run, repeats)


def zarr_loader(ds: ZarrImageDataset, workers: int, deal: bool = True) -> tuple[DataLoader, BlockShuffleSampler]:
    """The training engine's loader for `ds` (persistent workers); deal=False: the sampler not told the workers."""
    sampler = BlockShuffleSampler(ds, BATCH, seed=0, workers=workers if deal else 0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_samples, num_workers=workers,
                        worker_init_fn=seed_worker, multiprocessing_context=worker_context(workers),
                        persistent_workers=workers > 0)
    return loader, sampler


def monai_rates(images: np.ndarray, labels: np.ndarray, cache_dir: str, epochs: int) -> tuple[float, float]:
    """(PersistentDataset, CacheDataset) samples/s through a shuffling DataLoader, 0 workers."""
    from monai.data import CacheDataset, PersistentDataset
    from monai.transforms import EnsureTyped

    items = [{"image": images[i], "label": int(labels[i])} for i in range(len(labels))]
    transform = EnsureTyped(keys=["image"], track_meta=False)
    persistent = PersistentDataset(items, transform, cache_dir=cache_dir)
    cached = CacheDataset(items, transform, progress=False, num_workers=0)
    rates = [loader_rate(DataLoader(ds, batch_size=BATCH, shuffle=True), epochs)[0] for ds in (persistent, cached)]
    return rates[0], rates[1]


def _chunk_span(origin: Iterable[int], patch: Iterable[int], shape: tuple[int, ...], chunks: tuple[int, ...]
                ) -> list[tuple[int, ...]]:
    """Grid coordinates of the chunks of a (C, Z, Y, X) array that the patch at origin overlaps."""
    ranges = [range(-(-shape[0] // chunks[0]))]
    for o, p, s, c in zip(origin, patch, shape[1:], chunks[1:]):
        lo, hi = max(int(o), 0), min(int(o) + int(p), s)
        ranges.append(range(lo // c, (hi - 1) // c + 1) if hi > lo else range(0))
    return [tuple(int(v) for v in c) for c in np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 4)]


def patch_rates(url: str, cases: int, shape: tuple[int, int, int], patch: tuple[int, int, int], n: int,
                repeats: int) -> tuple[float, float]:
    """(patches/s of PatchDataset reading raw patches at 0 workers, patches/s of decoding the chunks they touch)."""
    volumes = write_cases(url, cases, shape)
    ds = PatchDataset([v.image for v in volumes], [v.mask for v in volumes], patch, n, seed=0)
    draws = [ds.draw(i) for i in range(n)]
    limit_time = 0.0
    for name in ("image", "mask"):  # the limit: decode every chunk a patch touches, image and mask
        per_array: dict[int, list[tuple[int, ...]]] = {}
        per_item: list[tuple[int, list[tuple[int, ...]]]] = []
        for case, origin in draws:
            arr = getattr(volumes[case], name)
            needed = _chunk_span(origin, patch, tuple(arr.shape), tuple(arr.chunks))
            per_item.append((case, needed))
            per_array.setdefault(case, [])
            per_array[case].extend(c for c in needed if c not in per_array[case])
        for case, coords in per_array.items():
            items = [[coords.index(c) for c in needed] for k, needed in per_item if k == case]
            limit_time += len(items) / codec_decode_rate(ChunkReader(getattr(volumes[case], name)), coords, items,
                                                         repeats)
    read = best_rate(lambda: sum(1 for i in range(n) if ds[i] is not None), repeats)
    return read, n / limit_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32768,
                        help="64x64 float32 samples (16 KiB each); 8192 fits half in the chunk LRU, which then "
                             "spares ~20%% of the decodes of the next epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up) per loader")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers compared with 0")
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 160, 160])
    parser.add_argument("--patch", type=int, nargs=3, default=[48, 96, 96])
    parser.add_argument("--patches", type=int, default=40, help="patches timed")
    parser.add_argument("--training-dtype", choices=("float32", "float16", "uint8"), default="float32",
                        help="dtype of the stored samples (uint8: packed steps of 1/255, read as float32)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object of all figures")
    args = parser.parse_args()
    if args.samples < BATCH or args.epochs < 1 or args.workers < 1 or args.patches < 1 or args.cases < 1:
        parser.error("need --samples >= 256, --epochs, --workers, --patches and --cases >= 1")
    repeats = max(2, args.epochs)
    w = args.workers
    fig: dict[str, Any] = {}
    images, labels = synthetic_2d(args.samples, 64, seed=0)
    split = np.zeros(args.samples, dtype=np.int8)  # every sample in train: all loaders see the same samples
    with tempfile.TemporaryDirectory() as tmp:
        url = write_store(f"{tmp}/bench.zarr", images, labels, split=split,
                          store_config=StoreConfig(training_dtype=args.training_dtype))
        array = zarr.open_group(url, mode="r")["training/images"]
        reader = ChunkReader(array)
        rows = [(cid,) + (0,) * 3 for cid in range(reader.n_chunks)]
        per_chunk = codec_decode_rate(reader, rows, [[k] for k in range(len(rows))], repeats)
        fig["codec_decode_samples_per_s"] = per_chunk * args.samples / reader.n_chunks  # chunks/s -> samples/s
        fig["codec_decode_cpu_us_per_sample"] = CPU_US["codec_decode"] * reader.n_chunks / args.samples
        fig["chunk_reader_samples_per_s"] = chunk_reader_rate(reader, repeats)
        fig["zarr_slicing_samples_per_s"] = zarr_slicing_rate(array, repeats)
        ts_rate = tensorstore_rate(f"{url}/training/images", reader.layout.chunk_len, args.samples, repeats)
        if ts_rate is not None:
            fig["tensorstore_samples_per_s"] = ts_rate
        fig["tensor_batches_samples_per_s"] = tensor_batches_rate(torch.from_numpy(images), torch.from_numpy(labels),
                                                                  repeats)
        fig["persistent_dataset_samples_per_s"], fig["cache_dataset_samples_per_s"] = monai_rates(
            images, labels, f"{tmp}/persistent", args.epochs)
        ds = ZarrImageDataset(url, "train", cache="none")
        if reader.direct and reader.layout.unpack is None:  # float32/float16 stores (packed ones unpack as well)
            held = max(1, ds.chunk_cache_bytes // (reader.layout.chunk_len * int(np.prod(reader.shape[1:]))
                                                   * reader.layout.dtype.itemsize))
            fig["decode_gather_samples_per_s"] = decode_gather_rate(
                reader, [ds.indices[b] for b in BlockShuffleSampler(ds, BATCH, seed=0).batches()], held, repeats)
        for workers, deal, key in ((0, True, "0_workers"), (w, True, f"{w}_workers"), (w, False, f"{w}_workers_undealt")):
            loader, sampler = zarr_loader(ds, workers, deal)
            rate, started, cpu = loader_rate(loader, args.epochs, sampler.set_epoch)
            fig[f"loader_samples_per_s_{key}"] = rate
            fig[f"loader_cpu_us_per_sample_{key}"] = cpu
            if workers and deal:
                fig["worker_start_s"] = started
            del loader  # persistent workers end with their loader
        fig["patches_per_s"], fig["patch_limit_per_s"] = patch_rates(
            f"{tmp}/volumes.zarr", args.cases, tuple(args.shape), tuple(args.patch), args.patches, repeats)

    zero = fig["loader_samples_per_s_0_workers"]
    fig["loader_vs_codec_decode"] = zero / fig["codec_decode_samples_per_s"]
    fig[f"loader_{w}_workers_vs_0"] = fig[f"loader_samples_per_s_{w}_workers"] / zero
    fig["loader_vs_persistent_dataset"] = zero / fig["persistent_dataset_samples_per_s"]
    # the same two goals in CPU time, which other load on the machine barely moves: decode CPU / loader CPU, and
    # the rate N workers reach on min(N, cores) otherwise idle cores at the measured CPU per sample
    cpu0 = fig["loader_cpu_us_per_sample_0_workers"]
    fig["loader_vs_codec_decode_cpu"] = fig["codec_decode_cpu_us_per_sample"] / max(cpu0, 1e-9)
    fig[f"loader_{w}_workers_vs_0_projected"] = min(w, os.cpu_count() or 1) * cpu0 / max(
        fig[f"loader_cpu_us_per_sample_{w}_workers"], 1e-9)
    fig["loader_vs_tensor_batches"] = zero / fig["tensor_batches_samples_per_s"]
    if "decode_gather_samples_per_s" in fig:
        fig["decode_gather_vs_codec_decode"] = fig["decode_gather_samples_per_s"] / fig["codec_decode_samples_per_s"]
        fig["loader_vs_decode_gather"] = zero / fig["decode_gather_samples_per_s"]
    fig["patches_vs_codec_decode"] = fig["patches_per_s"] / fig["patch_limit_per_s"]

    print(f"# {args.samples} samples 1x64x64 float32 (blosc-zstd store, {reader.layout.chunk_len} per chunk), batch "
          f"{BATCH}, best of {args.epochs} epochs; patches {args.patch} of {args.cases} cases {args.shape}")
    for name, value in fig.items():
        if name.endswith("_per_s") or name.endswith("_s") or "_per_sample_" in name:
            print(f"{name:<44} {value:>12,.1f}")
    print(ratio_line("loader(0 workers) / codec decode", fig["loader_vs_codec_decode"], ">= 0.8", "samples/s"))
    print(ratio_line("  in CPU time per sample", fig["loader_vs_codec_decode_cpu"], ">= 0.8", "decode / loader"))
    if "decode_gather_samples_per_s" in fig:
        print(ratio_line("  decode + gather (no loader) / codec decode", fig["decode_gather_vs_codec_decode"], "-",
                         "the sampler's batches, numpy only: the floor of decode-then-gather"))
        print(ratio_line("  loader(0 workers) / decode + gather", fig["loader_vs_decode_gather"], "-",
                         "what the loader itself costs"))
    print(ratio_line(f"loader({w} workers) / loader(0 workers)", fig[f"loader_{w}_workers_vs_0"], ">= 1.7",
                     f"{w} workers, sampler dealing windows to workers"))
    print(ratio_line("  projected on idle cores from CPU time", fig[f"loader_{w}_workers_vs_0_projected"], ">= 1.7",
                     f"min({w}, cores) x CPU(0 workers) / CPU({w} workers)"))
    print(ratio_line(f"loader({w} workers, not dealt) / loader(0)",
                     fig[f"loader_samples_per_s_{w}_workers_undealt"] / zero, "-", "round-robin batches"))
    print(ratio_line(f"CPU per sample, {w} workers / 0 workers", fig[f"loader_cpu_us_per_sample_{w}_workers"]
                     / max(fig["loader_cpu_us_per_sample_0_workers"], 1e-9), "-",
                     f"all processes; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"))
    print(ratio_line("loader(0 workers) / PersistentDataset", fig["loader_vs_persistent_dataset"], ">= 20", "0 workers"))
    print(ratio_line("loader(0 workers) / tensor batches", fig["loader_vs_tensor_batches"], "-", "in memory"))
    print(ratio_line("patch reads / codec decode of their chunks", fig["patches_vs_codec_decode"], "-",
                     "raw patches, 0 workers"))
    if args.json:
        print(json.dumps({k: round(float(v), 4) for k, v in fig.items()}, sort_keys=True))


if __name__ == "__main__":
    main()
