"""The `medpipe` command line: demo data, ingest, store info, quarantine lookup (and training/evaluation)."""

# Errors: a `medpipe.errors.UserError` (or a bad config) prints one line, `error: …`, and exits 2. Anything else is a
# medpipe bug or an infrastructure failure: one line naming the exception type and the file (on the user's own disk,
# mode 0600) that holds the full traceback, exit 1. Tracebacks are never printed: they can hold paths.

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, TypeVar

import click
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from medpipe.config import IngestConfig, load_config
from medpipe.signals.demo import ECG_DEMO_PATIENTS
from medpipe.errors import InfrastructureError, StepFailed, UserError, write_traceback
from medpipe.preflight import (
    check_config_file,
    check_ingest_paths,
    check_scheduler_reachable,
    check_source_folder,
    check_storage_reachable,
    check_store_path,
    scheduler_address,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# On a terminal rich fits tables to its width; piped or captured output (logs, CI) gets a fixed, wide layout.
console = Console(width=None if sys.stdout.isatty() else 160)

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
# What a preflight step may raise besides UserError and still be the user's problem (a path that is not there).
PATH_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError)
# Exits and aborts of typer and click pass through the guard (typer's own classes are not click's).
_CLICK_CONTROL = (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.exceptions.ClickException)
F = TypeVar("F", bound=Callable[..., Any])


def one_line(message: str) -> str:
    """A message as one line, whatever its content: newlines and runs of spaces become single spaces."""
    return " ".join(str(message).split())


def _fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    # typer.echo, not the rich console: rich wraps at the terminal width, and an error must stay one line.
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code=code)


def _warn(message: str) -> None:
    typer.echo(f"WARNING: {one_line(message)}", err=True)


def save_traceback(exc: BaseException) -> Path:
    """Write the full traceback of `exc` (with its causes) to a new file readable by the user only (0600):
    under $MEDPIPE_LOG_DIR, else ~/.medpipe/errors, else (not writable) the system temporary folder."""
    try:
        return write_traceback(exc)
    except OSError:
        return write_traceback(exc, tempfile.gettempdir())


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Prefect's wrappers (FailedRun, CrashedRun, …) and one-member groups."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        elif type(exc).__module__.split(".")[0] == "prefect" and exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return exc


def _config_message(exc: ValidationError) -> str:
    return "invalid configuration: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def report_error(exc: Exception, user_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """Print one line for `exc` and exit: 2 for what the user can fix, 1 (with a saved traceback) for the rest."""
    original = unwrap(exc)
    if isinstance(original, ValidationError):
        _fail(_config_message(original))
    if isinstance(original, UserError) or (user_errors and isinstance(original, user_errors)):
        _fail(str(original))
    if isinstance(original, StepFailed):  # a step's bug: its message names the type and the saved traceback
        _fail(f"internal error: {original}", code=EXIT_INTERNAL_ERROR)
    try:
        where = f"the full traceback is in {save_traceback(exc)}"
    except OSError as save_error:  # pragma: no cover - neither the log folder nor the temp folder is writable
        where = f"the traceback could not be saved ({type(save_error).__name__})"
    if isinstance(original, InfrastructureError):
        _fail(f"{original}; {where}", code=EXIT_INTERNAL_ERROR)
    _fail(f"internal error ({type(original).__name__}); {where}", code=EXIT_INTERNAL_ERROR)


def guarded(action: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = ()) -> Any:
    """Run `action`; any exception becomes one line on stderr and an exit (see `report_error`).

    `user_errors`: further exception types that count as the user's (e.g. PATH_ERRORS around a preflight step)."""
    try:
        return action()
    except _CLICK_CONTROL:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is reported, by kind
        report_error(exc, user_errors)


