"""One memory block per batch: the batch's arrays (images, masks, labels, indices) are carved out of a single
block, which inside a DataLoader worker is a slot of a shared-memory ring that the main process copies out of.

Why: torch sends a worker's tensors to the main process as shared memory, one new segment per tensor storage and
one file descriptor each, and each descriptor costs a socket connection with an authentication handshake
(multiprocessing's resource sharer) on both sides. Measured on this 2-core machine for a 4 MiB batch: ~3 ms to
create the segment, ~3 ms to fault its pages in, ~2.5 ms per descriptor, against ~2.6 ms to decode the batch.
So each worker writes its batches into a ring of `RING_SLOTS` shared slots created once (its descriptor travels
with the first batch only); the main process reads a batch in place, as tensor views of its slot, and the slot is
marked free when the last of those tensors is gone (copying each batch out, ~0.4 ms per 4 MiB, took a core's time
from the workers on a 2-core machine). A consumer keeps at most a few batches alive (the DataLoader's prefetch plus
the batch in use), so a worker that finds every slot still held — a consumer that keeps batches or views of them —
does not wait: it sends that batch as one fresh shared block, as it does when /dev/shm cannot hold a ring (one
descriptor per batch instead of one per tensor). Keep copies, not views, of what outlives a batch (`predict` does).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import uuid
import weakref
from typing import Any

import numpy as np
import torch

ALIGN = 64  # bytes; every array starts on a cache line (and on its element size)
RING_SLOTS = 8  # > the DataLoader's prefetch per worker (default 2), the batch being written and those in use
SHM_DIR = "/dev/shm"
SHM_HEADROOM = 256 << 20  # left free in /dev/shm for the DataLoader's own batch transfers

Layout = list[tuple[str, int, str, tuple[int, ...]]]  # (name, byte offset, numpy dtype, shape)


def shared_memory_free_bytes(path: str = SHM_DIR) -> int | None:
    """Free bytes of the shared-memory filesystem torch allocates shared storages in; None where there is none
    to measure (not Linux)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _uint8_block(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))


class _Ring:
    """A worker's shared slots: a header of int32 slot states (0 free, 1 holding a batch the main process still uses),
    then RING_SLOTS slots of `slot_bytes`."""

    def __init__(self, slot_bytes: int) -> None:
        self.key = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.slot_bytes = slot_bytes
        self.block = _uint8_block(torch.UntypedStorage._new_shared(ALIGN + RING_SLOTS * slot_bytes))
        self.states = _slot_states(self.block)
        self.states[...] = 0
        self.sent = False  # whether the main process has been sent the ring's descriptor

    def acquire(self) -> int:
        """A free slot, marked in use; -1 when the main process still holds all of them."""
        free = np.flatnonzero(self.states == 0)
        if not free.size:
            return -1
        slot = int(free[0])
        self.states[slot] = 1
        return slot

    def release(self, slot: int) -> None:
        """Mark a slot free (its batch was not sent after all)."""
        self.states[slot] = 0

    def slot(self, slot: int, nbytes: int) -> torch.Tensor:
        start = ALIGN + slot * self.slot_bytes
        return self.block[start : start + nbytes]


_ring: _Ring | None = None  # this worker's ring
_rings: dict[str, tuple[torch.Tensor, np.ndarray]] = {}  # main process: each worker's ring and its slot states, by
# key (worker pid first)


def _slot_states(block: torch.Tensor) -> np.ndarray:
    """The int32 slot states at the head of a ring, as numpy (a torch element write costs ~50x a numpy one)."""
    return block[: 4 * RING_SLOTS].numpy().view(np.int32)


def _worker_ring(nbytes: int) -> _Ring | None:
    """This worker's ring, (re)created when a batch outgrows its slots; None when /dev/shm has no room for one."""
    global _ring
    if _ring is None or _ring.slot_bytes < nbytes:
        free = shared_memory_free_bytes()
        if free is not None and free < ALIGN + RING_SLOTS * nbytes + SHM_HEADROOM:
            return None
        _ring = _Ring(nbytes)
    return _ring


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_slot(states: np.ndarray, slot: int) -> None:
    states[slot] = 0


