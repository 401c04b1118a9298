"""What one Dask worker may use: bytes per decoded image (the configured cap, and no more than a quarter of the
worker's memory limit: decoding holds the pixels a few times over), codec threads (the worker's own) and how much
freed memory it keeps for its next task (`prepare_worker` sets the last two at the start of each ingest task)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

WORKER_SHARE = 4
FREED_BYTES_KEPT = 256 << 20  # at most; and at most 1/8 of the worker's memory limit
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _worker() -> Any | None:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):  # not inside a Dask worker (tests, serial benchmarks)
        return None


def prepare_worker() -> None:
    """At the start of an ingest task: inside a Dask worker, codec threads bounded and freed memory kept for reuse
    (`bound_codec_threads`, `keep_freed_memory`); outside one, nothing changes."""
    bound_codec_threads()
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Inside a Dask worker on glibc, let memory an ingest task frees serve the next task's arrays: allocations up to
    FREED_BYTES_KEPT come from the heap (not a fresh mmap each) and up to that much freed memory stays mapped.
    Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, and glibc then also pins its mmap threshold at
    128 KiB: every array above that was a fresh mapping whose pages faulted in on first touch and went back to the
    kernel when freed, 556k page faults and 1.3 s of a 4.6 s CT ingest on one worker (docs/benchmarks.md). The
    worker's resident memory stays at its tasks' peak (plus at most FREED_BYTES_KEPT), which its memory limit had to
    allow anyway. Written with ctypes because no library sets mallopt; returns whether it applied (False outside a
    worker, or without glibc)."""
    worker = _worker()
    if worker is None:
        return False
    try:
        limit = int(worker.memory_manager.memory_limit or 0)
    except AttributeError:
        limit = 0
    kept = min(FREED_BYTES_KEPT, limit // 8) if limit else FREED_BYTES_KEPT
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, kept)) and bool(mallopt(M_TRIM_THRESHOLD, kept))


@functools.cache
def _glibc_mallopt() -> Any | None:
    """glibc's `int mallopt(int, int)`, or None (another C library, or none found)."""
    try:
        if not ctypes.util.find_library("c") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
            return None
        function = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return function


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
