"""The `medpipe` command line: demo data, ingest, store info, quarantine lookup (and training/evaluation)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from medpipe.config import IngestConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# On a terminal rich fits tables to its width; piped or captured output (logs, CI) gets a fixed, wide layout.
console = Console(width=None if sys.stdout.isatty() else 160)


def one_line(message: str) -> str:
    """A message as one line, whatever its content: newlines and runs of spaces become single spaces."""
    return " ".join(str(message).split())


def _fail(message: str) -> NoReturn:
    # typer.echo, not the rich console: rich wraps at the terminal width, and an error must stay one line.
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code=2)


def _warn(message: str) -> None:
    typer.echo(f"WARNING: {one_line(message)}", err=True)


def guarded(action: Callable[[], Any]) -> Any:
    """Run `action`, turning known user errors into one clear line and exit code 2 (no traceback wall)."""
    from medpipe.deid import MissingKeyError
    from medpipe.manifest import ManifestError
    from medpipe.store import StoreError

    try:
        return action()
    except (MissingKeyError, ManifestError, StoreError, FileNotFoundError, NotADirectoryError, ValueError,
            KeyError) as exc:
        if isinstance(exc, ValidationError):
            _fail("invalid configuration: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                        for e in exc.errors()))
        _fail(str(exc))


def _ints(text: Optional[str]) -> Optional[list[int]]:
    return None if text is None else [int(v) for v in text.replace("x", ",").split(",") if v.strip()]


def build_ingest_config(config: Optional[Path], **flags: Any) -> IngestConfig:
    """The YAML config (if any) with CLI flags applied on top."""
    return guarded(lambda: load_config(config, IngestConfig, **flags))


@app.command("demo-data")
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
) -> None:
    """Write the built-in demo dataset (DICOM, PNG, CT series, NIfTI masks, labels manifests)."""
    from medpipe.demo import DemoSpec, generate_demo_dataset

    spec = DemoSpec(patients=patients, studies_per_patient=studies, xray_per_study=xray, png_per_study=png,
                    ct_series_per_study=ct, image_size=image_size, ct_size=ct_size, ct_slices=ct_slices, seed=seed)
    summary = generate_demo_dataset(out, spec)
    console.print(f"demo dataset: {summary.files} files, {summary.bytes / 1e6:.1f} MB, {summary.patients} patients "
                  f"-> {summary.root}\nlabels manifest: {summary.manifest}")


@app.command()
def ingest(
    source: str = typer.Argument(..., help="folder or URL (s3://bucket/prefix) of images"),
    store: str = typer.Argument(..., help="Zarr store path or URL (s3://bucket/name.zarr)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file"),
    manifest: Optional[str] = typer.Option(None, help="labels CSV (default: SOURCE/labels.csv when present)"),
    classes: Optional[str] = typer.Option(None, help="declared class names, comma separated"),
    kind: Optional[str] = typer.Option(None, help="training arrays: 2d or 3d"),
    shape: Optional[str] = typer.Option(None, help="sample shape, e.g. 64,64 or 32,64,64"),
    channels: Optional[int] = typer.Option(None, help="1 or 3 channels"),
    workers: Optional[int] = typer.Option(None, help="LocalCluster workers"),
    scheduler: Optional[str] = typer.Option(None, help="existing Dask scheduler, e.g. tcp://host:8786"),
    files_per_shard: Optional[int] = typer.Option(None, help="files per parallel work unit"),
    codec: Optional[str] = typer.Option(None, help="zstd, lz4 or none"),
    key_secret: Optional[str] = typer.Option(None, help="name of a Prefect Secret block holding the key "
                                             "(default: $MEDPIPE_DEID_KEY)"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """De-identify SOURCE and ingest it into STORE through the Prefect flow on Dask."""
    from medpipe.deid import resolve_key
    from medpipe.ingest.pipeline import check_ingest_inputs

    cfg = build_ingest_config(
        config, **{"manifest": manifest, "classes": classes.split(",") if classes else None,
                   "preprocess.kind": kind, "preprocess.shape": _ints(shape), "preprocess.channels": channels,
                   "workers": workers, "scheduler": scheduler, "files_per_shard": files_per_shard, "store.codec": codec})
    if not key_secret:  # refuse before starting any server or cluster
        key = guarded(resolve_key)
        guarded(lambda: check_ingest_inputs(source, store, cfg, key))
    from flows.ingest import run_ingest

    summary = guarded(lambda: run_ingest(source, store, cfg, key_secret=key_secret, show_progress=progress))
    if summary.get("noop"):
        console.print("store is up to date with the source: nothing to do")
    console.print(f"store: {store}\n{summary['accounting']}")
    for warning in summary.get("warnings", []):
        _warn(warning)


@app.command()
def info(store: str = typer.Argument(..., help="Zarr store path or URL")) -> None:
    """Show a store's counts, splits, classes, fingerprint and content hash."""
    from medpipe.store import store_attrs

    attrs = guarded(lambda: store_attrs(store))
    if not attrs:
        _fail(f"{store} is not a medpipe store")
    console.print(f"[bold]{store}[/]  schema {attrs.get('schema_version')}  code {attrs.get('code_version')}  "
                  f"{'complete' if attrs.get('complete') else '[red]INCOMPLETE (run ingest again)[/]'}")
    if not attrs.get("complete"):
        raise typer.Exit(code=1)
    console.print(attrs["accounting"])
    table = Table("item", "value")
    for k, v in attrs["counts"].items():
        table.add_row(k, str(v))
    table.add_row("kind / sample shape", f"{attrs['kind']} {attrs['sample_shape']}")
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


