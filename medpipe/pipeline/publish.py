"""Copies between the local scratch folder and OUTPUT (a local path or an s3:// URL), through fsspec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medpipe.store import store_fs


def join_url(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URL (forward slashes, no doubled separators)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def url_exists(url: str) -> bool:
    """Whether a file (or a non-empty folder) exists at `url`."""
    fs, path = store_fs(url)
    return bool(fs.exists(path))


def publish_dir(local_dir: str | Path, dest_url: str, skip_suffixes: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under `local_dir` to `dest_url` (same relative paths), except those ending in one of
    `skip_suffixes`; returns the URLs written, sorted."""
    src = Path(local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"nothing to publish: {src} is not a folder")
    fs, root = store_fs(dest_url)
    written = []
    for file in sorted(p for p in src.rglob("*") if p.is_file() and not p.name.endswith(skip_suffixes)):
        rel = file.relative_to(src).as_posix()
        target = f"{root}/{rel}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(file), target)
        written.append(join_url(dest_url, rel))
    return written


def fetch_dir(src_url: str, local_dir: str | Path) -> Path:
    """Copy every file under `src_url` into `local_dir` (same relative paths); returns `local_dir`."""
    fs, root = store_fs(src_url)
    found = fs.find(root)
    if not found:
        raise FileNotFoundError(f"nothing to fetch at {src_url}")
    dest = Path(local_dir)
    for path in found:
        target = dest / path[len(root):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))
    return dest


def write_json_url(url: str, payload: Any) -> str:
    """Write `payload` as indented JSON at `url` (parents created); returns `url`."""
    fs, path = store_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())
    return url


def read_json_url(url: str) -> Any | None:
    """The JSON at `url`, or None when there is no file."""
    fs, path = store_fs(url)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