def batch_from_ring(key: str, ring: torch.Tensor | None, slot: int, slot_bytes: int, total: int,
                    layout: "Layout") -> dict[str, torch.Tensor]:
    """Rebuild a batch sent from a worker's ring (main process): tensor views of its slot, which is freed once
    none of them is referenced any more (a ring whose worker exited stays mapped while its views live)."""
    if ring is not None:
        for old in [k for k in _rings if not _pid_alive(int(k.split("-")[0]))]:
            del _rings[old]  # rings of workers that have exited
        _rings[key] = (ring, _slot_states(ring))
    known = _rings.get(key)
    if known is None:
        raise RuntimeError(f"DataLoader batch ring {key} is unknown in this process")
    block, states = known
    start = ALIGN + slot * slot_bytes
    held = block[start : start + total].numpy().view()  # its own array object: every view below keeps it alive
    weakref.finalize(held, _free_slot, states, slot)
    return _views(torch.from_numpy(held), layout)


def _torch_dtype(dtype: np.dtype | str) -> torch.dtype:
    return _TORCH_DTYPES(np.dtype(dtype).str)


@functools.cache
def _TORCH_DTYPES(dtype: str) -> torch.dtype:  # noqa: N802 (a table, filled on first use)
    return torch.from_numpy(np.empty(0, np.dtype(dtype))).dtype


def _views(block: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The arrays of a block (uint8, 1-D) as tensors sharing its memory."""
    out = {}
    for name, offset, dtype, shape in layout:
        torch_dtype = _TORCH_DTYPES(dtype)
        nbytes = math.prod(shape) * torch_dtype.itemsize
        out[name] = block[offset : offset + nbytes].view(torch_dtype).view(shape)
    return out


def unpack_batch(block: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Rebuild a `PackedBatch` after pickling (in the main process): a plain dict of tensor views of the block."""
    return _views(block, layout)


def _free_unsent(ring: _Ring, slot: int, sent: list[bool]) -> None:
    if not sent[0]:
        ring.release(slot)


class PackedBatch(dict):
    """A collated batch (name -> tensor) whose tensors are views of one block; pickles as that block, or as a
    reference to its ring slot (`ring`, `slot`), sending the ring's descriptor with its first batch only."""

    def __init__(self, block: torch.Tensor, layout: Layout, ring: _Ring | None = None, slot: int = -1) -> None:
        super().__init__(_views(block, layout))
        self.block = block
        self.layout = layout
        self.ring = ring
        self.slot = slot
        self._sent = [False]
        if ring is not None:  # a batch dropped unsent (e.g. re-collated by default_collate) frees its slot
            weakref.finalize(self, _free_unsent, ring, slot, self._sent)

    def __reduce__(self) -> tuple[Any, ...]:
        ring = self.ring
        if ring is None:
            return unpack_batch, (self.block, self.layout)
        first = not ring.sent
        ring.sent = self._sent[0] = True
        return batch_from_ring, (ring.key, ring.block if first else None, self.slot, ring.slot_bytes,
                                int(self.block.numel()), self.layout)


class BatchBuffers:
    """Numpy arrays of one batch inside one shared-memory block (a DataLoader worker's ring slot, else a block of
    its own).

    `specs`: name -> (shape, dtype) of every array the batch will hold. Use as the allocator of a read
    (`buffers(name, shape, dtype)`); `packed(names)` gives the collated batch, renamed, as a `PackedBatch`."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        self.layout: Layout = []
        offset = 0
        for name, (shape, dtype) in specs.items():
            shape = tuple(int(s) for s in shape)
            self.layout.append((name, offset, np.dtype(dtype).str, shape))
            offset += -(-math.prod(shape) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
        total = max(offset, ALIGN)
        self.ring = _worker_ring(total)
        self.slot = -1
        if self.ring is not None:
            self.slot = self.ring.acquire()
            if self.slot < 0:  # every slot still held by the main process: this batch goes as its own block
                self.ring = None
        if self.ring is not None:
            self.block = self.ring.slot(self.slot, total)
        else:
            self.block = _uint8_block(torch.UntypedStorage._new_shared(total))
        self.tensors = _views(self.block, self.layout)

    def __call__(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The block's array `name` (as numpy); a separate array if the batch was not planned with this one."""
        held = self.tensors.get(name)
        if held is None or tuple(held.shape) != tuple(shape) or _torch_dtype(dtype) != held.dtype:
            return np.empty(shape, dtype)
        return held.numpy()

    def release(self) -> None:
        """Give the ring slot back when the batch will not be sent as a PackedBatch."""
        if self.ring is not None:
            self.ring.release(self.slot)
            self.ring = None

    def packed(self, names: dict[str, str]) -> PackedBatch:
        """The arrays `names` (block name -> batch key) as one PackedBatch."""
        layout = [(names[name], offset, dtype, shape) for name, offset, dtype, shape in self.layout if name in names]
        return PackedBatch(self.block, layout, self.ring, self.slot)
