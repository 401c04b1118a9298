"""What one Dask worker may use: bytes per decoded image (the configured cap, and no more than a quarter of the
worker's memory limit: decoding holds the pixels a few times over) and codec threads (the worker's own)."""

from __future__ import annotations

from typing import Any

WORKER_SHARE = 4


def _worker() -> Any | None:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):  # not inside a Dask worker (tests, serial benchmarks)
        return None


def bound_codec_threads() -> None:
    """Inside a Dask worker, compress with as many threads as the worker has (Dask's convention: its nanny sets
    OMP/MKL threads to 1 for the same reason). Blosc and zarr's codec pool would otherwise each start a thread
    per core in every worker: N workers on N cores ran N x N threads, and one worker alone already used every
    core, so adding workers added little (docs/benchmarks.md). Outside a worker nothing changes."""
    worker = _worker()
    if worker is None:
        return
    import numcodecs.blosc
    import zarr

    threads = max(1, int(getattr(worker.state, "nthreads", 1)))
    numcodecs.blosc.set_nthreads(threads)
    zarr.config.set({"threading.max_workers": threads})  # zarr's pool is made on first use: before any read


def image_byte_limit(configured: int) -> int:
    """The cap to check a file's header against before decoding it, on the worker that will decode it."""
    worker = _worker()
    try:
        memory_limit = int(worker.memory_manager.memory_limit or 0) if worker is not None else 0
    except AttributeError:
        memory_limit = 0
    return min(configured, memory_limit // WORKER_SHARE) if memory_limit else configured
