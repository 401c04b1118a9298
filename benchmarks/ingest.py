"""Ingest benchmarks: each ratio is measured against a baseline in the same run.

(a) one worker's ingest throughput vs a bare `pydicom.dcmread(...).pixel_array` loop over the same CT files
(b) two Dask workers vs one on the same ingest work
(c) the Prefect flow vs the same work on bare Dask over >= 10,000 small files
(d) store bytes vs source bytes

Usage: python benchmarks/ingest.py [--small-files 10000] [--ct-series 6] [--out bench-output]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import folder_bytes, ratio_line, timed  # noqa: E402
from medpipe.config import IngestConfig, PreprocessConfig  # noqa: E402
from medpipe.deid import resolve_key  # noqa: E402
from medpipe.demo import DemoSpec, generate_demo_dataset  # noqa: E402
from medpipe.ingest import archive, duplicates, pipeline, scan, training  # noqa: E402
from medpipe.ingest.lock import acquire_lock, new_run_id, release_lock  # noqa: E402


def bare_decode(source: Path) -> None:
    """Baseline for (a): read and decode every DICOM file, nothing else."""
    import pydicom

    for path in sorted(source.rglob("*.dcm")):
        pydicom.dcmread(path).pixel_array


def ingest_with(mapper, source: str, store: str, config: IngestConfig) -> dict:
    """The flow's steps with `mapper(fn, *iterables)` for the parallel parts (serial or bare Dask), holding the
    store's lock as the flow does."""
    key = resolve_key()
    run_id = new_run_id()
    acquire_lock(store, run_id)
    try:
        run = pipeline.prepare_ingest(source, store, config, key, run_id)
        shards_in = run.scan_shards()
        k, limit = len(shards_in), config.max_image_bytes
        scans = mapper(scan.scan_shard, [source] * k, shards_in, [key] * k, [limit] * k)
        records = [r for s in scans for r in s]
        checks = pipeline.duplicate_checks(run, records)
        digests: dict[int, str | None] = {}
        for part in mapper(duplicates.pixel_digests, [source] * len(checks), checks, [limit] * len(checks)):
            digests.update(part)
        plan, tags = pipeline.plan_ingest(run, records, digests, key)
        shards = pipeline.unit_shards(run, plan)
        n = len(shards)
        shard_tags = [{u.id: tags[u.id] for u in shard} for shard in shards]
        archived = mapper(archive.archive_shard, [source] * n, [store] * n, shards, [key] * n, [config.store] * n,
                          shard_tags, [run_id] * n, [limit] * n)
        outcome = pipeline.collect_archive(archived)
        layout, fingerprint = pipeline.lay_out_ingest(run, outcome)
        m = len(layout.ranges)
        assembled = mapper(training.assemble_range, [store] * m, [layout.for_range(a, b) for a, b in layout.ranges],
                        [r[0] for r in layout.ranges], [r[1] for r in layout.ranges], [config.preprocess] * m,
                        [run_id] * m)
        return pipeline.finish_ingest(run, plan, outcome, layout, fingerprint, key, assembled)
    finally:
        release_lock(store, run_id)


def serial(fn, *iterables):
    return [fn(*args) for args in zip(*iterables)]


def dask_mapper(client):
    def mapper(fn, *iterables):
        return client.gather(client.map(fn, *iterables, pure=False))
    return mapper


def fresh(path: Path) -> str:
    shutil.rmtree(path, ignore_errors=True)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--ct-series", type=int, default=6, help="512x512 CT series (40 slices each) for (a), (b)")
    parser.add_argument("--small-files", type=int, default=10_000, help="small 2D files for (c)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t: dict[str, float] = {}
    lines = []

    ct = out / "ct-source"
    if not ct.exists():
        generate_demo_dataset(ct, DemoSpec(patients=args.ct_series, studies_per_patient=1, xray_per_study=0,
                                           png_per_study=0, ct_series_per_study=1, ct_size=512, ct_slices=40))
    ct_cfg = IngestConfig(files_per_shard=40, preprocess=PreprocessConfig(kind="3d", shape=(40, 256, 256)))
    ct_bytes = folder_bytes(ct)
    bare_decode(ct)  # warm the page cache so both sides read from memory
    with timed(t, "bare"):
        bare_decode(ct)
    with timed(t, "one"):
        summary = ingest_with(serial, str(ct), fresh(out / "ct-1.zarr"), ct_cfg)
    lines.append(ratio_line("(a) 1-worker ingest vs bare pydicom decode", t["bare"] / t["one"], ">= 0.5",
                            f"{ct_bytes / 1e6 / t['bare']:.0f} MB/s bare, {ct_bytes / 1e6 / t['one']:.0f} MB/s ingest, "
                            f"{summary['counts']['discovered']} files"))

    from distributed import Client, LocalCluster

    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            client.run(lambda: __import__("medpipe.ingest.archive"))  # imports are start-up, not work
            with timed(t, f"dask{workers}"):
                ingest_with(dask_mapper(client), str(ct), fresh(out / f"ct-dask{workers}.zarr"), ct_cfg)
    lines.append(ratio_line("(b) 2 Dask workers vs 1", t["dask1"] / t["dask2"], ">= 1.6",
                            f"{t['dask1']:.1f} s vs {t['dask2']:.1f} s"))

    small = out / "small-source"
    per_study = 25
    patients = max(1, args.small_files // (2 * 2 * per_study))
    if not small.exists():
        generate_demo_dataset(small, DemoSpec(patients=patients, studies_per_patient=2, xray_per_study=per_study,
                                              png_per_study=per_study, ct_series_per_study=0, image_size=128))
    small_cfg = IngestConfig(files_per_shard=256, classes=["none", "lesion"])
    with timed(t, "bare_dask"):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            small_summary = ingest_with(dask_mapper(client), str(small), fresh(out / "small-dask.zarr"), small_cfg)
    from flows.ingest import run_ingest

    with timed(t, "flow"):
        run_ingest(str(small), fresh(out / "small-flow.zarr"), small_cfg)
    lines.append(ratio_line("(c) Prefect flow vs bare Dask (time)", t["flow"] / t["bare_dask"], "<= 1.2",
                            f"{small_summary['counts']['discovered']} files: {t['flow']:.1f} s vs {t['bare_dask']:.1f} s, "
                            "both including cluster start"))

    for name, src, store in (("CT 512x512", ct, out / "ct-1.zarr"), ("small 2D", small, out / "small-flow.zarr")):
        lines.append(ratio_line(f"(d) store bytes vs source bytes, {name}", folder_bytes(store) / folder_bytes(src),
                                "<= 1.0", f"{folder_bytes(store) / 1e6:.1f} MB vs {folder_bytes(src) / 1e6:.1f} MB"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