def guarded_command(command: F) -> F:
    """Run a whole CLI command under `guarded`: nothing it raises ever prints a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return guarded(lambda: command(*args, **kwargs))

    return wrapper  # type: ignore[return-value]


def _ints(text: Optional[str]) -> Optional[list[int]]:
    return None if text is None else [int(v) for v in text.replace("x", ",").split(",") if v.strip()]


def build_ingest_config(config: Optional[Path], **flags: Any) -> IngestConfig:
    """The YAML config (if any) with CLI flags applied on top."""
    guarded(lambda: check_config_file(config))
    return guarded(lambda: load_config(config, IngestConfig, **flags))


@app.command("demo-data")
@guarded_command
def demo_data(
    out: Path = typer.Argument(..., help="folder to write the demo dataset into"),
    seed: int = typer.Option(0, help="random seed (same seed, same bytes)"),
    patients: int = typer.Option(12, help="number of patients"),
    studies: int = typer.Option(2, help="studies per patient"),
    xray: int = typer.Option(6, help="2D DICOM X-rays per study"),
    png: int = typer.Option(6, help="2D PNG images per study"),
    ct: int = typer.Option(1, help="CT series per study"),
    image_size: int = typer.Option(128, help="2D image size (pixels)"),
    ct_size: int = typer.Option(64, help="CT slice size (pixels)"),
    ct_slices: int = typer.Option(32, help="slices per CT series"),
    ecg_patients: int = typer.Option(ECG_DEMO_PATIENTS, help="patients of the demo ECG records under OUT/signals "
                                     "(WFDB and EDF, rhythm labels; enough for a test split of several patients)"),
    ecg_records: int = typer.Option(4, help="ECG records per patient; 0 = no ECG records"),
    ecg_seconds: float = typer.Option(30.0, help="length of each ECG record, seconds"),
) -> None:
    """Write the built-in demo dataset (DICOM, PNG, CT series, NIfTI masks, labels manifests) and demo ECG records
    (OUT/signals: `medpipe ingest-signals OUT/signals STORE`)."""
    from medpipe.demo import DemoSpec, generate_demo_dataset
    from medpipe.signals.demo import SignalDemoSpec, generate_demo_signals

    spec = DemoSpec(patients=patients, studies_per_patient=studies, xray_per_study=xray, png_per_study=png,
                    ct_series_per_study=ct, image_size=image_size, ct_size=ct_size, ct_slices=ct_slices, seed=seed)
    guarded(spec.validate, user_errors=(ValueError,))  # out-of-range options
    signal_spec = None
    if ecg_records:
        signal_spec = guarded(lambda: SignalDemoSpec(patients=ecg_patients, records_per_patient=ecg_records,
                                                     seconds=ecg_seconds, seed=seed), user_errors=(ValueError,))
    summary = generate_demo_dataset(out, spec)
    console.print(f"demo dataset: {summary.files} files, {summary.bytes / 1e6:.1f} MB, {summary.patients} patients "
                  f"-> {summary.root}\nlabels manifest: {summary.manifest}")
    if signal_spec is not None:
        signals = generate_demo_signals(out / "signals", signal_spec)
        console.print(f"demo ECG records: {signals.records} records of {signals.patients} patients, "
                      f"{signals.bytes / 1e6:.1f} MB -> {signals.root}\nrhythm labels: {signals.manifest}")


# Options shared by the ingest commands (one definition each)
WORKERS_OPTION = typer.Option(None, help="LocalCluster workers")
SCHEDULER_OPTION = typer.Option(None, help="existing Dask scheduler, e.g. tcp://host:8786")
KEY_SECRET_OPTION = typer.Option(None, help="name of a Prefect Secret block holding the key (default: "
                                 "$MEDPIPE_DEID_KEY)")
CLASSES_OPTION = typer.Option(None, help="declared class names, comma separated")


def preflight_ingest(source: str, store: str, scheduler: Optional[str]) -> None:
    """Everything about SOURCE, STORE and the scheduler that can be checked without the key or any server."""
    from medpipe.ingest.lock import check_unlocked

    check_ingest_paths(source, store)
    check_storage_reachable(source)
    check_storage_reachable(store)
    check_unlocked(store)  # one writer per store: refuse now, in one line, not after Prefect and Dask start
    address = scheduler_address(scheduler)
    if address:
        check_scheduler_reachable(address)


@app.command()
@guarded_command
def ingest(
    source: str = typer.Argument(..., help="folder or URL (s3://bucket/prefix) of images"),
    store: str = typer.Argument(..., help="Zarr store path or URL (s3://bucket/name.zarr)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file"),
    manifest: Optional[str] = typer.Option(None, help="labels CSV (default: SOURCE/labels.csv when present)"),
    classes: Optional[str] = CLASSES_OPTION,
    kind: Optional[str] = typer.Option(None, help="training arrays: 2d or 3d"),
    shape: Optional[str] = typer.Option(None, help="sample shape, e.g. 64,64 or 32,64,64"),
    channels: Optional[int] = typer.Option(None, help="1 or 3 channels"),
    workers: Optional[int] = WORKERS_OPTION,
    scheduler: Optional[str] = SCHEDULER_OPTION,
    files_per_shard: Optional[int] = typer.Option(None, help="files per parallel work unit"),
    codec: Optional[str] = typer.Option(None, help="training arrays' codec: zstd, lz4 or none"),
    training_dtype: Optional[str] = typer.Option(None, help="training arrays: float32 (default), float16 (half "
                                                 "the bytes) or uint8 (a quarter; 2D stores without CT/MR, steps "
                                                 "of 1/255); docs/benchmarks.md gives their cost on the demo"),
    archive_codec: Optional[str] = typer.Option(None, help="archive codec: auto (JPEG-LS for integer images), "
                                                "jpegls, zstd, lz4 or none (all lossless)"),
    volume_codec: Optional[str] = typer.Option(None, help="3D volumes' CT (HU) images: blosc (default) or jpegls "
                                               "(lossless; smaller on noisy native-resolution CT; slower to read)"),
    key_secret: Optional[str] = KEY_SECRET_OPTION,
    progress: bool = typer.Option(True, help="show progress bars"),
    retry_quarantined: bool = typer.Option(False, "--retry-quarantined",
                                           help="re-examine quarantined files even when the store is up to date"),
) -> None:
    """De-identify SOURCE and ingest it into STORE through the Prefect flow on Dask."""
    from medpipe.deid import resolve_key
    from medpipe.ingest.pipeline import check_ingest_inputs

    cfg = build_ingest_config(
        config, **{"manifest": manifest, "classes": classes.split(",") if classes else None,
                   "preprocess.kind": kind, "preprocess.shape": _ints(shape), "preprocess.channels": channels,
                   "workers": workers, "scheduler": scheduler, "files_per_shard": files_per_shard, "store.codec": codec,
                   "store.training_dtype": training_dtype, "store.archive_codec": archive_codec,
                   "store.volume_codec": volume_codec})
    # Refuse before starting any server or cluster (and so before any retry).
    guarded(lambda: preflight_ingest(source, store, cfg.scheduler), user_errors=PATH_ERRORS)
    if not key_secret:  # a key in a Prefect Secret block is read by the flow
        key = guarded(resolve_key)
        guarded(lambda: check_ingest_inputs(source, store, cfg, key), user_errors=PATH_ERRORS)
    from flows.ingest import run_ingest

    summary = guarded(lambda: run_ingest(source, store, cfg, key_secret=key_secret, show_progress=progress,
                                         retry_quarantined=retry_quarantined))
    if summary.get("noop"):
        console.print("store is up to date with the source: nothing to do")
    console.print(f"store: {store}\n{summary['accounting']}")
    for warning in summary.get("warnings", []):
        _warn(warning)


@app.command("ingest-signals")
@guarded_command
def ingest_signals(
    source: str = typer.Argument(..., help="folder or URL (s3://bucket/prefix) of signal records: WFDB (.hea + "
                                 ".dat), EDF/BDF, DICOM ECG waveforms, CSV or Parquet tables"),
    store: str = typer.Argument(..., help="Zarr store path or URL for the windows"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file (docs/signals.md)"),
    manifest: Optional[str] = typer.Option(None, help="labels CSV: path,label[,patient_id] (default: "
                                           "SOURCE/labels.csv when present)"),
    classes: Optional[str] = CLASSES_OPTION,
    rate: Optional[float] = typer.Option(None, help="common sampling rate, Hz (default 100)"),
    window: Optional[float] = typer.Option(None, help="window length, seconds (default 5)"),
    overlap: Optional[float] = typer.Option(None, help="overlap of consecutive windows, seconds (default 0)"),
    last_partial: Optional[str] = typer.Option(None, help="the last, partial window of a record: drop or pad"),
    leads: Optional[str] = typer.Option(None, help="leads every record must have, comma separated (default: "
                                        "the lead set most records share)"),
    table_rate: Optional[float] = typer.Option(None, help="sampling rate of CSV/Parquet tables without a time "
                                               "column, Hz"),
    manifest_only: Optional[bool] = typer.Option(None, "--manifest-only/--all-records",
                                                 help="ingest only the records the manifest lists"),
    workers: Optional[int] = WORKERS_OPTION,
    scheduler: Optional[str] = SCHEDULER_OPTION,
    key_secret: Optional[str] = KEY_SECRET_OPTION,
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """De-identify the signal records of SOURCE, resample them and cut them into windows in STORE."""
    from medpipe.deid import resolve_key
    from medpipe.signals.config import SignalIngestConfig
    from medpipe.signals.ingest import check_signal_inputs

    guarded(lambda: check_config_file(config))
    cfg = guarded(lambda: load_config(config, SignalIngestConfig, section="signals", **{
        "manifest": manifest, "classes": classes.split(",") if classes else None, "rate_hz": rate,
        "window_s": window, "overlap_s": overlap, "last_partial": last_partial,
        "leads": leads.split(",") if leads else None, "table_rate_hz": table_rate, "manifest_only": manifest_only,
        "workers": workers,
        "scheduler": scheduler}))
    guarded(lambda: preflight_ingest(source, store, cfg.scheduler), user_errors=PATH_ERRORS)
    if not key_secret:
        key = guarded(resolve_key)
        guarded(lambda: check_signal_inputs(source, store, cfg, key), user_errors=PATH_ERRORS)
    from flows.timeseries import run_ingest_signals

    summary = guarded(lambda: run_ingest_signals(source, store, cfg, key_secret=key_secret,
                                                 show_progress=progress))
    if summary.get("noop"):
        console.print("store is up to date with the source: nothing to do")
    counts = summary["counts"]
    console.print(f"store: {store}\ndiscovered {counts['discovered']} records = ingested {counts['ingested']} + "
                  f"quarantined {counts['quarantined']}; {counts['windows']} windows of {counts['patients']} patients")
    for reason, n in sorted(summary.get("quarantine_reasons", {}).items()):
        console.print(f"  quarantined: {reason} {n}")
    for warning in summary.get("warnings", []):
        _warn(warning)


def preflight_store(store: str) -> None:
    """An existing STORE to read: not a regular file, and its storage reachable."""
    check_store_path(store)
    check_storage_reachable(store)


@app.command()
@guarded_command
def info(store: str = typer.Argument(..., help="Zarr store path or URL")) -> None:
    """Show a store's counts, splits, classes, fingerprint and content hash."""
    from medpipe.store import store_attrs

    guarded(lambda: preflight_store(store), user_errors=PATH_ERRORS)
    attrs = guarded(lambda: store_attrs(store))
    if not attrs:
        _fail(f"{store} is not a medpipe store")
    console.print(f"[bold]{store}[/]  schema {attrs.get('schema_version')}  code {attrs.get('code_version')}  "
                  f"{'complete' if attrs.get('complete') else '[red]INCOMPLETE (run ingest again)[/]'}")
    if not attrs.get("complete"):
        raise typer.Exit(code=1)
    if attrs.get("kind") == "signals":
        _signal_info(attrs)
        return
    console.print(attrs["accounting"])
    table = Table("item", "value")
    for k, v in attrs["counts"].items():
        table.add_row(k, str(v))
    table.add_row("kind / sample shape", f"{attrs['kind']} {attrs['sample_shape']}")
    stored = (attrs.get("config") or {}).get("store") or {}
    dtype = str(stored.get("training_dtype", "float32"))
    if attrs.get("layout") == "volumes":
        floor = attrs.get("ct_raw_floor_hu")
        below = f"; below {floor:g} stored as {floor:g}" if floor is not None else ""
        table.add_row("training volumes", f"CT (HU{below}) {stored.get('volume_codec', 'blosc')}, other images {dtype}")
    else:
        table.add_row("training images", "uint8, steps of 1/255 (read as float32)" if dtype == "uint8" else dtype)
    plan = attrs.get("plan")
    if attrs.get("layout") == "volumes" and plan:
        table.add_row("layout", "volumes: whole cases, RAS, resampled (training/volumes/<i>)")
        table.add_row("plan: spacing / patch / batch",
                      f"{plan['target_spacing']} mm / {plan['patch_size']} / {plan['batch_size']}")
        table.add_row("plan: stages / pooling per axis / budget",
                      f"{plan['n_stages']} / {plan['pool_per_axis']} / {plan['memory_budget_bytes'] >> 20} MiB "
                      f"({plan['budget_source']})")
    table.add_row("classes", ", ".join(attrs["classes"]) or "(unlabelled)")
    patients = attrs.get("split_patients", {})
    table.add_row("splits (samples / patients)",
                  ", ".join(f"{k} {v}/{patients.get(k, '?')}" for k, v in attrs["splits"].items()))
    assembly = attrs.get("assembly", {})
    if assembly:
        table.add_row("volumes / 2D images", f"{assembly['volumes']} / {assembly['images_2d']}")
        table.add_row("series split into acquisitions", str(assembly["series_split"]))
        for name, n in assembly["acquisitions"].items():
            table.add_row(f"acquisitions: {name}", str(n))
        for note, n in assembly["notes"].items():
            table.add_row(f"noted: {note}", str(n))
        table.add_row("SOPInstanceUID collisions", str(assembly["uid_collisions"]))
        table.add_row("patient identity from", ", ".join(f"{k} {v}" for k, v in assembly["patient_sources"].items()))
    if attrs.get("masks_checked"):
        table.add_row("masks that lost > 5 % foreground", f"{attrs['masks_flagged']} of {attrs['masks_checked']} "
                      "(reports/mask_check.json)")
    for reason, n in sorted(attrs.get("quarantine_reasons", {}).items()):
        table.add_row(f"quarantined: {reason}", str(n))
    table.add_row("content hash", attrs["content_hash"])
    console.print(table)
    for warning in attrs.get("warnings", []):
        _warn(warning)
    fp = Table("modality", "images", "median spacing (z,y,x mm)", "median shape (c,z,y,x)", "p0.5", "p99.5", title="fingerprint")
    for modality, entry in attrs["fingerprint"]["modalities"].items():
        inten = entry.get("intensity") or {}
        fp.add_row(modality, str(entry["images"]), str(entry["spacing_median"]), str(entry["shape_median"]),
                   str(inten.get("p00_5", "-")), str(inten.get("p99_5", "-")))
    console.print(fp)


