"""The signals store: fixed windows of de-identified multi-lead signals and their per-window table.

Layout (docs/signals.md):
    STORE/ attrs["medpipe"]   kind "signals", schema version, complete, content hash, rate_hz, leads, units,
                              window and stride (samples), classes, counts, config, de-identification method
    STORE/signals             float32 (N, L, T): one chunk per window, shards of whole windows
    STORE/windows/<column>    per-window table: patient (pseudonym), record (keyed hash of its path), window
                              (index in its record), start_s (seconds from the record's start), label (-1: none),
                              split (0 train, 1 val, 2 test: per patient, medpipe.splits.split_of)
    STORE/reports/*.json      accounting, quarantine, de-identification audit (no PHI)
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np
import zarr

from medpipe.codecs import codec_chain
from medpipe.config import StoreConfig
from medpipe.store import (ATTRS_KEY, SCHEMA_VERSION, SPLIT_CODES, StoreError, attrs_of, get_array, get_group,
                           open_store, sample_digest)

SIGNALS_KIND = "signals"
SIGNALS = "signals"
WINDOWS = "windows"
# column -> dtype of the per-window table (strings: patient pseudonym, record hash)
WINDOW_COLUMNS: dict[str, Any] = {"patient": str, "record": str, "window": np.int32, "start_s": np.float64,
                                  "label": np.int64, "split": np.int8}
REQUIRED_ATTRS = ("rate_hz", "leads", "units", "window", "stride", "classes")


class SignalStoreError(StoreError):
    """A store that is not a complete signals store."""


def windows_per_shard(leads: int, window: int, config: StoreConfig) -> int:
    """Windows in one shard file: a power of two near `config.chunk_bytes` of float32 windows, at least one."""
    per_window = leads * window * np.dtype(np.float32).itemsize
    n = max(1, config.chunk_bytes // per_window)
    return 1 << (n.bit_length() - 1)


def create_signal_array(root: zarr.Group, n: int, leads: int, window: int, config: StoreConfig) -> int:
    """Create the empty `signals` array (n, leads, window) float32, one chunk per window; returns the windows per
    shard (writers of disjoint whole shards may run concurrently)."""
    per_shard = windows_per_shard(leads, window, config)
    root.create_array(SIGNALS, shape=(n, leads, window), dtype="float32", chunks=(1, leads, window),
                      shards=(per_shard, leads, window), fill_value=0.0, dimension_names=("n", "lead", "t"),
                      overwrite=True, **codec_chain("training_images", config, "float32"))
    return per_shard


def write_window_table(root: zarr.Group, table: Mapping[str, np.ndarray]) -> None:
    """Write the per-window table (every column of WINDOW_COLUMNS, equal lengths) under windows/."""
    missing = sorted(set(WINDOW_COLUMNS) - set(table))
    if missing:
        raise ValueError(f"window table lacks column(s) {', '.join(missing)}")
    lengths = {len(np.asarray(v)) for v in table.values()}
    if len(lengths) > 1:
        raise ValueError(f"window table columns differ in length: {sorted(lengths)}")
    group = root.create_group(WINDOWS, overwrite=True)
    for name, dtype in WINDOW_COLUMNS.items():
        values = np.asarray(table[name])
        arr = group.create_array(name, shape=values.shape, dtype=dtype, chunks=(max(1, values.shape[0]),))
        if values.size:
            arr[...] = values.astype(object) if dtype is str else values.astype(dtype)
    group.attrs["split_codes"] = SPLIT_CODES


def read_window_table(url_or_root: str | zarr.Group) -> dict[str, np.ndarray]:
    """The per-window table as numpy arrays (strings as object arrays)."""
    root = open_store(url_or_root) if isinstance(url_or_root, str) else url_or_root
    if WINDOWS not in root:
        raise SignalStoreError("store has no per-window table (windows/): was signal ingestion completed?")
    group = get_group(root, WINDOWS)
    return {name: np.asarray(get_array(group, name)[...]) for name in sorted(group.array_keys())}


def signal_attrs(url_or_root: str | zarr.Group) -> dict[str, Any]:
    """The medpipe attributes of a complete signals store; SignalStoreError (one line) otherwise."""
    try:
        root = open_store(url_or_root) if isinstance(url_or_root, str) else url_or_root
    except StoreError as exc:
        raise SignalStoreError(str(exc)) from None
    attrs = attrs_of(root)
    where = url_or_root if isinstance(url_or_root, str) else "the store"
    if attrs.get("kind") != SIGNALS_KIND:
        raise SignalStoreError(f"{where} is not a medpipe signals store (ingest signals with `medpipe ingest-signals`)")
    if not attrs.get("complete"):
        raise SignalStoreError(f"{where} is not complete: signal ingestion was interrupted or is still running; "
                               "rerun `medpipe ingest-signals`")
    return attrs


def is_signal_store(url: str) -> bool:
    """True when `url` holds a medpipe store of kind "signals" (complete or not)."""
    try:
        return attrs_of(open_store(url)).get("kind") == SIGNALS_KIND
    except (StoreError, OSError, ValueError):
        return False


def open_signals(url_or_root: str | zarr.Group) -> zarr.Array:
    """The `signals` array (N, L, T) of a complete signals store."""
    root = open_store(url_or_root) if isinstance(url_or_root, str) else url_or_root
    signal_attrs(root)
    return get_array(root, SIGNALS)


def split_rows(url_or_root: str | zarr.Group, split: str) -> np.ndarray:
    """Sorted window indices of a split ("train", "val", "test")."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; use {', '.join(SPLIT_CODES)}")
    root = open_store(url_or_root) if isinstance(url_or_root, str) else url_or_root
    codes = np.asarray(get_array(get_group(root, WINDOWS), "split")[...])
    return np.flatnonzero(codes == SPLIT_CODES[split]).astype(np.int64)


