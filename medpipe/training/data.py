"""Zarr-backed training data: a map-style dataset that reads whole chunks, a block-shuffling batch sampler,
an optional in-memory cache and MONAI dictionary augmentations.

Reading sample by sample would decompress a ~4 MB chunk for every 16 KB sample; instead the DataLoader asks for a
whole batch at once (`__getitems__`), the chunks the batch touches are read whole by a `ChunkReader` (stored bytes
fetched concurrently or memory-mapped, decoded by the codec straight into numpy: no zarr selection machinery), the
batch is gathered with numpy fancy indexing (float16 stores are cast to float32 in the same step), and
`BlockShuffleSampler` draws batches from a few chunk-sized blocks at a time so one decompressed chunk serves
several samples (a small per-process LRU of decoded chunks keeps them between the batches of one window).

DataLoader workers: the sampler, told the number of workers, hands all batches of a window to one worker (torch
dispatches batch k to worker k % workers), so each chunk is decoded by one process, not by every worker; a
worker gathers each batch into a slot of its shared-memory ring (`medpipe.training.batches`), which the main
process copies out of, instead of torch's new shared segment and descriptor handshake per tensor.

In-memory cache and DataLoader workers: workers start with `spawn` (see `worker_context`), so each one receives
a pickled copy of the dataset. A cached dataset therefore moves its cache into shared memory (torch storages in
/dev/shm) the first time it is pickled, and spawned workers receive a handle to the same pages, not a copy. When
/dev/shm has no room for it, workers get no cache and read chunks (with their own LRU) instead, with a warning.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Callable, Iterator

import numpy as np
import torch
import zarr
from monai.data import set_track_meta
from monai.transforms import (Compose, RandFlipd, RandRotated, RandScaleIntensityd, RandShiftIntensityd)
from torch.utils.data import Dataset, Sampler, default_collate

from medpipe.store import SPLIT_CODES, get_array, get_group
from medpipe.task import Task
from medpipe.training import MissingLabelsError, StoreNotCompleteError, TrainingError, as_task
from medpipe.training.batches import SHM_DIR, SHM_HEADROOM, BatchBuffers, shared_memory_free_bytes
from medpipe.training.chunk_reader import ChunkReader

set_track_meta(False)  # plain tensors out of MONAI transforms (as in medpipe.preprocess); metadata lives in the store

Transform = Callable[[dict[str, Any]], dict[str, Any]]


def open_group(store_url: str, storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """Read-only root group of a store (local path or s3://; endpoint from storage_options or AWS_ENDPOINT_URL)."""
    try:
        if storage_options and "://" in store_url:
            return zarr.open_group(store_url, mode="r", storage_options=storage_options)
        return zarr.open_group(store_url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreNotCompleteError(f"no medpipe store at {store_url}") from exc


def split_indices(root: zarr.Group, split: str) -> np.ndarray:
    """Sorted store indices of a split ("train", "val", "test" or "all")."""
    if "samples" not in root or "split" not in get_group(root, "samples"):
        raise StoreNotCompleteError("store has no samples/split column: was ingestion completed?")
    codes = np.asarray(get_array(root, "samples/split")[...])
    if split == "all":
        return np.arange(codes.shape[0], dtype=np.int64)
    if split not in SPLIT_CODES:
        raise TrainingError(f"unknown split {split!r}; use one of {sorted(SPLIT_CODES)} or 'all'")
    return np.flatnonzero(codes == SPLIT_CODES[split]).astype(np.int64)


def patient_subset(root: zarr.Group, split: str, fraction: float, seed: int) -> np.ndarray:
    """Store rows of ceil(fraction x patients) of a split's patients, drawn with `seed` (whole patients: a subset
    never splits one patient's images)."""
    rows = split_indices(root, split)
    patients = np.array([str(p) for p in np.asarray(get_array(root, "samples/patient")[...])[rows]])
    unique = np.unique(patients)
    keep = np.random.default_rng(seed).permutation(unique)[: int(np.ceil(fraction * len(unique)))]
    return rows[np.isin(patients, keep)]



FILL_GROUP = 32  # chunks decoded at a time while filling the in-memory cache


def _chunk_segments(chunk_of: np.ndarray) -> dict[int, slice | np.ndarray]:
    """Where each chunk's rows sit in a batch: a slice when the batch holds each chunk's rows together (as
    BlockShuffleSampler's batches do), else an index array."""
    if chunk_of.size == 0:
        return {}
    edges = np.flatnonzero(np.diff(chunk_of)) + 1
    starts, ends = [0, *edges.tolist()], [*edges.tolist(), int(chunk_of.size)]
    if len(set(chunk_of[starts].tolist())) == len(starts):  # one run per chunk
        return {int(chunk_of[a]): slice(a, b) for a, b in zip(starts, ends)}
    order = np.argsort(chunk_of, kind="stable")
    ids, first = np.unique(chunk_of[order], return_index=True)
    bounds = [*first.tolist(), int(order.size)]
    return {int(cid): order[bounds[k] : bounds[k + 1]] for k, cid in enumerate(ids.tolist())}

Allocator = Callable[[str, tuple[int, ...], np.dtype], np.ndarray]


def _numpy_alloc(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def default_augmentation(task: Task | str, spatial_dims: int) -> Compose:
    """Mild MONAI dictionary augmentations: flips, small rotations, intensity scale/shift (image only)."""
    segment = as_task(task) is Task.segment
    keys = ["image", "mask"] if segment else ["image"]
    modes = ("bilinear", "nearest") if segment else ("bilinear",)
    small = 0.26  # ~15 degrees
    rotate = (RandRotated(keys=keys, range_x=small, prob=0.3, mode=modes, padding_mode="border") if spatial_dims == 2
              else RandRotated(keys=keys, range_x=small, prob=0.25, mode=modes, padding_mode="border"))
    flips = [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    return Compose([*flips, rotate,
                    RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                    RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)])


class ZarrImageDataset(Dataset):
    """Samples of one split of a store as dicts {"image" (C, *spatial) float32, "label" int64, "mask" (1, *spatial)
    uint8 (segment only), "index" (store row)}.

    Worker-safe: no zarr handle is pickled; each process opens the store on first use (and again after a fork).
    `cache`: "memory" loads the split's arrays once, "auto" does so when they fit `cache_max_bytes`, "none" reads
    chunks on demand (with an LRU of `chunk_cache_bytes` of decoded chunks per process).

    The cache is shared with spawned DataLoader workers, not copied: the first pickling (the DataLoader starting
    its workers) moves it into shared memory once (`share_cache`) and the pickled state carries only handles to
    it (torch's multiprocessing pickler). If /dev/shm cannot hold it (small container default), the workers'
    copies drop the cache and read chunks instead (a warning says so); the main process keeps its cache.
    """

    def __init__(
        self,
        store_url: str,
        split: str = "train",
        task: Task | str = Task.classify,
        transform: Transform | None = None,
        cache: str = "auto",
        cache_max_bytes: int = 2 << 30,
        chunk_cache_bytes: int = 64 << 20,
        storage_options: dict[str, Any] | None = None,
        extra: tuple[np.ndarray, np.ndarray] | None = None,
        rows: np.ndarray | None = None,
    ) -> None:
        task = as_task(task)
        if cache not in ("auto", "memory", "none"):
            raise TrainingError(f"unknown cache mode {cache!r}; use 'auto', 'memory' or 'none'")
        self.store_url = store_url
        self.split = split
        self.task = task
        self.transform = transform
        self.storage_options = storage_options
        self.chunk_cache_bytes = chunk_cache_bytes
        self._root: zarr.Group | None = None
        self._pid: int | None = None
        self._readers: dict[str, ChunkReader] = {}
        self._lru: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lru_bytes = 0
        root = self._group()
        if "training" not in root or "images" not in get_group(root, "training"):
            raise StoreNotCompleteError(f"{store_url} has no training/images array: was ingestion completed?")
        images = get_array(root, "training/images")
        self.indices = split_indices(root, split)
        if rows is not None:  # a subset of the split (e.g. a fraction of the train patients)
            self.indices = np.intersect1d(self.indices, np.asarray(rows, dtype=np.int64))
        self.n_total = int(images.shape[0])
        self.sample_shape = tuple(int(s) for s in images.shape[1:])
        self.chunk_len = int(images.chunks[0])
        self.labels_all = np.asarray(get_array(root, "training/labels")[...], dtype=np.int64)
        self.has_masks = "masks" in get_group(root, "training")
        if task is Task.segment and not self.has_masks:
            raise MissingLabelsError(f"{store_url} has no training/masks: segmentation needs a dataset with masks")
        self._arrays = ("images", "masks") if task is Task.segment else ("images",)
        per_sample = int(np.prod(self.sample_shape)) * 4 + (int(np.prod(self.sample_shape[1:])) if task is Task.segment else 0)
        self.cached = cache == "memory" or (cache == "auto" and per_sample * len(self.indices) <= cache_max_bytes)
        self._cache: dict[str, np.ndarray] = {}
        self._shared: dict[str, torch.Tensor] = {}  # the cache in shared memory, once pickled for workers
        if self.cached:  # loaded once here; workers get it through shared memory (see share_cache)
            self._cache = {name: self._read_rows(name, self.indices, use_lru=False) for name in self._arrays}
        # extra samples (synthetic images, classify only, train split only) follow the split's positions; their
        # `indices` are -1 - k so that they can never be mistaken for a store row
        self.extra_images, self.extra_labels = _checked_extra(extra, split, task, self.sample_shape)

    # -- process-local store handle -------------------------------------------------------------------------
    def _group(self) -> zarr.Group:
        if self._root is None or self._pid != os.getpid():
            self._root = open_group(self.store_url, self.storage_options)
            self._pid = os.getpid()
            self._readers = {}
            self._lru.clear()
            self._lru_bytes = 0
        return self._root

    def cache_bytes(self) -> int:
        """Bytes held by the in-memory cache (0 when not cached)."""
        return sum(int(a.nbytes) for a in self._cache.values())

    def share_cache(self) -> bool:
        """Move the cache into shared memory (once; the arrays keep their values and stay numpy views), so that
        pickling for a spawned worker sends handles instead of the data. False when not cached or when /dev/shm
        lacks room (then nothing changes)."""
        if not self.cached:
            return False
        if self._shared:
            return True
        need = self.cache_bytes()
        free = shared_memory_free_bytes()
        if free is not None and free < need + SHM_HEADROOM:
            warnings.warn(f"the {need >> 20} MiB in-memory cache of the {self.split!r} split does not fit {SHM_DIR} "
                          f"({free >> 20} MiB free): DataLoader workers read chunks instead. Give the container more "
                          "shared memory (docker --shm-size) or set cache: none", RuntimeWarning, stacklevel=2)
            return False
        shared = {}
        for name, arr in self._cache.items():
            tensor = torch.empty(arr.shape, dtype=torch.from_numpy(arr[:0]).dtype).share_memory_()
            tensor.numpy()[...] = arr
            shared[name] = tensor
        self._shared = shared
        self._cache = {name: tensor.numpy() for name, tensor in shared.items()}
        return True

    def __getstate__(self) -> dict[str, Any]:
        """Picklable state without store handles; the cache travels as shared-memory tensors (or not at all)."""
        state = dict(self.__dict__)
        state.update(_root=None, _pid=None, _readers={}, _lru=OrderedDict(), _lru_bytes=0, _cache={})
        if self.cached and not self.share_cache():
            state.update(cached=False, _shared={})  # the copy reads chunks: never ship the arrays themselves
        else:
            state["_shared"] = self._shared
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = {name: tensor.numpy() for name, tensor in self._shared.items()}

    # -- reading -----------------------------------------------------------------------------------------------
    def _reader(self, name: str) -> ChunkReader:
        """This process's chunk reader of training/<name>."""
        root = self._group()
        reader = self._readers.get(name)
        if reader is None:
            reader = self._readers[name] = ChunkReader(get_array(root, f"training/{name}"))
        return reader

    def _chunks(self, name: str, chunk_ids: list[int], use_lru: bool) -> dict[int, np.ndarray]:
        """Decoded chunks by id: LRU hits, the rest read in one concurrent request (and remembered)."""
        blocks: dict[int, np.ndarray] = {}
        if use_lru:
            for cid in chunk_ids:
                hit = self._lru.get((name, cid))
                if hit is not None:
                    self._lru.move_to_end((name, cid))
                    blocks[cid] = hit
        missing = [cid for cid in chunk_ids if cid not in blocks]
        if missing:
            for cid, block in zip(missing, self._reader(name).read(missing)):
                blocks[cid] = block
                if use_lru:
                    self._remember((name, cid), block)
        return blocks

    def _read_rows(self, name: str, store_idx: np.ndarray, use_lru: bool = True,
                   alloc: Allocator = _numpy_alloc) -> np.ndarray:
        """Rows `store_idx` (any order, repeats allowed) of training/<name>, decompressing each covering chunk
        once; images come out float32 whatever their stored dtype (float16 stores are cast here, per chunk)."""
        reader = self._reader(name)
        dtype = np.dtype(np.float32) if name == "images" else reader.layout.dtype
        out = alloc(name, (store_idx.size, *reader.shape[1:]), dtype)
        c = reader.layout.chunk_len
        segments = _chunk_segments(store_idx // c)
        ids = sorted(segments)
        group = max(1, len(ids)) if use_lru else FILL_GROUP  # a cache fill never holds more than FILL_GROUP chunks
        for g in range(0, len(ids), group):
            part = ids[g : g + group]
            blocks = self._chunks(name, part, use_lru)
            for cid in part:
                sel = segments[cid]
                local = store_idx[sel] - cid * c
                if isinstance(sel, slice) and blocks[cid].dtype == out.dtype:  # one copy, into place
                    np.take(blocks[cid], local, axis=0, out=out[sel], mode="clip")  # (clip: "raise" buffers out)
                else:  # scattered rows, or a cast (float16 -> float32)
                    out[sel] = blocks[cid][local]
            if not use_lru:
                for block in blocks.values():
                    reader.recycle(block)
        return out

    def _remember(self, key: tuple[str, int], block: np.ndarray) -> None:
        self._lru[key] = block
        self._lru_bytes += block.nbytes
        while self._lru_bytes > self.chunk_cache_bytes and len(self._lru) > 1:
            (name, _), old = self._lru.popitem(last=False)
            self._lru_bytes -= old.nbytes
            self._reader(name).recycle(old)

    def read_arrays(self, positions: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Raw arrays (no transform) of split positions: {"images" float32, "masks"?, "labels", "indices"};
        positions past the split's samples are the extra (synthetic) samples, with indices -1 - k."""
        return self._read(np.asarray(positions, dtype=np.int64).reshape(-1), _numpy_alloc)

    def _read(self, pos: np.ndarray, alloc: Allocator) -> dict[str, np.ndarray]:
        """read_arrays with the image/mask arrays allocated by `alloc`."""
        n_real = int(self.indices.size)
        if pos.size and int(pos.max()) >= n_real:
            real = pos < n_real
            k = pos[~real] - n_real
            out: dict[str, np.ndarray] = {"images": alloc("images", (pos.size, *self.sample_shape), np.dtype("float32")),
                                          "labels": alloc("labels", (pos.size,), np.dtype("int64")),
                                          "indices": alloc("indices", (pos.size,), np.dtype("int64"))}
            if real.any():
                for name, values in self.read_arrays(pos[real]).items():
                    out[name][real] = values
            out["images"][~real] = self.extra_images[k]
            out["labels"][~real] = self.extra_labels[k]
            out["indices"][~real] = -1 - k
            return out
        store_idx = self.indices[pos]
        result: dict[str, np.ndarray] = {"labels": alloc("labels", (pos.size,), np.dtype("int64")),
                                         "indices": alloc("indices", (pos.size,), np.dtype("int64"))}
        np.take(self.labels_all, store_idx, out=result["labels"])
        result["indices"][...] = store_idx
        for name in self._arrays:
            if self.cached:
                cache = self._cache[name]
                result[name] = alloc(name, (pos.size, *cache.shape[1:]), cache.dtype)
                np.take(cache, pos, axis=0, out=result[name])
            else:
                result[name] = self._read_rows(name, store_idx, alloc=alloc)
        return result

    def _batch_specs(self, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shapes and dtypes of a batch of n samples' arrays (as read_arrays returns them)."""
        specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {"images": ((n, *self.sample_shape), np.dtype("float32"))}
        if "masks" in self._arrays:
            specs["masks"] = ((n, 1, *self.sample_shape[1:]), np.dtype("uint8"))
        specs.update(labels=((n,), np.dtype("int64")), indices=((n,), np.dtype("int64")))
        return specs

    def __len__(self) -> int:
        return int(self.indices.size) + len(self.extra_labels)

    def __getitems__(self, positions: Sequence[int]) -> "SampleBatch | list[dict[str, Any]]":
        """A batch of samples read chunk-wise (torch's DataLoader calls this with a batch of positions).

        Without a transform the result is a `SampleBatch`: a sequence of per-sample dicts that also carries the
        already-stacked batch, which `collate_samples` returns without copying (default_collate works too)."""
        if self.transform is None:
            pos = np.asarray(positions, dtype=np.int64).reshape(-1)
            if torch.utils.data.get_worker_info() is None:  # in this process: plain arrays, no block to share
                return SampleBatch(self._read(pos, _numpy_alloc))
            buffers = BatchBuffers(self._batch_specs(pos.size))
            return SampleBatch(self._read(pos, buffers), buffers)
        arrays = self.read_arrays(positions)
        images = torch.from_numpy(arrays["images"])
        masks = torch.from_numpy(arrays["masks"]) if "masks" in arrays else None
        samples = []
        for k in range(images.shape[0]):
            sample: dict[str, Any] = {"image": images[k], "label": torch.tensor(int(arrays["labels"][k])),
                                      "index": int(arrays["indices"][k])}
            if masks is not None:
                sample["mask"] = masks[k]
            sample = self.transform(sample)
            sample["image"] = torch.as_tensor(sample["image"], dtype=torch.float32)
            if masks is not None:  # interpolating transforms return float masks; back to labels
                sample["mask"] = torch.as_tensor(sample["mask"]).round().to(torch.uint8)
            samples.append(sample)
        return samples

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.__getitems__([position])[0]

    def blocks(self) -> list[np.ndarray]:
        """Split positions grouped by the training chunk that holds them (the unit of one read); extra samples
        follow in blocks of the same length."""
        n_real = int(self.indices.size)
        blocks: list[np.ndarray] = []
        if n_real:
            chunk_ids = self.indices // self.chunk_len
            blocks = np.split(np.arange(n_real, dtype=np.int64), np.flatnonzero(np.diff(chunk_ids)) + 1)
        extra = np.arange(n_real, len(self), dtype=np.int64)
        return blocks + [extra[s : s + self.chunk_len] for s in range(0, extra.size, self.chunk_len)]


def _checked_extra(extra: tuple[np.ndarray, np.ndarray] | None, split: str, task: Task,
                   sample_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Extra (synthetic) samples as (images float32 (M, *sample_shape), labels int64 (M,)); empty when None.
    Only a classification train split takes them: val and test never see synthetic data."""
    if extra is None:
        return np.zeros((0, *sample_shape), np.float32), np.zeros(0, np.int64)
    if split != "train" or task is not Task.classify:
        raise TrainingError(f"synthetic samples join the train split of a classification only (got {split}, {task})")
    images, labels = np.asarray(extra[0], dtype=np.float32), np.asarray(extra[1], dtype=np.int64)
    if tuple(images.shape[1:]) != sample_shape or len(images) != len(labels):
        raise TrainingError(f"synthetic samples of shape {list(images.shape[1:])} do not fit samples of shape "
                            f"{list(sample_shape)}")
    return images, labels


BATCH_KEYS = {"images": "image", "labels": "label", "indices": "index", "masks": "mask"}  # array -> batch key


class SampleBatch(Sequence):
    """Samples read together: indexable as per-sample dicts, and `.collated` holds the stacked batch tensors.

    Hand-written because default_collate re-stacks per-sample tensors (a copy plus Python work per sample), which
    costs more than the chunk read itself for small 2D samples."""

    def __init__(self, arrays: dict[str, np.ndarray], buffers: BatchBuffers | None = None) -> None:
        """`buffers`: the block `arrays` were read into; in a worker the batch then travels as that one block."""
        keys = {name: BATCH_KEYS[name] for name in arrays}
        held = buffers.tensors if buffers is not None else {}
        inside = all(name in held and held[name].data_ptr() == arr.ctypes.data for name, arr in arrays.items())
        self.collated: dict[str, torch.Tensor]
        if buffers is not None and inside:
            self.collated = buffers.packed(keys)
        else:
            self.collated = {keys[name]: torch.from_numpy(arr) for name, arr in arrays.items()}
            if buffers is not None:
                buffers.release()

    def __len__(self) -> int:
        return int(self.collated["image"].shape[0])

    def __getitem__(self, k: int) -> dict[str, Any]:  # type: ignore[override]
        sample: dict[str, Any] = {key: value[k] for key, value in self.collated.items()}
        sample["index"] = int(sample["index"])
        return sample


def collate_samples(batch: Any) -> Any:
    """collate_fn for ZarrImageDataset loaders: the stacked tensors of a SampleBatch as is, else default_collate."""
    if isinstance(batch, SampleBatch):
        return batch.collated
    return default_collate(batch)


class BlockShuffleSampler(Sampler[list[int]]):
    """Batches of split positions: chunk-sized blocks in a random order each epoch, shuffled within windows of
    `window` blocks, so each read decompresses whole chunks and every batch still mixes several chunks.

    Hand-written because torch's samplers shuffle individual indices (one chunk decode per sample) and MONAI's
    shuffle buffers work on iterable datasets only. Use as `DataLoader(..., batch_sampler=sampler)`.

    Within a batch the samples of one block come together (the batch is gathered with one copy per chunk).

    `workers`: the DataLoader's num_workers. torch hands batch k to worker k % workers; with workers > 1 window w
    belongs to worker w % workers and the batches are dealt so that each worker receives the batches of its own
    windows. Without this every worker would decode every chunk of every window (each gets some of its batches),
    i.e. `workers` times the decoding work. Batches mix samples of one window as before; only the last is short.
    The dataset's `chunk_cache_bytes` must hold a window's chunks (defaults: 8 x 4 MiB in 64 MiB), else chunks are
    decoded again within their window (measured 4x slower with a 16 MiB cache).
    """

    def __init__(self, dataset: ZarrImageDataset, batch_size: int, seed: int = 0, window: int = 8,
                 shuffle: bool = True, drop_last: bool = False, workers: int = 0) -> None:
        if batch_size < 1 or window < 1 or workers < 0:
            raise TrainingError("batch_size and window must be >= 1, workers >= 0")
        self._blocks = dataset.blocks()
        self._block_of = np.zeros(len(dataset), dtype=np.int64)  # block of each position
        for b, block in enumerate(self._blocks):
            self._block_of[block] = b
        self.n = len(dataset)
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.workers = workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose (deterministic) order the next iteration yields."""
        self.epoch = epoch

    def order(self) -> np.ndarray:
        """All positions of this epoch in batch order."""
        batches = self.batches()
        return np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)

    def batches(self) -> list[np.ndarray]:
        """This epoch's batches in the order the sampler yields them (the short last batch included)."""
        windows = self._windows()
        if not windows:
            return []
        workers = max(1, self.workers)
        streams = [np.concatenate(windows[w::workers]) for w in range(min(workers, len(windows)))]
        order = np.concatenate(streams)  # worker 0's windows, then worker 1's, ...: one short batch at the end
        starts = np.arange(0, order.size, self.batch_size)
        batches = [order[s : s + self.batch_size] for s in starts.tolist()]
        batches = [b[np.argsort(self._block_of[b], kind="stable")] for b in batches]  # one run per chunk
        if len(streams) < 2:
            return batches
        owner = np.searchsorted(np.cumsum([st.size for st in streams]), starts, side="right")
        return _deal(batches, owner.tolist(), len(streams))

    def _windows(self) -> list[np.ndarray]:
        """This epoch's windows: positions of `window` blocks each (shuffled together when shuffling)."""
        if not self._blocks:
            return []
        if not self.shuffle:
            return [np.concatenate(self._blocks[w : w + self.window]) for w in range(0, len(self._blocks), self.window)]
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self._blocks))
        parts = []
        for w in range(0, len(perm), self.window):
            part = np.concatenate([self._blocks[b] for b in perm[w : w + self.window]])
            rng.shuffle(part)
            parts.append(part)
        return parts

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches():
            if not (self.drop_last and len(batch) < self.batch_size):
                yield batch.tolist()

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


def _deal(batches: list[np.ndarray], owner: list[int], workers: int) -> list[np.ndarray]:
    """Reorder batches so that slot k (which torch gives to worker k % workers) holds the next batch owned by that
    worker; a worker whose queue is empty takes the next batch of the longest other queue (near the end of an
    epoch only)."""
    queues: list[list[np.ndarray]] = [[] for _ in range(workers)]
    for batch, w in zip(batches, owner):
        queues[w].append(batch)
    heads = [0] * workers
    dealt = []
    for slot in range(len(batches)):
        w = slot % workers
        if heads[w] == len(queues[w]):
            w = max(range(workers), key=lambda q: len(queues[q]) - heads[q])
        dealt.append(queues[w][heads[w]])
        heads[w] += 1
    return dealt


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker's random transforms a distinct seed derived from torch's
    per-worker seed (itself derived from the loader's seeded generator), so runs are reproducible."""
    info = torch.utils.data.get_worker_info()
    seed = int(torch.initial_seed() % (2**32))
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed)


def worker_context(num_workers: int) -> str | None:
    """Start DataLoader workers with spawn: training runs inside Prefect (and next to Dask), whose threads and
    logging handlers a plain fork would copy in a half-held state. (forkserver children would also start clean but
    keep the environment of the moment the server started, e.g. without AWS credentials set later.)"""
    return "spawn" if num_workers > 0 else None
