"""What the machine itself gives to N processes, measured beside the pipeline's figures (issue 11).

  compute_N_processes_vs_1   throughput of N processes each hashing a 64 KiB buffer (sha256: stays in each core's
                             cache) over one process doing the same: how far the cores scale on their own
  memory_N_processes_vs_1    the same for copying a 32 MiB array into another (streams through memory, past the
                             caches): how far memory bandwidth scales

Each is measured --repeats times (median printed, min and max beside it): on a shared virtual machine the memory
figure moves with the other tenants.

An ingest task or a loader process mixes both kinds of work, so their N-worker figures (ingest_2_workers_vs_1,
loader_2_workers_vs_0) can reach the first ratio only where they compute and the second where they move memory.
On the 2-core development VM (2026-11-30) compute scaled 1.95-2.0x and memory anywhere from 1.03x to 1.92x
between runs minutes apart (docs/benchmarks.md).

Usage: python benchmarks/machine.py [--processes 2] [--seconds 0.7] [--repeats 3] [--json]
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import OneLineArgumentParser, ratio_line  # noqa: E402

COPY_BYTES = 32 << 20  # the size of a CT series' int16 slices; far past a 32 MiB L3 once source and copy count


def _wait_until(start_at: float | None) -> None:
    """Sleep until the wall-clock time `start_at` (None: go now), so that the processes of a pool run together."""
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))


def hash_in_cache(rounds: int, start_at: float | None = None) -> float:
    """Seconds to sha256 a 64 KiB buffer `rounds` times (from `start_at`)."""
    block = b"\x5a" * 65536
    _wait_until(start_at)
    start = time.perf_counter()
    for _ in range(rounds):
        hashlib.sha256(block).digest()
    return time.perf_counter() - start


def copy_through_memory(rounds: int, start_at: float | None = None) -> float:
    """Seconds to copy a COPY_BYTES array into another `rounds` times (from `start_at`; both arrays written once
    before)."""
    source = np.ones(COPY_BYTES, np.uint8)
    target = np.zeros_like(source)
    _wait_until(start_at)
    start = time.perf_counter()
    for _ in range(rounds):
        np.copyto(target, source)
    return time.perf_counter() - start


def scaling(work: Callable[..., float], seconds: float, processes: int) -> tuple[float, float]:
    """(throughput of `processes` processes over one, seconds of the single run): each process does the rounds one
    process needs for `seconds`, all starting at the same moment (a second after the pool is up); the slowest of
    them counts."""
    probe = 1
    while work(probe) < 0.05:
        probe *= 2
    rounds = max(1, int(probe * seconds / max(work(probe), 1e-9)))
    one = work(rounds)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_wait_until, [None] * processes)  # every process started and imported
        start_at = time.time() + 1.0
        many = max(pool.starmap(work, [(rounds, start_at)] * processes))
    return processes * one / many, one


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="processes compared with one")
    parser.add_argument("--seconds", type=float, default=0.7, help="length of each timed run")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each figure (median printed)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object of the figures")
    args = parser.parse_args()
    if args.processes < 2 or not 0 < args.seconds <= 60 or args.repeats < 1:
        parser.error("need --processes >= 2, 0 < --seconds <= 60 and --repeats >= 1")
    n = args.processes
    fig: dict[str, float] = {}
    for name, work, what in (("compute", hash_in_cache, "sha256 of a 64 KiB buffer, in cache"),
                             ("memory", copy_through_memory, f"copies of a {COPY_BYTES >> 20} MiB array")):
        runs = sorted(scaling(work, args.seconds, n) for _ in range(args.repeats))
        ratios = [ratio for ratio, _ in runs]
        key = f"{name}_{n}_processes_vs_1"
        fig[key], fig[f"{key}_min"], fig[f"{key}_max"] = float(np.median(ratios)), ratios[0], ratios[-1]
        fig[f"{name}_1_process_s"] = float(np.median([one for _, one in runs]))
        print(ratio_line(key, fig[key], "-", f"{what}; {n} processes on {multiprocessing.cpu_count()} cores; median "
                         f"of {args.repeats}, {ratios[0]:.2f}-{ratios[-1]:.2f}"), flush=True)
    if args.json:
        print(json.dumps({k: round(float(v), 4) for k, v in fig.items()}, sort_keys=True))


if __name__ == "__main__":
    main()
