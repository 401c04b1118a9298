"""Ingest tasks in a Dask worker reuse freed memory (medpipe.ingest.limits.keep_freed_memory): under the nanny's
MALLOC_TRIM_THRESHOLD_ every array above 128 KiB was a fresh mapping of its own, faulted in page by page and unmapped
when freed. glibc's own accounting (mallinfo2) tells where an allocation came from."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from medpipe.ingest.limits import _glibc_mallopt, keep_freed_memory

ARRAY_BYTES = 32 << 20  # a CT series' worth of int16 slices


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _own_mapping(tune: bool) -> tuple[bool, bool]:
    """(whether the tuning applied, whether a new ARRAY_BYTES array got a mapping of its own rather than heap)."""
    applied = keep_freed_memory() if tune else False
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    before = mallinfo2().hblkhd
    array = np.ones(ARRAY_BYTES, np.uint8)
    mapped = mallinfo2().hblkhd - before >= ARRAY_BYTES
    del array
    return applied, mapped


def test_outside_a_worker_nothing_changes():
    assert keep_freed_memory() is False


@pytest.mark.skipif(_glibc_mallopt() is None or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="glibc (2.33 or later) only")
def test_a_worker_serves_large_arrays_from_memory_it_keeps():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert client.submit(_own_mapping, False, pure=False).result() == (False, True)  # as Dask starts workers
        assert client.submit(_own_mapping, True, pure=False).result() == (True, False)