def _signal_info(attrs: dict[str, Any]) -> None:
    """`medpipe info` of a signals store."""
    table = Table("item", "value")
    for k, v in attrs["counts"].items():
        table.add_row(k, str(v))
    table.add_row("leads", f"{len(attrs['leads'])}: {', '.join(attrs['leads'])}")
    table.add_row("units", ", ".join(sorted(set(attrs["units"]))))
    table.add_row("rate / window / stride", f"{attrs['rate_hz']:g} Hz / {attrs['window']} / {attrs['stride']} samples")
    table.add_row("classes", ", ".join(attrs["classes"]) or "(unlabelled)")
    table.add_row("splits (windows)", ", ".join(f"{k} {v}" for k, v in attrs.get("split_counts", {}).items()))
    table.add_row("content hash", attrs["content_hash"])
    console.print(table)


@app.command()
@guarded_command
def quarantine(
    store: str = typer.Argument(..., help="Zarr store path or URL"),
    source: str = typer.Argument(..., help="the SOURCE it was ingested from"),
) -> None:
    """List the quarantined files of STORE by their real path (re-hashes SOURCE with the key; prints locally only)."""
    from medpipe.deid import Pseudonymizer, resolve_key
    from medpipe.ingest.discover import discover_files
    from medpipe.store import read_json, store_attrs

    def preflight() -> None:
        preflight_store(store)
        check_source_folder(source)
        check_storage_reachable(source)

    guarded(preflight, user_errors=PATH_ERRORS)
    key = guarded(resolve_key)
    if not guarded(lambda: store_attrs(store)):
        _fail(f"{store} is not a medpipe store")
    records = read_json(store, "reports/quarantine.json") or []
    pseudonyms = Pseudonymizer(key)
    by_hash = {pseudonyms.path(p): p for p in guarded(lambda: discover_files(source)).paths}
    table = Table("file", "reason", "detail")
    for rec in records:
        table.add_row(by_hash.get(rec["source_hash"], f"(hash {rec['source_hash']}: not in SOURCE now)"),
                      rec["reason"], rec.get("detail", ""))
    console.print(table)


