"""Scaling and memory: ingest throughput over 1 and 2 Dask workers and an external cluster, and the peak memory of
ingesting a CT corpus several times larger than a worker's memory limit.

(1) Memory: a generated CT corpus (DICOM series, >= `--ratio` x the limit) ingested on a LocalCluster of processes
    with `memory_limit`; each worker's peak RSS is the kernel's high-water mark (VmHWM of /proc/self/status: every
    page ever resident, no sampling gap). Pass: every peak under Dask's pause threshold (80 % of the limit), no
    worker paused, restarted or lost.
(2) Scaling: the same ingest on a LocalCluster of 1 and of 2 workers and on an external cluster (`dask scheduler` +
    2 `dask worker` processes on loopback, tests/e2e/processes.py), each after its workers imported medpipe (start-up
    is not throughput); ratios against the 1-worker run of the same invocation.

The ingest is the flow's own library steps on bare Dask (benchmarks/ingest.py `ingest`): the Prefect flow runs
the same functions as tasks and adds a Prefect import (~40 MB RSS) to each worker; docs/benchmarks.md (c) has its
time overhead.

Usage: python benchmarks/scaling.py [--json] [--out bench-output/scaling] [--memory-limit 1GiB] [--ratio 3]
       [--workers 2] [--scaling-mb 600] [--slice-size 512] [--slices 64] [--skip memory|scaling]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import folder_bytes  # noqa: E402  (sets the benchmark key and Prefect env)
from benchmarks.ingest import dask_mapper, ingest  # noqa: E402
from medpipe.config import IngestConfig, PreprocessConfig  # noqa: E402

PAUSE_FRACTION = 0.8  # distributed.worker.memory.pause (default)


@dataclass(frozen=True)
class Corpus:
    """A generated CT source folder: how many series, files and bytes it holds."""

    path: str
    series: int
    files: int
    bytes: int


def make_ct_corpus(out: Path, target_bytes: int, slice_size: int, slices: int, seed: int = 0) -> Corpus:
    """A CT corpus of at least `target_bytes`: two demo CT series (with masks and labels) rendered once, then cloned
    under new patients until the folder is large enough. A clone is a byte copy of each file with its PatientID and
    UIDs replaced by others of the same length (the demo renders ~6 MB/s; copying runs at disk speed). Reuses `out`
    when it already holds a large enough corpus (its description is kept beside it, not in it)."""
    from medpipe.demo import DemoSpec, generate_demo_dataset

    done = out.with_name(out.name + ".json")  # beside the source: a file inside would be discovered
    if done.exists() and out.exists():
        corpus = Corpus(**json.loads(done.read_text()))
        if corpus.bytes >= target_bytes and (corpus.path, corpus.files) == (str(out), _dicom_count(out)):
            return corpus
    shutil.rmtree(out, ignore_errors=True)
    base = out.with_name(out.name + "-base")
    shutil.rmtree(base, ignore_errors=True)
    generate_demo_dataset(base, DemoSpec(patients=2, studies_per_patient=1, xray_per_study=0, png_per_study=0,
                                         ct_series_per_study=1, ct_size=slice_size, ct_slices=slices, seed=seed))
    rows = [line.split(",") for line in (base / "labels.csv").read_text().splitlines()[1:] if line]
    series = [_template(base, row) for row in rows]
    copies = max(1, math.ceil(target_bytes / (sum(t.bytes for t in series) / len(series))))
    (out / "masks").mkdir(parents=True)
    manifest = ["path,label,mask,patient_id"]
    for copy in range(copies):
        template = series[copy % len(series)]
        folder = out / "ct" / f"CLONE{copy:05d}" / "study01" / "series01"
        folder.mkdir(parents=True)
        for name, data in template.files:
            for old in template.identifiers:  # same length: every element length in the file stays valid
                data = data.replace(old, old[:-7] + str(1_000_000 + copy).encode())
            (folder / name).write_bytes(data)
        mask = f"masks/CLONE{copy:05d}.nii.gz"
        (out / mask).write_bytes(template.mask)
        manifest.append(f"{folder.relative_to(out).as_posix()},{template.label},{mask},")
    (out / "labels.csv").write_text("\n".join(manifest) + "\n")
    shutil.rmtree(base)
    corpus = Corpus(str(out), copies, copies * slices, folder_bytes(out))
    done.write_text(json.dumps(asdict(corpus)))
    return corpus


@dataclass(frozen=True)
class _Series:
    """A rendered demo series to clone: its files' bytes, the identifiers a clone replaces, label and mask."""

    files: list[tuple[str, bytes]]
    identifiers: list[bytes]  # PatientID and every UID of the series (at least 8 characters each)
    label: str
    mask: bytes

    @property
    def bytes(self) -> int:
        return sum(len(data) for _, data in self.files)


