"""Batched writes of many small archive images: encoded in memory by zarr, written with one fsspec transfer.

Written by hand because zarr-python's synchronous API hands every metadata and chunk write to its event-loop thread
and waits (a 128x128 image with its mask, OME metadata and medpipe attributes took 7-13 round trips, ~12 ms on
a busy 2-core machine; see docs/benchmarks.md). Here a whole batch is written by zarr's own asynchronous API in
one coroutine into a `MemoryStore` (same metadata, codecs and bytes as a direct write: one thread hop per batch),
then copied to the store with one `fs.pipe` call: plain file writes on a local disk, concurrent PUTs on object
stores. The OME-NGFF 0.5 attributes come from ome-zarr's own metadata writers (a template per axes and name).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import fsspec
import numpy as np
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_label_metadata, write_multiscales_metadata
from zarr.core.group import AsyncGroup
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from medpipe.codecs import Layer, codec_chain
from medpipe.config import StoreConfig
from medpipe.store import ATTRS_KEY, store_fs
from medpipe.store import archive_axes, archive_chunks, dimension_names

FLUSH_BYTES = 16 << 20  # raw bytes of small images held before a flush
LARGE_IMAGE = 2 << 20  # an image this large is written at once: batching only pays for small ones, and a held
#                        volume would sit in a worker's memory beside the next one (Dask pauses at 80 %)


@dataclass(frozen=True)
class ArchiveImage:
    """One image to archive: pixels (C, [Z,] Y, X), spacing ([dz,] dy, dx) mm, mask (1, ...) or None, attributes."""

    unit_id: str
    pixels: np.ndarray
    spacing: tuple[float, ...]
    mask: np.ndarray | None
    attrs: Mapping[str, Any]


def put_files(fs: fsspec.AbstractFileSystem, files: Mapping[str, bytes]) -> None:
    """Write `{path: bytes}` in one call (local folders are created first: fsspec's local pipe does not)."""
    if not files:
        return
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if {"file", "local"} & set(protocols):
        for parent in sorted({path.rsplit("/", 1)[0] for path in files}):
            fs.makedirs(parent, exist_ok=True)
    fs.pipe(dict(files))


@functools.lru_cache(maxsize=None)
def _ome_template(ndim: int, name: str, label: bool) -> dict[str, Any]:
    """The group attributes ome-zarr writes for a one-level image of `ndim` axes (scale filled in per image); a
    label image also gets what `write_label_metadata` adds (its parent "labels" group is written by the caller)."""
    labels = zarr.open_group(MemoryStore(), mode="w")
    group = labels.create_group(name)
    fmt = FormatV05()
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * ndim}]}]
    write_multiscales_metadata(group, datasets, fmt=fmt, axes=archive_axes(ndim), name=name)
    if label:
        write_label_metadata(labels, name, fmt=fmt)
    return dict(labels[name].attrs)


def ome_attributes(ndim: int, name: str, scale: Sequence[float], label: bool = False) -> dict[str, Any]:
    """OME-NGFF 0.5 attributes of an image group with one resolution level at `scale` (per axis, mm)."""
    attrs = copy.deepcopy(_ome_template(ndim, name, label))
    attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [float(s) for s in scale]
    return attrs


