"""Training data of a signals store: the windows of one split, read in whole shards, as batches of dicts.

`SignalWindowDataset` holds the split's windows in memory when they fit a byte budget (the normal case: all of
PTB-XL at 100 Hz is ~1 GB), read shard by shard in store order; otherwise each batch reads the shards its windows
lie in. The DataLoader asks for a whole batch at once (`__getitems__`), which returns the stacked batch:
{"image": (B, L, T) classify / (B, L, T - H) forecast context, "label" (B,) int64 (classify) or "target"
(B, L, H) float32 (forecast), "index" (B,) store rows}. Light augmentation (amplitude scaling, a small time shift,
noise) applies to the train split of a classification only, seeded per epoch by the engine (`set_random_state`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from medpipe.signals.store import open_signals, read_window_table, signal_attrs, split_rows
from medpipe.store import StoreError, open_store
from medpipe.task import Task
from medpipe.training import StoreNotCompleteError, TrainingError, as_task

DEFAULT_CACHE_BYTES = 2 << 30  # hold a split in memory up to this size (TrainConfig.cache_max_bytes)
# decoded shards an uncached dataset keeps: twice the sampler's default window of shuffled blocks (TrainConfig.
# block_window = 8), ~4 MB each (medpipe.signals.store.windows_per_shard)
SHARD_LRU = 16


def open_signal_store(store_url: str) -> zarr.Group:
    """The root group of a complete signals store; StoreNotCompleteError (one line) otherwise."""
    try:
        root = open_store(store_url)
        signal_attrs(root)
    except StoreError as exc:
        raise StoreNotCompleteError(str(exc)) from None
    return root


def shard_length(array: zarr.Array) -> int:
    """Windows per shard of the `signals` array (its chunk length when unsharded)."""
    return int(array.shards[0] if array.shards else array.chunks[0])


def read_windows(array: zarr.Array, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Windows `rows` (sorted or not) of `array` (N, L, T) as float32 (len(rows), L, T), read one shard at a time:
    each shard that holds any of the rows is read once, over the span of its rows."""
    rows = np.asarray(rows, dtype=np.int64)
    if out is None:
        out = np.empty((rows.size, *array.shape[1:]), np.float32)
    if rows.size == 0:
        return out
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    shard_of = ordered // shard_length(array)
    edges = np.flatnonzero(np.diff(shard_of)) + 1
    for part in np.split(np.arange(ordered.size), edges):
        first, last = int(ordered[part[0]]), int(ordered[part[-1]])
        block = np.asarray(array[first : last + 1], dtype=np.float32)
        out[order[part]] = block[ordered[part] - first]
    return out


class SignalAugment:
    """Random amplitude scaling (per window, x0.9-1.1), time shift (up to 2% of the window, edge-padded) and
    Gaussian noise (2% of each lead's standard deviation) of a batch (B, L, T); `set_random_state` reseeds it."""

    def __init__(self, seed: int = 0, scale: float = 0.1, shift: float = 0.02, noise: float = 0.02) -> None:
        self.scale, self.shift, self.noise = scale, shift, noise
        self.rng = np.random.default_rng(seed)

    def set_random_state(self, seed: int) -> None:
        """Restart the random stream (the engine calls it at each epoch start and in each worker)."""
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        b, _, t = x.shape
        x = x * self.rng.uniform(1 - self.scale, 1 + self.scale, size=(b, 1, 1)).astype(np.float32)
        limit = int(self.shift * t)
        if limit:
            shifts = np.asarray(self.rng.integers(-limit, limit + 1, size=b)).tolist()
            for k, s in enumerate(shifts):
                if s > 0:
                    x[k] = np.concatenate([np.repeat(x[k, :, :1], s, axis=1), x[k, :, :-s]], axis=1)
                elif s < 0:
                    x[k] = np.concatenate([x[k, :, -s:], np.repeat(x[k, :, -1:], -s, axis=1)], axis=1)
        std = x.std(axis=2, keepdims=True)
        return (x + self.rng.standard_normal(x.shape).astype(np.float32) * self.noise * std).astype(np.float32)


