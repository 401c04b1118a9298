"""Discovery: list the files under a local folder or fsspec URL, and cut lists into shards."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence, TypeVar

import fsspec

T = TypeVar("T")


@dataclass(frozen=True)
class SourceListing:
    """All files under SOURCE (relative POSIX paths, sorted) with sizes and modification stamps."""

    url: str
    root: str
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    stamps: tuple[str, ...]
    skipped_links: list[dict[str, str]] = field(default_factory=list)  # {"path": relative link path, "reason"}

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def fingerprint(self) -> str:
        """Digest of the listing (paths, sizes, stamps): changes when any file is added, removed or rewritten."""
        h = hashlib.sha256()
        for item in zip(self.paths, self.sizes, self.stamps):
            h.update(json.dumps(item).encode())
        return h.hexdigest()


def source_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a SOURCE (local folder or URL)."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def _stamp(info: dict[str, Any]) -> str:
    for key in ("mtime", "LastModified", "last_modified", "ETag", "etag"):
        if key in info and info[key] is not None:
            return str(info[key])
    return ""


def discover_files(url: str, exclude: Sequence[str] = (), store: str | None = None,
                   skip_suffixes: Sequence[str] = ()) -> SourceListing:
    """Walk SOURCE recursively; hidden files/folders, the `exclude` relative paths (the manifest) and a `store`
    inside SOURCE are skipped. On a local disk, symbolic links are followed when they point inside SOURCE (each
    real file is listed once, under its first path in sorted order) and reported in `skipped_links` otherwise."""
    fs, root = source_fs(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"source not found: {url}")
    if not fs.isdir(root):
        raise NotADirectoryError(f"source must be a folder or bucket prefix: {url}")
    excluded = set(exclude)
    skipped: list[dict[str, str]] = []
    if is_local_fs(fs):
        found = _walk_local(root, skipped)
    else:
        found = [(path[len(root):].lstrip("/"), info) for path, info in fs.find(root, detail=True).items()
                 if info.get("type") != "directory"]
    store_prefix = _store_prefix(fs, root, store)
    rows = []
    for relative, info in found:
        if not relative or relative in excluded or any(part.startswith(".") for part in relative.split("/")):
            continue
        if skip_suffixes and relative.lower().endswith(tuple(skip_suffixes)):
            continue
        if store_prefix is not None and (relative == store_prefix or relative.startswith(store_prefix + "/")):
            continue
        rows.append((relative, int(info.get("size") or 0), _stamp(info)))
    rows.sort()
    return SourceListing(url, root, tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows),
                         skipped)


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"file", "local"} & set(protocols))


def _store_prefix(fs: fsspec.AbstractFileSystem, root: str, store: str | None) -> str | None:
    """The store's path relative to SOURCE when it lies inside it (its files are never inputs), else None."""
    if store is None:
        return None
    store_fs_, store_root = source_fs(store)
    if type(store_fs_) is not type(fs):
        return None
    if is_local_fs(fs):
        root, store_root = os.path.realpath(root), os.path.realpath(store_root)
    if store_root.startswith(root.rstrip("/") + "/"):
        return store_root[len(root.rstrip("/")) + 1:]
    return None


def _walk_local(root: str, skipped: list[dict[str, str]]) -> list[tuple[str, dict[str, Any]]]:
    """Files under a local folder as (relative path, {size, mtime}), following links that stay inside it.

    Hand-written because fsspec's local `find` neither follows symlinked folders nor says it skipped them.
    Skipped links keep their relative path here, on the driver; the store records only its keyed hash."""
    real_root = os.path.realpath(root)
    seen: set[str] = {real_root}
    out: list[tuple[str, dict[str, Any]]] = []

    def visit(folder: str, prefix: str) -> None:  # depth first in sorted order: the first path of a file wins
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            relative = f"{prefix}{entry.name}"
            if entry.name.startswith("."):
                continue
            target = os.path.realpath(entry.path)
            if entry.is_symlink():
                inside = target == real_root or target.startswith(real_root + os.sep)
                if not os.path.exists(target) or not inside:
                    reason = "broken link" if not os.path.exists(target) else "link points outside SOURCE"
                    skipped.append({"path": relative, "reason": reason})
                    continue
            if target in seen:
                continue
            seen.add(target)
            if os.path.isdir(target):
                visit(entry.path, relative + "/")
            elif os.path.isfile(target):
                stat = os.stat(target)
                out.append((relative, {"size": stat.st_size, "mtime": stat.st_mtime}))

    visit(root, "")
    return out


def make_shards(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive shards of at most `size` items (deterministic for the same input)."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
