"""Ingest benchmarks (issue 11): every ratio is measured against a baseline in the same run.

  ingest_per_worker_vs_decode_write  one worker (serial mapper, in-process) ingesting CT series vs a bare loop over
                                     the same files: pydicom decode, stack (1, Z, Y, X), zarr write with the archive's
                                     codec chain and chunks, and each NIfTI mask decoded by nibabel and written with
                                     the archive mask's (page cache warm for both); source MB/s over source MB/s.
                                     Both sides with one codec/torch thread, as a Dask worker of one thread has,
                                     and after one untimed run (imports and first calls are paid once).
                                     Without the masks: `ingest_per_worker_vs_image_decode_write`
  ingest_2_workers_vs_1              the same CT ingest on a Dask LocalCluster of 2 workers vs 1 (processes, 1 thread
                                     each; the cluster started, its workers' imports done and one untimed ingest
                                     run on each worker before the timer: a fresh worker's first ingest task takes
                                     ~0.3 s longer, once); the two sides take turns, at least 3 runs each, best of
                                     each side;
                                     beside it the same ratio of the mapped steps alone (`..._mapped_steps`)
  flow_vs_bare_dask                  the Prefect flow vs the same `run_ingest_steps` on bare Dask over the small 2D
                                     files, both on one warm 2-worker cluster: Prefect API server start, cluster start
                                     and first imports in the workers (paid once by a long-lived process) excluded
  store_vs_source_ct                 store bytes / source bytes of a CT store (uncompressed DICOM) of real CT: the
                                     GE head CT of github.com/neurolabusc/dcm_qa_ct shipped in tests/data, or the
                                     series under --real-ct DIR (e.g. that repository's whole `In` folder); the
                                     generated CT, whose white noise no lossless codec can shrink, is printed beside
                                     it (`store_vs_source_ct_synthetic`), and the real CT with JPEG-LS training
                                     volumes (`store_vs_source_ct_jpegls`)
  store_vs_source_2d                 store bytes / source bytes of a 2D store with uint8 training images (the
                                     smallest dtype, made for 8-bit sources), on 8-bit PNG tiles of scikit-image's
                                     sample images; beside it the same with float16 (`store_vs_source_2d_float16`)
                                     and the demo's synthetic (noisy) 2D files, float16 (`store_vs_source_2d_demo`)

All ingests run `prepare_ingest` + `run_ingest_steps` (the flow runs exactly these steps), holding the store's lock.
Generated sources are cached under --out, so a rerun skips generation. With --json the last stdout line is one JSON
object: the five ratios above plus the absolute rates and times behind them.

Usage: python benchmarks/ingest.py [--ct-series 6] [--ct-size 512] [--ct-slices 40] [--small-files 10000]
                                   [--real-ct DIR] [--repeats 1] [--out bench-output] [--json]
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import math
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (OneLineArgumentParser, best_time, folder_bytes, ratio_line,  # noqa: E402
                               warm_page_cache)
from medpipe.config import IngestConfig, PreprocessConfig, StoreConfig  # noqa: E402
from medpipe.deid import resolve_key  # noqa: E402
from medpipe.demo import DemoSpec, generate_demo_dataset  # noqa: E402
from tests.dicom_corpus import unpack_ge_ct  # noqa: E402
from medpipe.ingest.pipeline import Driver, Mapper, direct_driver, ingest_in_process, serial_mapper  # noqa: E402

if TYPE_CHECKING:
    from distributed import Client

TILE = 128  # edge of the PNG tiles cut from scikit-image's sample images
SAMPLE_IMAGES = ("camera", "astronaut", "coins", "moon", "text", "page", "clock", "coffee", "chelsea", "rocket",
                 "grass", "gravel", "brick", "hubble_deep_field", "immunohistochemistry", "retina", "cell")
CLASSES = ["none", "lesion"]
STARTED = time.perf_counter()
WORKERS = 2  # the cluster of ingest_2_workers_vs_1 and flow_vs_bare_dask
CT_PAIRS = 3  # runs of each side of ingest_2_workers_vs_1 at least (a pair takes ~6 s; the machine's noise is ±10 %)
FIGURES = ("ingest_per_worker_vs_decode_write", "ingest_2_workers_vs_1", "flow_vs_bare_dask", "store_vs_source_ct",
           "store_vs_source_2d")


# ---------------------------------------------------------------------------------------------------------- sources

def cached_source(path: Path, make: Callable[[Path], object]) -> Path:
    """`path`, made by `make(folder)` unless an earlier run made it (written beside it, then renamed: an interrupted
    generation is never taken for a finished one)."""
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        make(partial)
        partial.rename(path)
    return path


def demo_source(path: Path, spec: DemoSpec) -> Path:
    """A cached demo dataset of `spec`."""
    return cached_source(path, lambda folder: generate_demo_dataset(folder, spec))


def small_spec(files: int) -> DemoSpec:
    """Demo spec of about `files` small 2D files (half DICOM X-rays, half PNG; 2 studies per patient)."""
    per_study = max(1, min(25, files // 4))
    patients = max(1, files // (2 * 2 * per_study))
    return DemoSpec(patients=patients, studies_per_patient=2, xray_per_study=per_study, png_per_study=per_study,
                    ct_series_per_study=0, image_size=128)


def grey_uint8(image: Any) -> Any:
    """An 8-bit grey image from a scikit-image sample (grey, RGB, RGBA)."""
    import numpy as np
    from skimage import color

    if image.ndim == 3:
        return np.round(color.rgb2gray(image[..., :3]) * 255).astype(np.uint8)
    return image.astype(np.uint8)


def write_tiles(out: Path, limit: int | None = None) -> int:
    """Cut TILE x TILE tiles of scikit-image's sample images into `out/PATIENT/study01/tileNNN.png` (one patient per
    sample image; at most `limit` tiles, evenly picked) with a labels.csv as the demo writes it; returns the count."""
    from PIL import Image
    from skimage import data

    images = {name: grey_uint8(getattr(data, name)()) for name in SAMPLE_IMAGES}
    tiles = [(name, i, y, x) for name, image in images.items() for i, (y, x) in enumerate(itertools.product(
        range(0, image.shape[0] - TILE + 1, TILE), range(0, image.shape[1] - TILE + 1, TILE)))]
    if limit is not None and limit < len(tiles):
        tiles = [tiles[k * len(tiles) // limit] for k in range(limit)]
    rows = []
    for name, i, y, x in tiles:
        image = images[name]
        tile = image[y:y + TILE, x:x + TILE]
        patient = f"SAMPLE_{name.upper()}"
        rel = f"{patient}/study01/tile{i:03d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile).save(out / rel, format="PNG", compress_level=6)
        rows.append((rel, "lesion" if tile.mean() > image.mean() else "none", "", patient))
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "mask", "patient_id"])
        writer.writerows(rows)
    return len(rows)


# ---------------------------------------------------------------------------------------------------------- ingests

@dataclass
class StepTimes:
    """Wall seconds and calls (tasks of a mapped step) per step name, accumulated by wrapping a Mapper and a Driver."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    driven: set[str] = field(default_factory=set)  # the steps run by the driver (the rest are mapped)

    def _add(self, step: str, start: float, calls: int = 1) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start
        self.calls[step] = self.calls.get(step, 0) + calls

    def mapper(self, inner: Mapper) -> Mapper:
        def timed_mapper(step: str, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
            start = time.perf_counter()
            try:
                return inner(step, fn, calls)
            finally:
                self._add(step, start, len(calls))
        return timed_mapper

    def driver(self, inner: Driver) -> Driver:
        def timed_driver(step: str, fn: Callable[..., Any], *args: Any) -> Any:
            self.driven.add(step)
            start = time.perf_counter()
            try:
                return inner(step, fn, *args)
            finally:
                self._add(step, start)
        return timed_driver


def ingest(source: Path, store: Path, config: IngestConfig, mapper: Mapper = serial_mapper,
           driver: Driver = direct_driver) -> dict[str, Any]:
    """The whole ingest of SOURCE into STORE in this process, holding the store's lock as the flow does."""
    return ingest_in_process(str(source), str(store), config, resolve_key(), mapper, driver)


def dask_mapper(client: Client, workers: list[str] | None = None) -> Mapper:
    """A Mapper on bare Dask: one task per call, results in order; only on `workers` (addresses) when given."""
    def mapper(step: str, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        if not calls:
            return []
        return list(client.gather(client.map(fn, *zip(*calls), pure=False, workers=workers,
                                             allow_other_workers=False)))
    return mapper


@contextmanager
def warm_cluster(workers: int) -> Iterator[Client]:
    """A LocalCluster of `workers` processes (1 thread each, on 127.0.0.1) whose workers have imported the ingest
    code."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        client.run(lambda: __import__("medpipe.ingest.shard"))
        yield client


def note(message: str) -> None:
    """Progress on stderr, with the seconds since the script started (stdout holds the figures only)."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


TRASH = ".old-stores"  # under --out: earlier stores moved here, deleted once the figures are printed


def fresh(path: Path) -> Callable[[], None]:
    """A setup step that moves `path` (an earlier store) into TRASH beside it before a timed ingest into it: deleting
    a store of 10,000 images took minutes on a busy machine, so it is done once at the end (`empty_trash`)."""
    def setup() -> None:
        if path.exists():
            trash = path.parent / TRASH
            trash.mkdir(exist_ok=True)
            path.rename(trash / uuid.uuid4().hex)
    return setup


def empty_trash(out: Path) -> None:
    """Delete the stores `fresh` moved aside."""
    shutil.rmtree(out / TRASH, ignore_errors=True)


def decode_write(series: list[Path], masks: list[Path], out: Path, config: StoreConfig) -> None:
    """Baseline of one worker: per series, pydicom-decode every file, stack (1, Z, Y, X) and write it into a zarr
    array with the archive's codec chain and chunks; then each NIfTI mask file of the source, decoded by nibabel and
    written with the archive mask's codec chain and chunks (the same files the ingest reads, each decoded once and
    written once, nothing else)."""
    import nibabel as nib
    import numpy as np
    import pydicom
    import zarr

    from medpipe.codecs import codec_chain
    from medpipe.store import archive_chunks

    root = zarr.open_group(str(out), mode="w")

    def write(name: str, values: np.ndarray, layer: str) -> None:
        array = root.create_array(name, shape=values.shape, dtype=values.dtype, chunks=archive_chunks(values.shape),
                                  **codec_chain(layer, config, values.dtype))  # type: ignore[arg-type]
        array[...] = values

    for i, folder in enumerate(series):
        write(f"series{i}", np.stack([pydicom.dcmread(f).pixel_array for f in sorted(folder.glob("*.dcm"))])[None],
              "archive")
    for i, path in enumerate(masks):
        write(f"mask{i}", np.asarray(nib.load(path).dataobj).T[None], "archive_mask")


def mask_files(source: Path) -> list[Path]:
    """The NIfTI mask files of a source."""
    return sorted(source.rglob("*.nii.gz"))


def series_folders(source: Path) -> list[Path]:
    """The folders holding DICOM slices (one CT series each)."""
    return sorted({p.parent for p in source.rglob("*.dcm")})


# ---------------------------------------------------------------------------------------------------------- main

@dataclass(frozen=True)
class Sources:
    """The generated (cached) sources and the configs they are ingested with."""

    ct: Path
    small: Path
    warmup: Path
    tiles: Path
    real_ct: Path
    ct_config: IngestConfig
    small_config: IngestConfig


def make_sources(out: Path, args: argparse.Namespace) -> Sources:
    """Generate the sources under `out` (or find them there) and the configs of their ingests."""
    n_ct, size, slices = args.ct_series, args.ct_size, args.ct_slices
    ct = demo_source(out / f"ct-source-{n_ct}x{slices}x{size}", DemoSpec(
        patients=n_ct, studies_per_patient=1, xray_per_study=0, png_per_study=0, ct_series_per_study=1,
        ct_size=size, ct_slices=slices))
    spec = small_spec(args.small_files)
    small = demo_source(out / f"small-source-{spec.patients}x{spec.xray_per_study}", spec)
    warmup = demo_source(out / "warmup-source", DemoSpec(patients=2, studies_per_patient=1, xray_per_study=2,
                                                         png_per_study=2, ct_series_per_study=0, image_size=64))
    tiles = cached_source(out / f"tiles-source-{TILE}-{args.tiles or 'all'}", lambda f: write_tiles(f, args.tiles))
    real_ct = args.real_ct or cached_source(out / "real-ct-dcm_qa_ct-GE", unpack_ge_ct)
    ct_config = IngestConfig(files_per_shard=slices, workers=WORKERS,  # one series per task
                             preprocess=PreprocessConfig(kind="3d", shape=(slices, size // 2, size // 2)))
    small_config = IngestConfig(files_per_shard=256, classes=CLASSES, workers=WORKERS,
                                store=StoreConfig(training_dtype="float16"))
    return Sources(ct, small, warmup, tiles, real_ct, ct_config, small_config)


def measure_one_worker(src: Sources, out: Path, repeats: int, fig: dict[str, float]) -> list[str]:
    """ingest_per_worker_vs_decode_write (and the serial run's per-step times); returns the printed lines."""
    ct_mb = folder_bytes(src.ct) / 1e6
    warm_page_cache(src.ct)
    series, masks = series_folders(src.ct), mask_files(src.ct)
    fig["decode_write_s"] = best_time(repeats, lambda: decode_write(series, masks, out / "decode-write.zarr",
                                                                    src.ct_config.store), warmup=True)
    fig["decode_write_images_s"] = best_time(repeats, lambda: decode_write(series, [], out / "decode-write.zarr",
                                                                           src.ct_config.store))
    steps = StepTimes()
    summary: dict[str, Any] = {}

    def serial_ct() -> None:
        summary.update(ingest(src.ct, out / "ct-1.zarr", src.ct_config, steps.mapper(serial_mapper),
                              steps.driver(direct_driver)))

    fresh(out / "ct-1.zarr")()
    ingest(src.ct, out / "ct-1.zarr", src.ct_config)  # warm-up, untimed: imports and first calls, paid once
    fig["ingest_1_worker_s"] = best_time(repeats, serial_ct, fresh(out / "ct-1.zarr"))
    fig["decode_write_mb_per_s"] = ct_mb / fig["decode_write_s"]
    fig["ingest_1_worker_mb_per_s"] = ct_mb / fig["ingest_1_worker_s"]
    fig["ingest_per_worker_vs_decode_write"] = fig["decode_write_s"] / fig["ingest_1_worker_s"]
    fig["ingest_per_worker_vs_image_decode_write"] = fig["decode_write_images_s"] / fig["ingest_1_worker_s"]
    for step, seconds in steps.seconds.items():
        fig[f"step_{step}_s"] = seconds / repeats
    return [ratio_line("ingest_per_worker_vs_decode_write", fig["ingest_per_worker_vs_decode_write"], ">= 0.5",
                       f"{fig['ingest_1_worker_mb_per_s']:.1f} MB/s ingest vs {fig['decode_write_mb_per_s']:.1f} MB/s"
                       f" decode + write, {summary['counts']['discovered']} files ({len(masks)} masks),"
                       f" {ct_mb:.0f} MB"),
            ratio_line("ingest_per_worker_vs_image_decode_write", fig["ingest_per_worker_vs_image_decode_write"], "-",
                       "the same baseline without the mask files (the figure before 2026-11-29)"),
            "  serial run, seconds per step (tasks), mean of repeats: "
            + ", ".join(f"{k} {v / repeats:.2f} ({steps.calls[k] // repeats})" for k, v in steps.seconds.items())]


def measure_cluster(src: Sources, out: Path, repeats: int, fig: dict[str, float]) -> list[str]:
    """ingest_2_workers_vs_1 and flow_vs_bare_dask on one warm cluster of WORKERS workers (the 1-worker side maps
    onto one of its workers only); returns the printed lines."""
    from flows.ingest import run_ingest

    with warm_cluster(WORKERS) as client:
        note("cluster up")
        addresses = sorted(client.scheduler_info()["workers"])
        for address in addresses:  # each worker's first ingest task pays imports and first calls (~0.3 s), once
            fresh(out / "ct-warmup.zarr")()
            ingest(src.ct, out / "ct-warmup.zarr", src.ct_config, dask_mapper(client, [address]))
        note("every worker warm")
        sides = {"ingest_dask_1_worker_s": addresses[:1], "ingest_dask_2_workers_s": None}
        steps = {name: StepTimes() for name in sides}
        times: dict[str, list[float]] = {name: [] for name in sides}
        pairs = max(repeats, CT_PAIRS)
        for _ in range(pairs):  # the sides take turns, so that both see the machine's same minutes
            for name, only in sides.items():
                store = out / f"ct-dask-{len(only or addresses)}.zarr"
                times[name].append(best_time(1, functools.partial(
                    ingest, src.ct, store, src.ct_config, steps[name].mapper(dask_mapper(client, only)),
                    steps[name].driver(direct_driver)), fresh(store)))
        for name in sides:
            fig[name] = min(times[name])
            driven = sum(v for k, v in steps[name].seconds.items() if k in steps[name].driven) / pairs
            fig[name.replace("_s", "_driver_s")] = driven
            fig[name.replace("_s", "_mapped_s")] = (sum(steps[name].seconds.values()) / pairs) - driven
        note("CT on 1 and 2 workers done")
        flow_cfg = src.small_config.model_copy(update={"scheduler": client.scheduler_info()["address"]})
        warmup = out / "warmup.zarr"
        fresh(warmup)()
        ingest(src.warmup, warmup, src.small_config, dask_mapper(client))
        fresh(warmup)()
        run_ingest(str(src.warmup), str(warmup), flow_cfg)  # Prefect's first task runs in the workers
        warm_page_cache(src.small)
        note("warm-up runs done")
        small_summary: dict[str, Any] = {}
        small: dict[str, list[float]] = {"bare_dask_s": [], "flow_s": []}
        for _ in range(repeats):  # taking turns, as above
            small["bare_dask_s"].append(best_time(1, lambda: small_summary.update(ingest(
                src.small, out / "small-dask.zarr", src.small_config, dask_mapper(client))),
                fresh(out / "small-dask.zarr")))
            note("bare Dask done")
            small["flow_s"].append(best_time(1, lambda: run_ingest(str(src.small), str(out / "small-flow.zarr"),
                                                                   flow_cfg), fresh(out / "small-flow.zarr")))
        fig.update({name: min(values) for name, values in small.items()})
        note("flow done")
    fig["ingest_2_workers_vs_1"] = fig["ingest_dask_1_worker_s"] / fig["ingest_dask_2_workers_s"]
    fig["ingest_2_workers_vs_1_mapped_steps"] = (fig["ingest_dask_1_worker_mapped_s"]
                                                 / fig["ingest_dask_2_workers_mapped_s"])
    files = small_summary["counts"]["discovered"]
    fig["small_files"] = files
    fig["bare_dask_files_per_s"] = files / fig["bare_dask_s"]
    fig["flow_files_per_s"] = files / fig["flow_s"]
    fig["flow_vs_bare_dask"] = fig["flow_s"] / fig["bare_dask_s"]
    return [ratio_line("ingest_2_workers_vs_1", fig["ingest_2_workers_vs_1"], ">= 1.8",
                       f"{fig['ingest_dask_1_worker_s']:.1f} s vs {fig['ingest_dask_2_workers_s']:.1f} s, warm "
                       "LocalCluster, 1 side mapped onto one of its workers"),
            ratio_line("ingest_2_workers_vs_1_mapped_steps", fig["ingest_2_workers_vs_1_mapped_steps"], "-",
                       f"the steps on the workers only (scan, ingest: {fig['ingest_dask_1_worker_mapped_s']:.1f} s vs "
                       f"{fig['ingest_dask_2_workers_mapped_s']:.1f} s, means); the driver's serial steps take "
                       f"{fig['ingest_dask_2_workers_driver_s']:.2f} s of each run (key check, plan, sample table, "
                       "content hash)"),
            ratio_line("flow_vs_bare_dask", fig["flow_vs_bare_dask"], "<= 1.15",
                       f"{files} files: {fig['flow_s']:.1f} s vs {fig['bare_dask_s']:.1f} s on one warm "
                       f"{WORKERS}-worker cluster; Prefect server and cluster start excluded")]


def measure_sizes(src: Sources, out: Path, fig: dict[str, float]) -> list[str]:
    """store_vs_source_ct and store_vs_source_ct_jpegls (the real CT, ingested here with Blosc and JPEG-LS training
    volumes), store_vs_source_ct_synthetic (the serial store of the generated CT), store_vs_source_2d and
    store_vs_source_2d_float16 (PNG tiles, ingested here with uint8 and float16 training images) and
    store_vs_source_2d_demo (the flow's store of the demo's 2D files); returns the printed lines."""
    tiles, tiles_uint8, real_ct = out / "tiles.zarr", out / "tiles-uint8.zarr", out / "real-ct.zarr"
    real_ct_jpegls = out / "real-ct-jpegls.zarr"
    uint8, jpegls = (config.model_copy(update={"store": config.store.model_copy(update=change)})
                     for config, change in ((src.small_config, {"training_dtype": "uint8"}),
                                            (src.ct_config, {"volume_codec": "jpegls"})))
    for source, store, config in ((src.tiles, tiles, src.small_config), (src.tiles, tiles_uint8, uint8),
                                  (src.real_ct, real_ct, src.ct_config), (src.real_ct, real_ct_jpegls, jpegls)):
        fresh(store)()
        ingest(source, store, config)
    shape = "x".join(map(str, src.ct_config.preprocess.shape))
    measured = (("store_vs_source_ct", "<= 0.6", src.real_ct, real_ct,
                 f"real CT in {src.real_ct.name}/, 3D, patches {shape}"),
                ("store_vs_source_ct_jpegls", "-", src.real_ct, real_ct_jpegls,
                 "the same, volume_codec jpegls"),
                ("store_vs_source_ct_synthetic", "-", src.ct, out / "ct-1.zarr", "generated CT (white noise), 3D"),
                ("store_vs_source_2d", "<= 1.0", src.tiles, tiles_uint8,
                 f"{TILE}x{TILE} 8-bit PNG tiles of skimage samples, uint8 training"),
                ("store_vs_source_2d_float16", "-", src.tiles, tiles,
                 f"{TILE}x{TILE} 8-bit PNG tiles of skimage samples, float16 training"),
                ("store_vs_source_2d_demo", "-", src.small, out / "small-flow.zarr",
                 "demo 2D files (synthetic noise), float16 training"))
    lines = []
    for name, goal, source, store, what in measured:
        stored, given = folder_bytes(store), folder_bytes(source)
        fig[name] = stored / given
        lines.append(ratio_line(name, fig[name], goal, f"{what}: {stored / 1e6:.1f} MB vs {given / 1e6:.1f} MB"))
    return lines


def parse_args() -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-output", help="sources (cached) and stores")
    parser.add_argument("--ct-series", type=int, default=6, help="CT series (one patient each)")
    parser.add_argument("--ct-size", type=int, default=512, help="CT slice edge (training shape: half of it)")
    parser.add_argument("--ct-slices", type=int, default=40, help="slices per CT series")
    parser.add_argument("--small-files", type=int, default=10_000, help="small 2D files for flow_vs_bare_dask")
    parser.add_argument("--tiles", type=int, default=None, help="at most this many PNG tiles (default: all, ~350)")
    parser.add_argument("--real-ct", type=Path, default=None,
                        help="folder of real CT series for store_vs_source_ct (default: dcm_qa_ct's GE head CT, "
                             "tests/data/dcm_qa_ct)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side (the best counts)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object of all figures")
    args = parser.parse_args()
    if (args.ct_series < 1 or args.small_files < 4 or args.repeats < 1 or args.ct_size < 16 or args.ct_slices < 4
            or (args.tiles is not None and args.tiles < 4)):
        parser.error("need --ct-series >= 1, --small-files >= 4, --tiles >= 4, --repeats >= 1, --ct-size >= 16, "
                     "--ct-slices >= 4")
    if args.real_ct is not None and not args.real_ct.is_dir():
        parser.error(f"--real-ct is not a folder: {args.real_ct}")
    args.real_ct = args.real_ct and args.real_ct.resolve()
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out is not a folder: {args.out}")
    return args


def one_thread_per_codec() -> None:
    """Blosc, zarr's codec pool and torch on one thread in this process, as in a Dask worker of one thread
    (medpipe.ingest.limits.bound_codec_threads; Dask's nanny sets OMP threads to 1): the per-worker figure's two
    sides then get one core each, as a worker does, not both cores' threads. Before zarr's pool is first used."""
    import numcodecs.blosc
    import torch
    import zarr

    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})
    torch.set_num_threads(1)


def main() -> None:
    args = parse_args()
    one_thread_per_codec()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    src = make_sources(out, args)
    note("sources ready")
    from flows.runtime import warm_api_server

    warm_api_server()  # once per process, before the cluster: its workers inherit $PREFECT_API_URL
    note("Prefect API server up")
    fig: dict[str, float] = {}
    lines = measure_one_worker(src, out, args.repeats, fig)
    note("serial runs done")
    lines += measure_cluster(src, out, args.repeats, fig)
    lines += measure_sizes(src, out, fig)
    print("\n".join(lines), flush=True)
    note("deleting earlier stores")
    empty_trash(out)
    missing = [k for k in FIGURES if not (math.isfinite(fig[k]) and fig[k] > 0)]
    if missing:
        raise SystemExit(f"error: figure(s) not measured: {', '.join(missing)}")
    if args.json:
        print(json.dumps({k: round(float(v), 4) for k, v in fig.items()}, sort_keys=True))


if __name__ == "__main__":
    main()