@app.command()
def quarantine(
    store: str = typer.Argument(..., help="Zarr store path or URL"),
    source: str = typer.Argument(..., help="the SOURCE it was ingested from"),
) -> None:
    """List the quarantined files of STORE by their real path (re-hashes SOURCE with the key; prints locally only)."""
    from medpipe.deid import Pseudonymizer, resolve_key
    from medpipe.ingest.discover import discover_files
    from medpipe.store import read_json

    key = guarded(resolve_key)
    records = read_json(store, "reports/quarantine.json") or []
    pseudonyms = Pseudonymizer(key)
    by_hash = {pseudonyms.path(p): p for p in guarded(lambda: discover_files(source)).paths}
    table = Table("file", "reason", "detail")
    for rec in records:
        table.add_row(by_hash.get(rec["source_hash"], f"(hash {rec['source_hash']}: not in SOURCE now)"),
                      rec["reason"], rec.get("detail", ""))
    console.print(table)


@app.command()
def train(
    store: str = typer.Argument(..., help="Zarr store made by `medpipe ingest`"),
    task: str = typer.Option("classify", "--task", help="classify or segment"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/<store name>-<task>)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with a `train:` section (or the fields)"),
    model: Optional[str] = typer.Option(None, help="small-cnn, resnet18, resnet34, densenet121, unet, small-unet"),
    epochs: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model"),
    resume: bool = typer.Option(False, help="continue a killed run from its last checkpoint"),
    overwrite: bool = typer.Option(False, help="discard checkpoints already in the run folder"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Train a classifier or a segmentation model on STORE (CUDA when present, else CPU)."""
    from medpipe.training.config import TrainConfig

    cfg = guarded(lambda: load_config(config, TrainConfig, section="train", **{
        "task": task, "model": model, "epochs": epochs, "batch_size": batch_size, "lr": lr, "device": device,
        "compile": compile}))
    run_dir = out or Path("runs") / f"{Path(store.rstrip('/')).stem}-{task}"
    from medpipe.training.engine import check_training_inputs

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


@app.command()
def evaluate(
    store: str = typer.Argument(..., help="the store the model was trained on"),
    model: Path = typer.Argument(..., help="training run folder (uses best.pt) or a checkpoint file"),
    out: Optional[Path] = typer.Option(None, help="report folder (default MODEL/report)"),
    split: str = typer.Option("test", help="train, val or test"),
    n_boot: int = typer.Option(1000, help="bootstrap resamples for the 95% CIs"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
) -> None:
    """Evaluate a trained model: metrics with 95% CIs, ROC/confusion/Grad-CAM figures, an HTML report."""
    from flows.evaluate import run_evaluate

    report_dir = out or (model if model.is_dir() else model.parent) / "report"
    from medpipe.evaluation.evaluate import load_checked_model

    guarded(lambda: load_checked_model(store, model))
    result = guarded(lambda: run_evaluate(store, str(model), str(report_dir), split=split, n_boot=n_boot,
                                          device=device))
    console.print(result["markdown"])
    console.print(f"report: {result['report']}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), help="where demo data, stores and reports go"),
    patients: int = typer.Option(12, help="demo patients"),
) -> None:
    """Generate the demo dataset and run the pipeline flows on it (uses the documented demo key)."""
    from medpipe.demo_run import run_demo

    run_demo(out, patients=patients, console=console)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":
    main()
