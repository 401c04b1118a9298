"""Helpers shared by the benchmark scripts: timing, environment, folder sizes."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MEDPIPE_DEID_KEY", "medpipe-benchmark-key-public-not-secret-0123456789abcdef")


@contextmanager
def timed(results: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the block under `name`."""
    start = time.perf_counter()
    yield
    results[name] = time.perf_counter() - start


def folder_bytes(path: str | Path) -> int:
    """Total size of the files under a folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def ratio_line(name: str, value: float, goal: str, detail: str) -> str:
    """One printed line per ratio: name, value, goal, what was measured."""
    return f"{name:<44} {value:6.2f}x   goal {goal:<7} ({detail})"