def _template(base: Path, row: list[str]) -> _Series:
    import pydicom

    paths = sorted((base / row[0]).glob("*.dcm"))
    identifiers: set[str] = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identifiers |= {str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                        str(ds.FrameOfReferenceUID), str(ds.SOPInstanceUID)}
    if min(map(len, identifiers)) < 8:
        raise ValueError("demo identifiers are too short to clone")
    return _Series([(p.name, p.read_bytes()) for p in paths], sorted(i.encode() for i in identifiers), row[1],
                   (base / row[2]).read_bytes())


def _dicom_count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.dcm"))


def ct_config(slices: int, slice_size: int) -> IngestConfig:
    """The benchmark's ingest settings: 3D volumes layout, one series per work unit."""
    return IngestConfig(files_per_shard=slices, preprocess=PreprocessConfig(kind="3d", shape=(slices, slice_size,
                                                                                             slice_size)))


def _worker_memory() -> dict[str, int]:
    """On a worker: its pid, current RSS and peak RSS (VmHWM, bytes)."""
    import psutil

    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    return {"pid": os.getpid(), "rss": int(psutil.Process().memory_info().rss), "peak": hwm}


def _warm_up() -> None:
    """On a worker: import what the ingest tasks import, so start-up is neither timed nor a memory peak."""
    import medpipe.ingest.archive  # noqa: F401
    import medpipe.ingest.scan  # noqa: F401
    import medpipe.ingest.training  # noqa: F401


@dataclass(frozen=True)
class MemoryRun:
    """One ingest under a worker memory limit: the limit, what was ingested, each worker's memory, what went wrong."""

    memory_limit: int
    source_bytes: int
    files: int
    series: int
    seconds: float
    baseline_rss: list[int]  # per worker, after imports, before the ingest
    peak_rss: list[int]  # per worker, the kernel high-water mark over the whole run
    restarted: bool  # a worker process was replaced (Dask's 95 % terminate, or a crash)
    paused: bool  # a worker or nanny logged a pause (80 %) or a terminate (95 %)
    ingested: int
    discovered: int
    content_hash: str

    @property
    def pause_bytes(self) -> int:
        return int(self.memory_limit * PAUSE_FRACTION)

    @property
    def ok(self) -> bool:
        """Completed, nothing lost, every peak under the pause threshold, no pause, no restart."""
        return (self.ingested == self.discovered and not self.restarted and not self.paused
                and max(self.peak_rss) < self.pause_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pause_bytes": self.pause_bytes, "ok": self.ok,
                "source_over_limit": self.source_bytes / self.memory_limit}


@dataclass(frozen=True)
class LimitedCluster:
    """A Client on a LocalCluster of worker processes with a memory limit, warmed up; `alarms` collects the
    nannies' and workers' pause / terminate messages while it runs."""

    client: Any
    memory_limit: int
    alarms: list[str]

    def idle_rss(self) -> int:
        """The largest worker RSS now (after imports, between tasks): what the work's memory comes on top of."""
        return max(m["rss"] for m in self.client.run(_worker_memory).values())

    def headroom(self) -> int:
        """Bytes a worker has for data before Dask pauses it: the pause threshold minus its idle RSS."""
        return int(self.memory_limit * PAUSE_FRACTION) - self.idle_rss()


ALARMS = ("Pausing worker", "exceeded", "Restarting worker")  # distributed's pause / 95 % terminate messages