def window_digests(start: int, windows: np.ndarray) -> dict[str, str]:
    """`{"signals/<row>": digest}` of windows start, start+1, ... as stored (what writing tasks report)."""
    return {f"{SIGNALS}/{start + i}": sample_digest(w) for i, w in enumerate(np.asarray(windows, np.float32))}


def signal_content_hash(root: zarr.Group, digests: Mapping[str, str] | None = None) -> str:
    """sha256 over every window's digest (in order), the window table and the store's signal facts. Uses the
    digests the writing tasks reported when they cover every window, else reads the windows (verification)."""
    signals = get_array(root, SIGNALS)
    n = signals.shape[0]
    if digests is None or len(digests) != n:
        digests = {}
        step = max(1, signals.shards[0] if signals.shards else signals.chunks[0])
        for start in range(0, n, step):
            digests.update(window_digests(start, np.asarray(signals[start : start + step])))
    h = hashlib.sha256(f"{signals.dtype}{signals.shape}".encode())
    for row in range(n):
        h.update(f"{row}:{digests[f'{SIGNALS}/{row}']}".encode())
    for name, values in read_window_table(root).items():
        h.update(name.encode())
        h.update("\x1f".join(map(str, values.ravel().tolist())).encode())
    attrs = attrs_of(root)
    h.update(repr([attrs.get(k) for k in REQUIRED_ATTRS]).encode())
    return h.hexdigest()


def finish_signal_store(root: zarr.Group, attrs: Mapping[str, Any], digests: Mapping[str, str] | None = None
                        ) -> dict[str, Any]:
    """Write the store's attributes with its content hash and `complete: True`; returns them."""
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"signal store attributes lack {', '.join(missing)}")
    final = {**attrs, "kind": SIGNALS_KIND, "schema_version": SCHEMA_VERSION, "complete": False}
    root.attrs[ATTRS_KEY] = final  # the hash covers the signal facts: written first
    final = {**final, "content_hash": signal_content_hash(root, digests), "complete": True}
    root.attrs[ATTRS_KEY] = final
    return final


def write_signal_store(url: str, signals: np.ndarray, table: Mapping[str, np.ndarray], attrs: Mapping[str, Any],
                       config: StoreConfig | None = None) -> dict[str, Any]:
    """Write a complete signals store in one call: `signals` (N, L, T), the per-window `table`, `attrs` (rate_hz,
    leads, units, window, stride, classes, ...). Overwrites `url`. Returns the final attributes."""
    signals = np.asarray(signals, dtype=np.float32)
    if signals.ndim != 3:
        raise ValueError(f"signals must be (N, leads, T), got shape {signals.shape}")
    root = zarr.open_group(url, mode="w")
    root.attrs[ATTRS_KEY] = {"kind": SIGNALS_KIND, "complete": False}
    create_signal_array(root, signals.shape[0], signals.shape[1], signals.shape[2], config or StoreConfig())
    if signals.shape[0]:
        get_array(root, SIGNALS)[...] = signals
    write_window_table(root, table)
    return finish_signal_store(root, attrs, window_digests(0, signals))


__all__ = ["SIGNALS_KIND", "WINDOW_COLUMNS", "SignalStoreError", "create_signal_array", "finish_signal_store",
           "is_signal_store", "open_signals", "read_window_table", "signal_attrs", "signal_content_hash",
           "split_rows", "window_digests", "windows_per_shard", "write_signal_store", "write_window_table"]
