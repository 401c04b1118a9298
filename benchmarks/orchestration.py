"""Orchestration overhead: Prefect task runs on the DaskTaskRunner vs the same work on bare Dask (issue 11).

A synthetic workload shaped like ingest: `--units` tiny work units (a fixed amount of hashing each, calibrated to
`--unit-ms`) grouped in N shards, one task per shard. Each shard returns a small summary or, like a scan shard, one
dict per unit ("large"). Both sides run on the same LocalCluster, started (and its workers warmed by one flow)
before anything is timed; the Prefect API is warmed too (`flows.runtime.warm_api_server`), so the numbers are the
per-flow and per-task cost only. Variants of the Prefect side: task options (Prefect's defaults, tasks/options.py
STEP_TASK and IO_TASK), the `flows.runtime.gather` progress bar, and Prefect settings (run logs to the API).

Printed: one line per (shards, result, variant): best-of-`--repeats` seconds, ratio to bare Dask, the added
seconds per task and the flow thread's submission time per task; then a least-squares split of the added time into
a per-flow and a per-task part, and the embedded API's start time. `--json` adds the raw timings.

Usage: python benchmarks/orchestration.py [--units 10000] [--shards 8,16,40,100] [--unit-ms 1.0] [--workers 2]
       [--results small,large] [--variants bare,defaults,step,io,io-progress,io-no-api-logs] [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks._common  # noqa: E402,F401  (sets the Prefect env of benchmarks)

BLOCK = bytes(64 * 1024)
RESULTS = ("small", "large")


def work_shard(start: int, stop: int, rounds: int, result: str) -> Any:
    """Units start..stop-1: `rounds` hashes of 64 KiB each; a summary, or one record per unit (`result="large"`)."""
    records = []
    digest = b""
    for unit in range(start, stop):
        for _ in range(rounds):
            digest = hashlib.sha256(BLOCK + digest[:8]).digest()
        if result == "large":
            records.append({"unit": unit, "path": f"study-{unit // 50:05d}/image-{unit:06d}.dcm", "rows": 128,
                            "columns": 128, "modality": "DX", "bits": 16, "bytes": 32_768 + unit % 97,
                            "series": f"1.2.826.0.1.{unit // 50}", "instance": unit % 50, "ok": True,
                            "sha": digest.hex()[:16], "note": None})
    return records if result == "large" else {"units": stop - start, "sha": digest.hex()[:16]}


def calibrate_rounds(unit_ms: float) -> int:
    """Hash rounds per unit that take about `unit_ms` on this machine."""
    n, start = 2000, time.perf_counter()
    for _ in range(n):
        hashlib.sha256(BLOCK).digest()
    per_round_ms = (time.perf_counter() - start) * 1000 / n
    return max(1, round(unit_ms / per_round_ms))


def shard_bounds(units: int, shards: int) -> tuple[list[int], list[int]]:
    """Start and stop of each of `shards` near-equal slices of range(units)."""
    edges = [units * i // shards for i in range(shards + 1)]
    return edges[:-1], edges[1:]


@dataclass(frozen=True)
class Variant:
    """One way of running the shards as Prefect tasks."""

    name: str
    options: str  # "defaults" (Prefect's), "step" or "io" (tasks/options.py)
    progress: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # Prefect setting name -> value during the flow


VARIANTS = {v.name: v for v in (
    Variant("defaults", "defaults"),
    Variant("step", "step"),
    Variant("io", "io"),
    Variant("io-progress", "io", progress=True),
    Variant("io-no-api-logs", "io", settings={"PREFECT_LOGGING_TO_API_ENABLED": False}),
)}


def task_options(name: str) -> dict[str, Any]:
    from tasks.options import IO_TASK, STEP_TASK

    return {"defaults": {}, "step": STEP_TASK, "io": IO_TASK}[name]


Runner = Callable[[list[int], list[int], int, str], float]  # runs the shards; returns the seconds spent submitting


def bare_runner(client: Any) -> Runner:
    """The shards with `client.map`, results gathered in order."""
    def run(starts: list[int], stops: list[int], rounds: int, result: str) -> float:
        n, start = len(starts), time.perf_counter()
        futures = client.map(work_shard, starts, stops, [rounds] * n, [result] * n, pure=False)
        submitted = time.perf_counter() - start
        client.gather(futures)
        return submitted
    return run


def prefect_runner(address: str, variant: Variant) -> Runner:
    """The shards as mapped Prefect tasks of one flow run on the DaskTaskRunner of `address`."""
    from prefect import flow, task, unmapped
    from prefect.settings import temporary_settings

    from flows.runtime import dask_task_runner, gather

    shard_task = task(name="work-shard", **task_options(variant.options))(work_shard)

    @flow(name="orchestration-benchmark", task_runner=dask_task_runner(address), log_prints=False)
    def shards_flow(starts: list[int], stops: list[int], rounds: int, result: str) -> float:
        start = time.perf_counter()
        futures = shard_task.map(starts, stops, unmapped(rounds), unmapped(result))
        submitted = time.perf_counter() - start
        gather(futures, "shards", variant.progress)
        return submitted

    def run(starts: list[int], stops: list[int], rounds: int, result: str) -> float:
        with _settings(variant.settings, temporary_settings):
            return shards_flow(starts, stops, rounds, result)
    return run


def _settings(values: dict[str, Any], temporary_settings: Callable[..., AbstractContextManager[Any]]
              ) -> AbstractContextManager[Any]:
    """Prefect settings by environment-variable name, for the flow run (serialized into every task's context)."""
    if not values:
        return nullcontext()
    import prefect.settings as settings

    return temporary_settings(updates={getattr(settings, name): value for name, value in values.items()})


@dataclass(frozen=True)
class Measurement:
    """Best and median seconds of one (shards, result, variant) over the repeats, and the seconds the best run
    spent submitting its tasks."""

    shards: int
    result: str
    variant: str
    best_s: float
    median_s: float
    submit_s: float


def measure(run: Runner, units: int, shards: int, rounds: int, result: str, repeats: int
            ) -> list[tuple[float, float]]:
    """(wall seconds, submit seconds) of each repeat."""
    starts, stops = shard_bounds(units, shards)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        submitted = run(starts, stops, rounds, result)
        times.append((time.perf_counter() - start, submitted))
    return times


def report(measured: list[Measurement], units: int, unit_ms: float, workers: int) -> list[str]:
    """The table: seconds, ratio to bare Dask, the added seconds per task (all of the difference, spread over
    the tasks) and the submission time per task (the flow's thread, before any result is awaited)."""
    bare = {(m.shards, m.result): m.best_s for m in measured if m.variant == "bare"}
    lines = [f"{units} units of ~{unit_ms:g} ms on {workers} workers; best of repeats; ratio = flow / bare Dask",
             f"{'shards':>6} {'result':<6} {'variant':<15} {'seconds':>8} {'ratio':>6} {'added ms/task':>13} "
             f"{'submit ms/task':>14}"]
    for m in measured:
        base = bare.get((m.shards, m.result))
        ratio = f"{m.best_s / base:6.2f}" if base else "     -"
        added = f"{(m.best_s - base) * 1000 / m.shards:13.0f}" if base and m.variant != "bare" else f"{'-':>13}"
        lines.append(f"{m.shards:>6} {m.result:<6} {m.variant:<15} {m.best_s:8.2f} {ratio} {added} "
                     f"{m.submit_s * 1000 / m.shards:14.1f}")
    lines.append("fit of the added seconds over the shard counts: per flow + per task")
    for (result, variant), (per_flow, per_task) in overhead_fit(measured).items():
        lines.append(f"  {result:<6} {variant:<15} {per_flow:6.2f} s per flow + {per_task * 1000:5.0f} ms per task")
    return lines


def overhead_fit(measured: list[Measurement]) -> dict[tuple[str, str], tuple[float, float]]:
    """Least-squares line `added seconds = per_flow + per_task * shards` of each (result, variant) measured at two
    or more shard counts."""
    bare = {(m.shards, m.result): m.best_s for m in measured if m.variant == "bare"}
    points: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for m in measured:
        if m.variant != "bare" and (m.shards, m.result) in bare:
            points.setdefault((m.result, m.variant), []).append((m.shards, m.best_s - bare[(m.shards, m.result)]))
    fits = {}
    for key, xy in points.items():
        if len({x for x, _ in xy}) >= 2:
            slope, intercept = statistics.linear_regression([x for x, _ in xy], [y for _, y in xy])
            fits[key] = (intercept, slope)
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--shards", default="8,16,40,100", help="comma-separated shard counts")
    parser.add_argument("--unit-ms", type=float, default=1.0, help="work per unit (calibrated hashing)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", default=",".join(RESULTS))
    parser.add_argument("--variants", default="bare," + ",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON too")
    args = parser.parse_args()
    shard_counts = [int(s) for s in args.shards.split(",")]
    results = [r for r in args.results.split(",") if r]
    names = [v for v in args.variants.split(",") if v]
    unknown = [r for r in results if r not in RESULTS] + [v for v in names if v != "bare" and v not in VARIANTS]
    if unknown or args.units < 1 or args.repeats < 1 or min(shard_counts) < 1:
        parser.error(f"bad value(s): {', '.join(unknown) or 'units, repeats and shards must be >= 1'}")

    from distributed import Client, LocalCluster

    from flows.runtime import shared_api_server, warm_api_server

    rounds = calibrate_rounds(args.unit_ms)
    start = time.perf_counter()
    warm_api_server()  # before the cluster: its workers inherit $PREFECT_API_URL
    api_start_s = time.perf_counter() - start
    measured: list[Measurement] = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client, shared_api_server():
        runners = {name: bare_runner(client) if name == "bare" else prefect_runner(cluster.scheduler_address,
                                                                                     VARIANTS[name])
                   for name in names}
        for name in names:  # warm-up: imports, Prefect clients and event connections in every worker
            measure(runners[name], args.workers * 2, args.workers * 2, 1, "small", 1)
        for shards in shard_counts:
            for result in results:
                for name in names:
                    times = measure(runners[name], args.units, shards, rounds, result, args.repeats)
                    best = min(times)
                    measured.append(Measurement(shards, result, name, best[0],
                                                statistics.median(t for t, _ in times), best[1]))
                    print(f"  {shards:>4} {result:<5} {name:<15} {best[0]:7.2f} s", file=sys.stderr, flush=True)
    print("\n".join(report(measured, args.units, args.unit_ms, args.workers)))
    print(f"Prefect API start (embedded server, once per process): {api_start_s:.1f} s")
    if args.json:
        print(json.dumps({"rounds": rounds, "api_start_s": api_start_s, "args": vars(args),
                          "measured": [asdict(m) for m in measured]}))


if __name__ == "__main__":
    main()
