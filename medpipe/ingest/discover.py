"""Discovery: list the files under a local folder or fsspec URL, and cut lists into shards."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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


def discover_files(url: str, exclude: Sequence[str] = ()) -> SourceListing:
    """Walk SOURCE recursively; hidden files/folders and the `exclude` relative paths (the manifest) are skipped."""
    fs, root = source_fs(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"source not found: {url}")
    if not fs.isdir(root):
        raise NotADirectoryError(f"source must be a folder or bucket prefix: {url}")
    found = fs.find(root, detail=True)
    excluded = set(exclude)
    rows = []
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        relative = path[len(root):].lstrip("/")
        if not relative or relative in excluded or any(part.startswith(".") for part in relative.split("/")):
            continue
        rows.append((relative, int(info.get("size") or 0), _stamp(info)))
    rows.sort()
    return SourceListing(url, root, tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows))


def make_shards(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive shards of at most `size` items (deterministic for the same input)."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
