"""Helpers shared by the benchmark scripts: timing, environment, folder sizes."""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # busy machines: 20 s is short
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


def warm_page_cache(path: str | Path) -> int:
    """Read every file under a folder once (so that timed reads come from memory); returns the bytes read."""
    total = 0
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            total += len(p.read_bytes())
    return total


def best_time(repeats: int, run: Callable[[], object], setup: Callable[[], object] | None = None,
              warmup: bool = False) -> float:
    """The shortest wall time of `repeats` calls of `run` (at least one), each after an untimed `setup()`; with
    `warmup`, one untimed call first (imports and first calls are paid once by a long-lived process)."""
    if warmup:
        if setup is not None:
            setup()
        run()
    times = []
    for _ in range(max(1, repeats)):
        if setup is not None:
            setup()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`error: ...`, status 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")