@app.command()
@guarded_command
def train(
    store: str = typer.Argument(..., help="Zarr store made by `medpipe ingest`"),
    task: str = typer.Option("classify", "--task", help="classify or segment (image stores); rhythm or forecast "
                             "(signal stores)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/<store name>-<task>)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with a `train:` section (or the fields)"),
    model: Optional[str] = typer.Option(None, help="small-cnn, resnet18, resnet34, densenet121, unet, small-unet, "
                                        "plan-unet (3D volumes); signals: lstm, gru, resnet1d, or several comma "
                                        "separated (each trained, evaluated and compared)"),
    epochs: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model"),
    resume: bool = typer.Option(False, help="continue a killed run from its last checkpoint"),
    overwrite: bool = typer.Option(False, help="discard checkpoints already in the run folder"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Train a classifier or a segmentation model on STORE (CUDA when present, else CPU); on a signals store
    (`medpipe ingest-signals`) rhythm classifiers or forecasters, one per name in --model (compared when several)."""
    from medpipe.signals.store import is_signal_store
    from medpipe.training.config import TrainConfig

    guarded(lambda: check_config_file(config))
    if is_signal_store(store):
        _train_signals(store, task, out, config, model, epochs, batch_size, lr, device, resume, overwrite, progress)
        return
    cfg = guarded(lambda: load_config(config, TrainConfig, section="train", **{
        "task": task, "model": model, "epochs": epochs, "batch_size": batch_size, "lr": lr, "device": device,
        "compile": compile}))
    run_dir = out or Path("runs") / f"{Path(store.rstrip('/')).stem}-{task}"
    from medpipe.training.engine import check_training_inputs

    guarded(lambda: preflight_store(store), user_errors=PATH_ERRORS)
    guarded(lambda: check_training_inputs(store, cfg, run_dir, resume=resume, overwrite=overwrite))
    from flows.train import run_train

    summary = guarded(lambda: run_train(store, str(run_dir), cfg, resume=resume, overwrite=overwrite,
                                        progress=progress))
    numbers = ", ".join(f"{k} {v:.3f}" for k, v in summary["test_metrics"].items() if isinstance(v, float))
    console.print(f"model: {summary['best_path']}  ({summary['epochs_completed']} epochs on {summary['device']})\n"
                  f"validated on: {summary['validation']}\ntest: {numbers or summary['testing']}")
    for field in ("validation", "testing"):
        if str(summary[field]).startswith("none"):
            _warn(f"{field}: {summary[field]}")


SIGNAL_TASKS = {"rhythm": "classify", "classify": "classify", "forecast": "forecast"}


def _train_signals(store: str, task: str, out: Optional[Path], config: Optional[Path], model: Optional[str],
                   epochs: Optional[int], batch_size: Optional[int], lr: Optional[float], device: Optional[str],
                   resume: bool, overwrite: bool, progress: bool) -> None:
    """`medpipe train` on a signals store: each model trained, evaluated on test beside its baselines, compared."""
    from medpipe.signals.store import signal_attrs
    from medpipe.training.config import TrainConfig

    if task not in SIGNAL_TASKS:
        _fail(f"a signals store trains --task rhythm or forecast, not {task!r}")
    names = [m.strip() for m in model.split(",") if m.strip()] if model else None
    cfg = guarded(lambda: load_config(config, TrainConfig, section="train", **{
        "task": SIGNAL_TASKS[task], "model": names[0] if names else None, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "device": device}))
    guarded(lambda: preflight_store(store), user_errors=PATH_ERRORS)
    guarded(lambda: signal_attrs(store))
    from medpipe.signals.train import check_signal_training

    for config_of_model in (cfg.model_copy(update={"model": name}) for name in names or [cfg.model]):
        guarded(functools.partial(check_signal_training, store, config_of_model))  # before any flow starts
    run_dir = out or Path("runs") / f"{Path(store.rstrip('/')).stem}-{task}"
    run_dirs = [run_dir / n for n in names] if names and len(names) > 1 else [run_dir]
    for folder in run_dirs:
        if not resume and not overwrite and (folder / "last.pt").exists():
            _fail(f"{folder} already holds checkpoints: pass --resume to continue that run or --overwrite to "
                  "discard it")
    from flows.timeseries import run_train_signals

    result = guarded(lambda: run_train_signals(store, str(run_dir), cfg, models=names, resume=resume,
                                               overwrite=overwrite, progress=progress))
    for name, summary in result["runs"].items():
        console.print(f"[bold]{name}[/]: {summary['best_path']}  ({summary['epochs_completed']} epochs on "
                      f"{summary['device']}; validated on: {summary['validation']})")
        evaluation = summary.get("evaluation")
        if evaluation:
            console.print(evaluation["markdown"])
            console.print(f"report: {evaluation['report']}")
    if "comparison" in result:
        console.print(result["comparison"]["markdown"])


@app.command()
@guarded_command
def augment(
    store: str = typer.Argument(..., help="a 2D store made by `medpipe ingest` (labels needed)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/<store name>-augment)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with an `augment:` section"),
    epochs: Optional[int] = typer.Option(None, help="GAN epochs (default 300: ~70 min on 2 CPU cores, minutes on GPU)"),
    width: Optional[int] = typer.Option(None, help="GAN width (default 32)"),
    n_per_class: Optional[int] = typer.Option(None, help="synthetic samples per class (default 256)"),
    seed: Optional[int] = typer.Option(None, help="generation seed: the same seed writes the same samples"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda"),
    resume: bool = typer.Option(False, help="continue a killed GAN run"),
) -> None:
    """Train a class-conditional GAN on STORE's train split, measure its samples and publish them to
    STORE/synthetic/ when they pass the memorisation gate (docs/augmentation.md)."""
    from medpipe.gan.augment import AugmentConfig
    from medpipe.gan.data import gan_store_facts

    guarded(lambda: check_config_file(config))
    cfg = guarded(lambda: load_config(config, AugmentConfig, section="augment", **{
        "gan.epochs": epochs, "gan.width": width, "gan.device": device, "n_per_class": n_per_class, "seed": seed}))
    run_dir = out or Path("runs") / f"{Path(store.rstrip('/')).stem}-augment"
    guarded(lambda: preflight_store(store), user_errors=PATH_ERRORS)
    guarded(lambda: gan_store_facts(store, cfg.gan.min_per_class))
    from flows.augment import run_augment

    summary = guarded(lambda: run_augment(store, str(run_dir), cfg, resume=resume))
    fd = summary["frechet_distance"]
    console.print(f"{summary['n_samples']} synthetic samples -> {store}/synthetic  (Fréchet distance "
                  f"{fd['fake']:.3f}; held-out real {fd['real_test']:.3f})\nmemorisation: "
                  f"{summary['memorisation']['flagged_count']} flagged, gate passed\nreport: {summary['report']}")


@app.command("augment-experiment")
@guarded_command
def augment_experiment(
    store: str = typer.Argument(..., help="a 2D store with a synthetic set (`medpipe augment`)"),
    out: Optional[Path] = typer.Option(None, help="folder (default runs/<store name>-experiment)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with an `experiment:` section"),
    fractions: Optional[str] = typer.Option(None, help="fractions of the train patients, e.g. 0.1,0.25,1"),
    seeds: Optional[str] = typer.Option(None, help="seeds, e.g. 0,1,2"),
    epochs: Optional[int] = typer.Option(None, help="classifier epochs per run"),
    ratio: Optional[float] = typer.Option(None, help="synthetic samples per real train sample"),
) -> None:
    """Train the classifier real-only, + synthetic, + classic augmentation and with both, at several fractions of
    the real train patients and several seeds; report test metrics with CIs, paired differences and a plot."""
    from medpipe.gan.experiment import ExperimentConfig

    def numbers(text: str | None, kind: type) -> list | None:
        return None if text is None else [kind(v) for v in text.split(",") if v.strip()]

    guarded(lambda: check_config_file(config))
    cfg = guarded(lambda: load_config(config, ExperimentConfig, section="experiment", **{
        "fractions": numbers(fractions, float), "seeds": numbers(seeds, int), "train.epochs": epochs,
        "synthetic_ratio": ratio}))
    run_dir = out or Path("runs") / f"{Path(store.rstrip('/')).stem}-experiment"
    guarded(lambda: preflight_store(store), user_errors=PATH_ERRORS)
    from medpipe.gan.synthetic import check_synthetic_current

    guarded(lambda: check_synthetic_current(store))
    from flows.augment import run_experiment

    result = guarded(lambda: run_experiment(store, str(run_dir), cfg))
    for line in result["summary"]:
        console.print(line)
    for caveat in result["caveats"]:
        _warn(caveat)
    console.print(f"table: {run_dir / 'experiment.csv'}  plot: {result['plot']}")


@app.command()
@guarded_command
def evaluate(
    store: str = typer.Argument(..., help="the store the model was trained on"),
    model: Path = typer.Argument(..., help="training run folder (uses best.pt) or a checkpoint file"),
    out: Optional[Path] = typer.Option(None, help="report folder (default MODEL/report)"),
    split: str = typer.Option("test", help="train, val or test"),
    n_boot: int = typer.Option(1000, help="bootstrap resamples for the 95% CIs"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
) -> None:
    """Evaluate a trained model: metrics with 95% CIs, ROC/confusion/Grad-CAM figures, an HTML report (signal
    models: beside the majority class, or persistence and previous-beat forecasts)."""
    from flows.evaluate import run_evaluate
    from medpipe.signals.store import is_signal_store

    report_dir = out or (model if model.is_dir() else model.parent) / "report"
    if is_signal_store(store):
        from flows.timeseries import run_evaluate_signals
        from medpipe.signals.evaluate import load_checked_signal_model

        guarded(lambda: preflight_store(store), user_errors=PATH_ERRORS)
        guarded(lambda: load_checked_signal_model(store, model))
        result = guarded(lambda: run_evaluate_signals(store, str(model), str(report_dir), split=split,
                                                      n_boot=n_boot, device=device))
        console.print(result["markdown"])
        console.print(f"report: {result['report']}")
        return
    from medpipe.evaluation.evaluate import load_checked_model

    guarded(lambda: preflight_store(store), user_errors=PATH_ERRORS)
    guarded(lambda: load_checked_model(store, model))
    result = guarded(lambda: run_evaluate(store, str(model), str(report_dir), split=split, n_boot=n_boot,
                                          device=device))
    console.print(result["markdown"])
    console.print(f"report: {result['report']}")


def _is_store(path: str) -> bool:
    """Whether PATH holds a medpipe store (else it is taken as a folder of images to ingest)."""
    from medpipe.store import StoreError, store_attrs

    try:
        return bool(store_attrs(path))
    except StoreError:
        return False


@app.command()
@guarded_command
def predict(
    source: str = typer.Argument(..., help="a folder of new studies, or (3D models) a volumes-layout store"),
    model: Path = typer.Argument(..., help="training run folder (uses best.pt) or a checkpoint file"),
    out: Path = typer.Argument(..., help="output folder: OUT/predictions.json, OUT/store.zarr and OUT/<unit>.nii.gz "
                               "(3D segmentation) or OUT/predictions.csv (classification)"),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="average the 8 mirrorings (slower, a little better)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    split: Optional[str] = typer.Option(None, help="store only: train, val or test (default: every case)"),
    key_secret: Optional[str] = typer.Option(None, help="folder only: Prefect Secret block holding the key "
                                             "(default: $MEDPIPE_DEID_KEY)"),
    store: Optional[str] = typer.Option(None, "--store", help="classification: the model's training store, whose "
                                        "preprocessing (fit, intensity statistics) new studies get"),
    progress: bool = typer.Option(True, help="show ingest progress bars"),
) -> None:
    """Predict new studies with a trained model: a 3D segmentation model writes one NIfTI per case on its source
    grid; a classifier writes OUT/predictions.csv (rerun after new studies arrive: only they are classified)."""
    import warnings

    from medpipe.deid import resolve_key
    from medpipe.ingest.pipeline import check_ingest_inputs
    from medpipe.predict import (
        PredictionMismatchWarning,
        ingest_config_for,
        load_volume_model,
        predict_folder,
        predict_store,
    )

    if not guarded(lambda: _is_volumes_checkpoint(model)):
        _predict_classifier(source, model, out, device, split, key_secret, store, progress)
        return
    vm = guarded(lambda: load_volume_model(model, device))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PredictionMismatchWarning)
        if guarded(lambda: _is_store(source)):
            guarded(lambda: preflight_store(source), user_errors=PATH_ERRORS)
            summary = guarded(lambda: predict_store(source, vm, out, split=split, tta=tta))
        else:
            if split is not None:
                _fail("--split applies to a store; SOURCE is a folder of images")
            guarded(lambda: preflight_ingest(source, str(out / "store.zarr"), None), user_errors=PATH_ERRORS)
            if not key_secret:  # a key in a Prefect Secret block is read by the flow
                key = guarded(resolve_key)
                guarded(lambda: check_ingest_inputs(source, str(out / "store.zarr"), ingest_config_for(vm.meta), key),
                        user_errors=PATH_ERRORS)
            summary = guarded(lambda: predict_folder(source, vm, out, tta=tta, key_secret=key_secret,
                                                     show_progress=progress))
    if summary.get("ingest"):
        console.print(f"ingested into {out / 'store.zarr'}: {summary['ingest']['accounting']}")
    console.print(f"{len(summary['cases'])} prediction(s) -> {out} (predictions.json)")
    for item in summary.get("skipped", []):
        _warn(f"case {item['unit']} not predicted: {item['reason']}")
    for caught_warning in caught:
        if issubclass(caught_warning.category, PredictionMismatchWarning):
            _warn(str(caught_warning.message))


def _is_volumes_checkpoint(model: Path) -> bool:
    """Whether MODEL (run folder or checkpoint) is a volumes-layout 3D segmentation model."""
    from medpipe.evaluation.evaluate import resolve_checkpoint
    from medpipe.predict import is_volumes_checkpoint
    from medpipe.training.checkpoints import load_checkpoint

    return is_volumes_checkpoint(load_checkpoint(resolve_checkpoint(model)[0]))


def _predict_classifier(source: str, model: Path, out: Path, device: str, split: Optional[str],
                        key_secret: Optional[str], store: Optional[str], progress: bool) -> None:
    """`medpipe predict` with a fixed-layout classifier: a folder of new studies -> OUT/predictions.csv."""
    from medpipe.batch_predict import predict_new_studies

    if split is not None or guarded(lambda: _is_store(source)):
        _fail("a classification model predicts a folder of new studies (SOURCE is a store; --split applies to 3D "
              "segmentation models)")
    guarded(lambda: preflight_ingest(source, str(out / "store.zarr"), None), user_errors=PATH_ERRORS)
    if store is not None:
        guarded(lambda: preflight_store(store), user_errors=PATH_ERRORS)
    if not key_secret:  # a key in a Prefect Secret block is read by the flow
        from medpipe.deid import resolve_key

        guarded(resolve_key)
    summary = guarded(lambda: predict_new_studies(source, str(model), str(out), store=store, key_secret=key_secret,
                                                  device=device, show_progress=progress))
    counts = summary["counts"]
    console.print(f"ingested into {out / 'store.zarr'}: {summary['ingest']['accounting']}")
    console.print(f"{counts['new']} new prediction(s), {counts['already_predicted']} already there -> "
                  f"{out / 'predictions.csv'} (classes: {summary['predicted_classes']})")
    for warning in summary["warnings"]:
        _warn(warning)


@app.command()
@guarded_command
def keygen() -> None:
    """Print a new random de-identification key (64 hex characters) on stdout."""
    from medpipe.deid import KEY_ENV_VAR, generate_key

    typer.echo(generate_key())
    typer.echo(f"store it as {KEY_ENV_VAR} (export {KEY_ENV_VAR}=<key>) or in a Prefect Secret block "
               "(Secret(value=<key>).save('medpipe-deid-key'), then --key-secret medpipe-deid-key); keep it secret "
               "and keep it: a store refuses reruns with another key", err=True)


@app.command()
@guarded_command
def demo(
    out: Path = typer.Option(Path("demo-output"), help="where demo data, stores and reports go"),
    patients: int = typer.Option(12, help="demo patients"),
) -> None:
    """Generate the demo dataset and run the pipeline flows on it (uses the documented demo key)."""
    from medpipe.demo_run import run_demo

    run_demo(out, patients=patients, console=console)


@app.command("run-pipeline")
@guarded_command
def run_pipeline_command(
    config: Path = typer.Argument(..., help="YAML holding the pipeline's parameters (examples/pipeline.yaml)"),
) -> None:
    """Run the whole pipeline (ingest, train, evaluate, augment, retrain, promote, predict; unchanged stages are
    skipped) on Prefect's embedded server; prints each stage as it runs and a summary table (docs/pipeline.md)."""
    from medpipe.pipeline.params import load_params
    from medpipe.pipeline.progress import listening
    from medpipe.pipeline.summary import summary_rows

    params = guarded(lambda: load_params(config))
    if "ingest" in params.selected() and params.source:
        source = params.source
        guarded(lambda: preflight_ingest(source, params.store, params.scheduler), user_errors=PATH_ERRORS)
        if not params.key_secret:  # a key in a Prefect Secret block is read by the flow
            from medpipe.deid import resolve_key
            from medpipe.ingest.pipeline import check_ingest_inputs

            key = guarded(resolve_key)
            guarded(lambda: check_ingest_inputs(source, params.store, params.ingest_config(), key),
                    user_errors=PATH_ERRORS)
    from flows.pipeline import run_pipeline

    def show(stage: str, status: str, detail: str) -> None:
        console.print(f"[bold]{stage:<9}[/] {status}" + (f": {one_line(detail)}" if detail else ""))

    with listening(show):
        result = guarded(lambda: run_pipeline(params))
    table = Table("stage", "status", "result", title="medpipe pipeline")
    for row in summary_rows(result):
        table.add_row(*row)
    console.print(table)
    console.print(f"store content hash: {result['store_content_hash']}\nresults: {params.output.rstrip('/')}/"
                  f"pipeline.json" + (f"\npromoted model: {result['promoted']['model']}" if result["promoted"] else ""))


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":
    main()
