"""How many bytes one decoded image may take: the configured cap, and no more than a quarter of the Dask worker's
memory limit (decoding holds the pixels a few times over: decoded, rescaled, compacted, preprocessed)."""

from __future__ import annotations

WORKER_SHARE = 4


def image_byte_limit(configured: int) -> int:
    """The cap to check a file's header against before decoding it, on the worker that will decode it."""
    try:
        from distributed import get_worker

        memory_limit = int(get_worker().memory_manager.memory_limit or 0)
    except (ImportError, ValueError, AttributeError):  # not inside a Dask worker (tests, serial benchmarks)
        memory_limit = 0
    return min(configured, memory_limit // WORKER_SHARE) if memory_limit else configured