def _group_attributes(image: ArchiveImage) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Attributes of the image group and of its mask's label group (built here: ome-zarr's writers are synchronous)."""
    scale = [1.0, *map(float, image.spacing)]
    attrs = ome_attributes(image.pixels.ndim, "image", scale)
    if image.attrs:
        attrs[ATTRS_KEY] = dict(image.attrs)
    mask_attrs = None if image.mask is None else ome_attributes(image.mask.ndim, "mask", scale, label=True)
    return attrs, mask_attrs


async def _write_image(archive: AsyncGroup, image: ArchiveImage, attrs: dict[str, Any],
                       mask_attrs: dict[str, Any] | None, config: StoreConfig) -> None:
    group = await archive.create_group(image.unit_id, overwrite=True, attributes=attrs)
    await _write_array(group, image.pixels, "archive", config)
    if image.mask is not None:
        labels = await group.create_group("labels", attributes={"ome": {"version": FormatV05().version,
                                                                        "labels": ["mask"]}})
        mask_group = await labels.create_group("mask", attributes=mask_attrs)
        await _write_array(mask_group, image.mask, "archive_mask", config)


async def _write_array(group: AsyncGroup, values: np.ndarray, layer: Layer, config: StoreConfig) -> None:
    array = await group.create_array("0", shape=values.shape, dtype=values.dtype, chunks=archive_chunks(values.shape),
                                     dimension_names=dimension_names(values.ndim),
                                     **codec_chain(layer, config, values.dtype))
    await array.setitem(tuple(slice(None) for _ in values.shape), values)


async def _write_batch(store: MemoryStore, images: Sequence[ArchiveImage],
                       attributes: Sequence[tuple[dict[str, Any], dict[str, Any] | None]], config: StoreConfig) -> None:
    root = await AsyncGroup.from_store(store, overwrite=True)
    archive = await root.create_group("archive")
    for image, (attrs, mask_attrs) in zip(images, attributes):
        await _write_image(archive, image, attrs, mask_attrs, config)


def encode_archive_images(images: Sequence[ArchiveImage], config: StoreConfig) -> dict[str, bytes]:
    """`{relative path: bytes}` of the archive groups of `images`, as zarr writes them (one-line JSON)."""
    encoded: dict[str, Any] = {}
    attributes = [_group_attributes(image) for image in images]
    with zarr.config.set({"json_indent": None}):
        sync(_write_batch(MemoryStore(encoded), images, attributes, config))
    prefixes = tuple(f"archive/{image.unit_id}/" for image in images)
    return {key: value.to_bytes() for key, value in encoded.items() if key.startswith(prefixes)}


def write_archive_image(root: zarr.Group, unit_id: str, pixels: np.ndarray, spacing: tuple[float, ...],
                        config: StoreConfig, mask: np.ndarray | None = None,
                        attrs: Mapping[str, Any] | None = None) -> None:
    """One de-identified image at native resolution as an OME-Zarr image group under `root`/archive/ (+ its mask as
    a label image), replacing any earlier one: the same bytes as `ArchiveWriter` writes."""
    archive = root.require_group("archive")
    if unit_id in archive:
        del root[f"archive/{unit_id}"]
    files = encode_archive_images([ArchiveImage(unit_id, pixels, tuple(spacing), mask, attrs or {})], config)
    prefix = f"{root.path}/" if root.path else ""
    store = root.store

    async def put() -> None:
        for key, value in files.items():
            await store.set(prefix + key, default_buffer_prototype().buffer.from_bytes(value))

    sync(put())


class ArchiveWriter:
    """Collects the archive images of one task and writes them in batches; `existing` unit ids are replaced.
    Use as a context manager (or call `flush`) so that the last batch is written."""

    def __init__(self, store_url: str, config: StoreConfig, existing: set[str] | frozenset[str] = frozenset()):
        self.fs, self.root = store_fs(store_url)
        self.config = config
        self.existing = set(existing)
        self.images: list[ArchiveImage] = []
        self.pending = 0

    def add(self, unit_id: str, pixels: np.ndarray, spacing: tuple[float, ...], mask: np.ndarray | None,
            attrs: Mapping[str, Any]) -> None:
        """Queue one image (and its mask); flushes when the batch holds FLUSH_BYTES."""
        self.images.append(ArchiveImage(unit_id, pixels, tuple(spacing), mask, attrs))
        self.pending += pixels.nbytes + (mask.nbytes if mask is not None else 0)
        if self.pending >= FLUSH_BYTES or pixels.nbytes >= LARGE_IMAGE:
            self.flush()

    def flush(self) -> None:
        """Write the batch: stale copies of replaced units removed first, then every file in one transfer."""
        if not self.images:
            return
        for image in self.images:
            if image.unit_id in self.existing:  # re-archived: old chunks of another shape must not linger
                path = f"{self.root}/archive/{image.unit_id}"
                if self.fs.exists(path):
                    self.fs.rm(path, recursive=True)
        files = encode_archive_images(self.images, self.config)
        put_files(self.fs, {f"{self.root}/{key}": value for key, value in files.items()})
        self.images, self.pending = [], 0

    def __enter__(self) -> "ArchiveWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.flush()