@contextmanager
def limited_cluster(memory_limit: int, workers: int = 1) -> Iterator[LimitedCluster]:
    """A LocalCluster of `workers` single-threaded processes with `memory_limit` each (closed after use)."""
    from distributed import Client, LocalCluster

    alarms: list[str] = []
    handler = _MatchHandler(ALARMS, alarms)
    loggers = [logging.getLogger(name) for name in ("distributed.nanny", "distributed.worker.memory")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.run(_warm_up)
            yield LimitedCluster(client, memory_limit, alarms)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def ingest_measured(cluster: LimitedCluster, corpus: Corpus, store: str, config: IngestConfig) -> MemoryRun:
    """Ingest `corpus` on `cluster`; each worker's RSS before and peak RSS after, pauses and restarts."""
    client = cluster.client
    before = client.run(_worker_memory)
    start = time.perf_counter()
    summary = ingest(Path(corpus.path), Path(store), config, dask_mapper(client))
    seconds = time.perf_counter() - start
    after = client.run(_worker_memory)
    logs = [msg for lines in client.get_worker_logs().values() for _, msg in lines]
    paused = any(a in msg for msg in logs + cluster.alarms for a in ALARMS)
    restarted = set(before) != set(after) or any(before[a]["pid"] != after[a]["pid"] for a in before)
    return MemoryRun(memory_limit=cluster.memory_limit, source_bytes=corpus.bytes, files=corpus.files,
                     series=corpus.series, seconds=seconds, baseline_rss=[before[a]["rss"] for a in sorted(before)],
                     peak_rss=[after[a]["peak"] for a in sorted(after)], restarted=restarted, paused=paused,
                     ingested=summary["counts"]["ingested"], discovered=summary["counts"]["discovered"],
                     content_hash=summary["content_hash"])


class _MatchHandler(logging.Handler):
    """Collects the log messages (of this process: the nannies of a LocalCluster) that contain one of `needles`."""

    def __init__(self, needles: tuple[str, ...], found: list[str]) -> None:
        super().__init__()
        self.needles, self.found = needles, found

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(n in message for n in self.needles):
            self.found.append(message)


@dataclass(frozen=True)
class Throughput:
    """One ingest of the scaling corpus on one cluster."""

    cluster: str
    workers: int
    seconds: float
    source_bytes: int
    files: int
    store_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.source_bytes / 1e6 / self.seconds

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds


def _timed_ingest(client: Any, name: str, workers: int, corpus: Corpus, store: Path,
                  config: IngestConfig) -> Throughput:
    client.run(_warm_up)
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    ingest(Path(corpus.path), store, config, dask_mapper(client))
    return Throughput(name, workers, time.perf_counter() - start, corpus.bytes, corpus.files, folder_bytes(store))


@contextmanager
def local_cluster(workers: int) -> Iterator[Any]:
    """A Client on a LocalCluster of `workers` single-threaded worker processes (closed after use)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


@contextmanager
def external_cluster(run_dir: Path, workers: int) -> Iterator[Any]:
    """A Client on `dask scheduler` + `workers` x `dask worker` started as separate processes on loopback (free
    ports), all stopped by process group when done, also on failure."""
    from tests.e2e.processes import DaskCluster, Stack

    with Stack(run_dir) as stack:
        cluster = stack.start(DaskCluster(workers, "4GiB", run_dir))[0]
        with cluster.client() as client:
            yield client


def measure_scaling(corpus: Corpus, out: Path, config: IngestConfig) -> list[Throughput]:
    """Ingest throughput of the same corpus on LocalClusters of 1 and 2 workers and on an external 2-worker cluster."""
    runs: list[Throughput] = []
    setups: list[tuple[str, int, Callable[[], AbstractContextManager[Any]]]] = [
        ("LocalCluster", 1, lambda: local_cluster(1)),
        ("LocalCluster", 2, lambda: local_cluster(2)),
        ("external: dask scheduler + dask worker processes", 2, lambda: external_cluster(out / "external", 2)),
    ]
    for name, workers, make in setups:
        with make() as client:
            runs.append(_timed_ingest(client, name, workers, corpus, out / f"scaling-{workers}.zarr", config))
    return runs


def scaling_table(runs: list[Throughput]) -> str:
    """Markdown table: throughput per cluster and the ratio to the first (1-worker) run."""
    base = runs[0].seconds
    lines = ["| cluster | workers | time s | MB/s (source) | files/s | vs 1 worker |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.cluster} | {r.workers} | {r.seconds:.1f} | {r.mb_per_s:.1f} | {r.files_per_s:.0f} | "
              f"{base / r.seconds:.2f}x |" for r in runs]
    return "\n".join(lines)


def serial_fraction(one: Throughput, two: Throughput) -> float:
    """Amdahl's serial fraction f from the 1- and 2-worker times: T2 / T1 = f + (1 - f) / 2 (clipped to 0..1)."""
    return min(1.0, max(0.0, 2 * two.seconds / one.seconds - 1))


def amdahl_line(runs: list[Throughput]) -> str:
    """The serial fraction of the LocalCluster runs and the speed-ups it predicts for more workers."""
    f = serial_fraction(runs[0], runs[1])
    predicted = ", ".join(f"{n} workers {1 / (f + (1 - f) / n):.1f}x" for n in (4, 8, 16))
    return f"serial fraction {f:.2f} (from 1 vs 2 workers) predicts: {predicted}"


def memory_lines(run: MemoryRun) -> str:
    """What the memory run measured, in words."""
    mib = 2**20
    peaks = ", ".join(f"{p / mib:.0f}" for p in run.peak_rss)
    bases = ", ".join(f"{b / mib:.0f}" for b in run.baseline_rss)
    return (f"memory: {run.source_bytes / 1e6:.0f} MB of CT ({run.series} series, {run.files} files) = "
            f"{run.source_bytes / run.memory_limit:.1f}x the worker limit {run.memory_limit / mib:.0f} MiB; "
            f"peak RSS per worker {peaks} MiB (pause at {run.pause_bytes / mib:.0f} MiB; after imports {bases} MiB); "
            f"paused {run.paused}, restarted {run.restarted}; {run.ingested}/{run.discovered} files ingested in "
            f"{run.seconds:.1f} s: {'PASS' if run.ok else 'FAIL'}")


def parse_bytes(text: str) -> int:
    """'1GiB', '768MiB', '1.5e9' -> bytes (dask's parser)."""
    from dask.utils import parse_bytes as dask_parse

    return int(dask_parse(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-output/scaling")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--memory-limit", default="1GiB", help="Dask worker memory limit of the memory run")
    parser.add_argument("--ratio", type=float, default=3.0, help="source bytes / memory limit of the memory run")
    parser.add_argument("--workers", type=int, default=2, help="workers of the memory run")
    parser.add_argument("--scaling-mb", type=float, default=600, help="source MB of the scaling runs")
    parser.add_argument("--slice-size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--skip", choices=("memory", "scaling"), action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = ct_config(args.slices, args.slice_size)
    report: dict[str, Any] = {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]}
    if "memory" not in args.skip:
        limit = parse_bytes(args.memory_limit)
        corpus = make_ct_corpus(out / "memory-source", int(limit * args.ratio), args.slice_size, args.slices)
        shutil.rmtree(out / "memory.zarr", ignore_errors=True)
        with limited_cluster(limit, args.workers) as cluster:
            run = ingest_measured(cluster, corpus, str(out / "memory.zarr"), config)
        report["memory"] = run.to_dict()
        shutil.rmtree(out / "memory.zarr", ignore_errors=True)
    if "scaling" not in args.skip:
        corpus = make_ct_corpus(out / "scaling-source", int(args.scaling_mb * 1e6), args.slice_size, args.slices)
        runs = measure_scaling(corpus, out, config)
        report["scaling"] = [{**asdict(r), "mb_per_s": r.mb_per_s, "files_per_s": r.files_per_s,
                              "vs_1_worker": runs[0].seconds / r.seconds} for r in runs]
        report["serial_fraction"] = serial_fraction(runs[0], runs[1])
    report["load_average_at_end"] = os.getloadavg()[0]  # other jobs on the machine: the context of every number
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['cpu_count']} CPU cores; load average {report['load_average_at_start']:.1f} at the start, "
          f"{report['load_average_at_end']:.1f} at the end")
    if "memory" in report:
        print(memory_lines(run))
    if "scaling" in report:
        print(scaling_table(runs))
        print(amdahl_line(runs))
        print(f"store bytes / source bytes: {runs[0].store_bytes / runs[0].source_bytes:.2f}")


if __name__ == "__main__":
    main()
