"""The medpipe Zarr store: opening (local or s3://), codecs, archive images, training arrays, sample table.

Layout (see docs/store.md):
    STORE/ attrs["medpipe"]          schema version, config, fingerprint, code version, content hash, counts
    STORE/archive/<unit>/            one OME-Zarr (NGFF 0.5) image per de-identified image/series, native resolution
    STORE/training/{images,labels,masks}   fixed-shape arrays, chunks = blocks of samples, sharded
    STORE/samples/<column>           per-sample table aligned with training/
    STORE/reports/*.json             accounting, quarantine, exclusions, audit (no PHI)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Literal, Mapping

import fsspec
import numpy as np
import zarr

from medpipe.codecs import codec_chain, training_images_chain  # importing medpipe.codecs registers the medpipe.jpegls codec
from medpipe.config import StoreConfig
from medpipe.errors import UserError

SCHEMA_VERSION = 1
ATTRS_KEY = "medpipe"
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
STRING_COLUMNS = ("patient", "study", "series", "unit", "source_hash", "modality")


class StoreError(UserError, RuntimeError):
    """A store is missing, incomplete or not a medpipe store."""


def open_store(url: str, mode: Literal["r", "r+", "a", "w", "w-"] = "r") -> zarr.Group:
    """Root group of a store at a local path or fsspec URL (s3:// through s3fs)."""
    try:
        return zarr.open_group(url, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"no medpipe store at {url}") from exc


def get_array(group: zarr.Group, path: str) -> zarr.Array:
    """The array at `path` under `group` (zarr's `group[path]` may also be a group: this says which it must be)."""
    node = group[path]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{path} in the store is not an array")
    return node


def get_group(group: zarr.Group, path: str) -> zarr.Group:
    """The group at `path` under `group`."""
    node = group[path]
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{path} in the store is not a group")
    return node


def attrs_of(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """The medpipe attributes of a group or array (empty when absent)."""
    value = node.attrs.get(ATTRS_KEY, {})
    return dict(value) if isinstance(value, Mapping) else {}


def store_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and root path of a store URL."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def write_json(url: str, relative: str, payload: Any) -> None:
    """Write a JSON document next to the arrays (reports/, work/); overwrite as one object."""
    fs, root = store_fs(url)
    path = f"{root}/{relative}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(payload, indent=1, sort_keys=True).encode())


def read_json(url: str, relative: str) -> Any | None:
    """Read a JSON document from the store; None when absent or unreadable (e.g. cut off by a kill)."""
    fs, root = store_fs(url)
    try:
        return json.loads(fs.cat_file(f"{root}/{relative}"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def remove_path(url: str, relative: str) -> None:
    """Delete a file or folder of the store if present."""
    fs, root = store_fs(url)
    path = f"{root}/{relative}"
    if fs.exists(path):
        fs.rm(path, recursive=True)


def archive_axes(ndim: int) -> list[dict[str, str]]:
    names = ["c", "z", "y", "x"][-ndim:] if ndim == 4 else ["c", "y", "x"]
    return [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "millimeter"} for n in names[1:]
    ]


def array_checksum(*arrays: np.ndarray) -> str:
    """sha256 over dtype, shape and bytes of arrays."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)  # the buffer itself: tobytes() would copy it first
    return h.hexdigest()


def dimension_names(ndim: int, leading: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Zarr v3 dimension names matching the NGFF axes: c, (z,) y, x, after `leading` names (e.g. "n")."""
    spatial = ("z", "y", "x")[-(ndim - len(leading) - 1):]
    return (*leading, "c", *spatial)


def archive_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Whole 2D images in one chunk; volumes in chunks of up to 64 slices."""
    if len(shape) == 4:
        return (shape[0], min(shape[1], 64), shape[2], shape[3])
    return tuple(shape)


def read_archive_image(root: zarr.Group, unit_id: str) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Pixels, mask (or None) and medpipe attributes of one archive image."""
    group = get_group(root, f"archive/{unit_id}")
    pixels = np.asarray(get_array(group, "0")[...])
    mask = np.asarray(get_array(group, "labels/mask/0")[...]) if "labels" in group else None
    return pixels, mask, attrs_of(group)


def samples_per_chunk(sample_shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> int:
    """Samples in one training chunk: a power of two near chunk_bytes, at least one (large 3D volumes)."""
    per_sample = int(np.prod(sample_shape)) * itemsize
    n = max(1, chunk_bytes // per_sample)
    return 1 << (n.bit_length() - 1)


def create_training_arrays(
    root: zarr.Group, n: int, sample_shape: tuple[int, ...], with_masks: bool, config: StoreConfig
) -> int:
    """Create empty training/{images,labels,masks}; returns samples per shard (the unit of one writing task)."""
    dtype, chain = training_images_chain(config)
    spc = samples_per_chunk(sample_shape, dtype.itemsize, config.chunk_bytes)
    per_shard = spc * config.chunks_per_shard
    training = root.create_group("training", overwrite=True)
    shard_n = max(spc, min(per_shard, _round_up(max(n, 1), spc)))
    names = dimension_names(len(sample_shape) + 1, ("n",))
    training.create_array("images", shape=(n, *sample_shape), dtype=dtype, chunks=(spc, *sample_shape),
                          shards=(shard_n, *sample_shape), fill_value=0.0, dimension_names=names, **chain)
    training.create_array("labels", shape=(n,), dtype="int64", chunks=(max(n, 1),), fill_value=-1,
                          dimension_names=("n",))
    if with_masks:
        mask_shape = (1, *sample_shape[1:])
        training.create_array("masks", shape=(n, *mask_shape), dtype="uint8", chunks=(spc, *mask_shape),
                              shards=(shard_n, *mask_shape), fill_value=0, dimension_names=names,
                              **codec_chain("training_masks", config, "uint8"))
    return shard_n


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def write_sample_table(root: zarr.Group, table: Mapping[str, np.ndarray]) -> None:
    """Write the per-sample table as one 1-D (or N x k) array per column under samples/."""
    group = root.create_group("samples", overwrite=True)
    for name, values in table.items():
        values = np.asarray(values)
        dtype = str if name in STRING_COLUMNS else values.dtype
        chunks = tuple(max(1, d) for d in values.shape)
        arr = group.create_array(name, shape=values.shape, dtype=dtype, chunks=chunks)
        if values.size:
            arr[...] = values.astype(object) if dtype is str else values
    group.attrs["split_codes"] = SPLIT_CODES


def read_sample_table(url_or_root: str | zarr.Group) -> dict[str, np.ndarray]:
    """The per-sample table as numpy arrays (strings as object/str arrays)."""
    root = open_store(url_or_root) if isinstance(url_or_root, str) else url_or_root
    if "samples" not in root:
        raise StoreError("store has no per-sample table (samples/): was ingestion completed?")
    group = get_group(root, "samples")
    return {name: np.asarray(get_array(group, name)[...]) for name in sorted(group.array_keys())}


def store_attrs(url_or_root: str | zarr.Group) -> dict[str, Any]:
    """The medpipe attributes of a store's root group (empty when not a medpipe store)."""
    root = open_store(url_or_root) if isinstance(url_or_root, str) else url_or_root
    return attrs_of(root)


def sample_digest(values: np.ndarray) -> str:
    """Digest of one stored sample (a row of a training array, or one case array): dtype, shape and bytes."""
    a = np.ascontiguousarray(values)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
    return h.hexdigest()


def row_digests(name: str, start: int, values: np.ndarray) -> dict[str, str]:
    """`{"<name>/<row>": digest}` of rows start, start+1, ... of a training array, as stored (its dtype)."""
    return {f"{name}/{start + i}": sample_digest(row) for i, row in enumerate(values)}


def stored_digests(root: zarr.Group) -> dict[str, str]:
    """Every stored sample's digest, read back from the arrays: what the writing tasks report as they write."""
    out: dict[str, str] = {}
    training = get_group(root, "training")
    for name in ("images", "masks"):
        if name in training:
            arr = get_array(training, name)
            step = max(1, arr.chunks[0] * 8)
            for start in range(0, arr.shape[0], step):
                out.update(row_digests(name, start, np.asarray(arr[start : start + step])))
    if "volumes" in training:
        volumes = get_group(training, "volumes")
        for case in volumes.group_keys():
            for name in ("image", "mask"):
                out[f"volumes/{case}/{name}"] = sample_digest(np.asarray(get_array(volumes, f"{case}/{name}")[...]))
    return out


def _complete(root: zarr.Group, digests: Mapping[str, str]) -> bool:
    """True when `digests` names exactly the samples the training arrays hold (one listing, no data read)."""
    training = get_group(root, "training")
    expected = sum(get_array(training, n).shape[0] for n in ("images", "masks") if n in training)
    if "volumes" in training:
        expected += 2 * len(list(get_group(training, "volumes").group_keys()))
    return len(digests) == expected


def _digest_order(key: str) -> tuple[str, int, str]:
    name, index, *rest = key.split("/")
    return name, int(index), "/".join(rest)


def content_hash(root: zarr.Group, extra: Iterable[str] = (), digests: Mapping[str, str] | None = None,
                 table: Mapping[str, np.ndarray] | None = None) -> str:
    """sha256 over the training arrays (each stored sample's digest, in order), the sample table, archive checksums
    and `extra` strings.

    `digests` are the per-sample digests the writing tasks reported (so a finished run never reads back what it
    just wrote); when absent or not covering every sample they are computed from the arrays (verification).
    `table`: the per-sample table as written (else it is read from samples/).
    Depends only on data (not on timestamps, chunk write order or metadata formatting), so a rerun or a resumed
    run yields the same hash, and any change of data changes it.
    """
    h = hashlib.sha256()
    if "training" in root:
        training = get_group(root, "training")
        for name in sorted(training.array_keys()):
            arr = get_array(training, name)
            h.update(f"{name}{arr.dtype}{arr.shape}".encode())
            if name == "labels":
                h.update(np.ascontiguousarray(arr[...]).tobytes())
        if digests is None or not _complete(root, digests):
            digests = stored_digests(root)
        for key in sorted(digests, key=_digest_order):
            h.update(f"{key}:{digests[key]}".encode())
    if table is not None or "samples" in root:
        columns = read_sample_table(root) if table is None else {name: np.asarray(table[name]) for name in sorted(table)}
        for name, values in columns.items():
            h.update(name.encode())
            h.update("\x1f".join(map(str, values.ravel().tolist())).encode())
    for item in extra:
        h.update(item.encode())
    return h.hexdigest()