class SignalWindowDataset(Dataset):
    """The windows of one split of a signals store (see the module docstring). `horizon` (forecast): samples at
    the end of each window that are the target; `cache`: hold the split in memory when under `cache_max_bytes`;
    `augment`: apply `SignalAugment` (classification only); `rows`: a subset of the split's store rows."""

    def __init__(self, store_url: str, split: str, task: Task | str, horizon: int = 0, cache: bool = True, *,
                 augment: bool = False, seed: int = 0, cache_max_bytes: int = DEFAULT_CACHE_BYTES,
                 rows: np.ndarray | None = None) -> None:
        self.store_url, self.split, self.task, self.horizon = store_url, split, as_task(task), int(horizon)
        root = open_signal_store(store_url)
        if split not in ("train", "val", "test"):
            raise TrainingError(f"unknown split {split!r}; use train, val or test")
        array = open_signals(root)
        self.leads, self.window = int(array.shape[1]), int(array.shape[2])
        if self.task is Task.forecast and not 1 <= self.horizon < self.window:
            raise TrainingError(f"the forecast horizon ({self.horizon} samples) must be at least 1 and shorter than "
                                f"the store's window ({self.window} samples)")
        if self.task not in (Task.classify, Task.forecast):
            raise TrainingError(f"signals train classify or forecast, not {self.task.value!r}")
        self.indices = split_rows(root, split) if rows is None else np.asarray(rows, dtype=np.int64)
        self.labels_all = np.asarray(read_window_table(root)["label"], dtype=np.int64)
        self.shard = shard_length(array)
        self.transform = SignalAugment(seed) if augment and self.task is Task.classify else None
        self._array: zarr.Array | None = None
        self._shards: dict[int, np.ndarray] = {}  # LRU of decoded shards (uncached reads), insertion ordered
        self._cache: torch.Tensor | None = None
        if cache and self.indices.size * self.leads * self.window * 4 <= cache_max_bytes:
            # a torch tensor: spawned DataLoader workers receive it through shared memory, not as a copy
            self._cache = torch.from_numpy(read_windows(array, self.indices))

    @property
    def cached(self) -> bool:
        """Whether the split is held in memory."""
        return self._cache is not None

    @property
    def sample_shape(self) -> tuple[int, int]:
        """(L, T) of a model input: the whole window (classify) or its context (forecast)."""
        return self.leads, self.window - self.horizon

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = None  # each process opens the store itself
        state["_shards"] = {}
        return state

    def __len__(self) -> int:
        return int(self.indices.size)

    def read(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Raw windows (B, L, T) float32 of split positions (no augmentation)."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if self._cache is not None:
            return self._cache.numpy()[pos]
        return self._read_shards(self.indices[pos])

    def _read_shards(self, rows: np.ndarray) -> np.ndarray:
        """Windows of store `rows` from whole shards kept in a small LRU: the training sampler shuffles whole
        shards in windows of a few, so each shard is read once per epoch, not once per batch that touches it."""
        if self._array is None:
            self._array = open_signals(self.store_url)
        out = np.empty((rows.size, self.leads, self.window), np.float32)
        shard_of = rows // self.shard
        for shard in np.unique(shard_of):
            block = self._shards.pop(int(shard), None)
            if block is None:
                block = np.asarray(self._array[shard * self.shard : (shard + 1) * self.shard], dtype=np.float32)
            self._shards[int(shard)] = block  # most recently used last
            while len(self._shards) > SHARD_LRU:
                self._shards.pop(next(iter(self._shards)))
            here = shard_of == shard
            out[here] = block[rows[here] - shard * self.shard]
        return out

    def __getitems__(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        """The stacked batch of split positions (the DataLoader calls it with a batch sampler's batch)."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        windows = self.read(pos)
        rows = self.indices[pos]
        batch: dict[str, torch.Tensor] = {"index": torch.from_numpy(rows.copy())}
        if self.task is Task.forecast:
            cut = self.window - self.horizon
            batch["image"] = torch.from_numpy(np.ascontiguousarray(windows[:, :, :cut]))
            batch["target"] = torch.from_numpy(np.ascontiguousarray(windows[:, :, cut:]))
        else:
            batch["image"] = torch.from_numpy(self.transform(windows) if self.transform is not None else windows)
            batch["label"] = torch.from_numpy(self.labels_all[rows])
        return batch

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([position]).items()}

    def blocks(self) -> list[np.ndarray]:
        """Positions grouped by what one read serves: single windows when cached (a shuffle is then a full
        permutation), else the windows of one shard."""
        n = len(self)
        if self.cached:
            return [np.array([p], dtype=np.int64) for p in range(n)]
        if not n:
            return []
        shard_of = self.indices // self.shard
        return np.split(np.arange(n, dtype=np.int64), np.flatnonzero(np.diff(shard_of)) + 1)


def pass_batch(batch: Any) -> Any:
    """collate_fn for SignalWindowDataset loaders: `__getitems__` already stacked the batch (a dict of tensors)."""
    return batch


__all__ = ["SignalAugment", "SignalWindowDataset", "open_signal_store", "pass_batch", "read_windows",
           "shard_length"]
