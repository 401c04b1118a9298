"""`make demo` / `medpipe demo`: demo data -> ingest flows (2D and 3D image stores, a signals store) -> trained and
evaluated models -> where the results are."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from medpipe.config import IngestConfig, PreprocessConfig
from medpipe.deid import DEMO_KEY, KEY_ENV_VAR
from medpipe.task import Task

DEMO_CLASSES = ["none", "lesion"]  # declared so that "lesion" is the positive class (index 1)


def use_demo_key() -> None:
    """The demo runs with a documented, public key (unless one is set). Real data needs your own secret in
    $MEDPIPE_DEID_KEY."""
    os.environ.setdefault(KEY_ENV_VAR, DEMO_KEY)


def run_demo(out: Path, patients: int = 12, console: Console | None = None) -> dict[str, str]:
    """Generate (once) the demo dataset and ingest it; returns the paths of what was made."""
    from flows.ingest import run_ingest
    from medpipe.demo import DemoSpec, generate_demo_dataset

    console = console or Console()
    out = Path(out).resolve()
    source = out / "data"
    if not (source / "labels.csv").exists():
        summary = generate_demo_dataset(source, DemoSpec(patients=patients))
        console.print(f"demo dataset: {summary.files} files -> {source}")
    use_demo_key()
    made = {"data": str(source)}
    for name, pre in (("store-2d.zarr", PreprocessConfig(kind="2d", shape=(64, 64))),
                      ("store-3d.zarr", PreprocessConfig(kind="3d", shape=(32, 64, 64)))):
        store = str(out / name)
        result = run_ingest(str(source), store, IngestConfig(preprocess=pre, classes=DEMO_CLASSES), show_progress=True)
        console.print(f"[bold]store[/] {store}\n  {result['accounting']}  ({result['samples']} training samples)")
        made[name] = store
    from flows.evaluate import run_evaluate
    from flows.train import run_train
    from medpipe.evaluation.report import network_vs_baselines
    from medpipe.training.config import TrainConfig

    for store_name, task in (("store-2d.zarr", Task.classify), ("store-3d.zarr", Task.segment)):
        run_dir = out / "runs" / f"{task}"
        trained = run_train(made[store_name], str(run_dir), TrainConfig(task=task), overwrite=True, progress=True)
        evaluated = run_evaluate(made[store_name], str(run_dir), str(run_dir / "report"))
        numbers = ", ".join(f"{k} {v:.3f}" for k, v in trained["test_metrics"].items() if isinstance(v, float))
        console.print(f"[bold]{task}[/] model {trained['best_path']}  (validated on: {trained['validation']})\n"
                      f"  test: {numbers or trained['testing']}\n  {network_vs_baselines(evaluated['metrics'], evaluated['baselines'])}\n"
                      f"  report: {evaluated['report']}")
        made[f"report-{task}"] = evaluated["report"]
    made.update(run_signal_demo(out, console))
    console.print(f"\ninspect: medpipe info {made['store-2d.zarr']}\n"
                  f"open the classifier report: {made['report-classify']}\n"
                  f"open the rhythm report: {made['report-rhythm']}\n"
                  f"open the forecast report: {made['report-forecast']}")
    return made


def run_signal_demo(out: Path, console: Console) -> dict[str, str]:
    """Demo ECG records -> ingest-signals flow -> a rhythm classifier and a forecaster, each evaluated beside its
    baselines; returns the paths of what was made."""
    from flows.timeseries import run_ingest_signals, run_train_signals
    from medpipe.signals.config import SignalIngestConfig
    from medpipe.signals.demo import ECG_DEMO_PATIENTS, SignalDemoSpec, generate_demo_signals
    from medpipe.training.config import TrainConfig

    use_demo_key()
    source = out / "data" / "signals"
    if not (source / "labels.csv").exists():
        summary = generate_demo_signals(source, SignalDemoSpec(patients=ECG_DEMO_PATIENTS))
        console.print(f"demo ECG records: {summary.records} records -> {source}")
    store = str(out / "store-signals.zarr")
    result = run_ingest_signals(str(source), store, SignalIngestConfig(), show_progress=True)
    counts = result["counts"]
    console.print(f"[bold]store[/] {store}\n  discovered {counts['discovered']} records = ingested "
                  f"{counts['ingested']} + quarantined {counts['quarantined']} ({counts['windows']} windows)")
    made = {"store-signals.zarr": store}
    for name, task in (("rhythm", Task.classify), ("forecast", Task.forecast)):
        run_dir = out / "runs" / name
        trained = run_train_signals(store, str(run_dir), TrainConfig(task=task), overwrite=True, progress=True)
        for model, summary in trained["runs"].items():
            evaluation = summary["evaluation"]
            console.print(f"[bold]{name}[/] ({model}) model {summary['best_path']}\n{evaluation['markdown']}\n"
                          f"  report: {evaluation['report']}")
            made[f"report-{name}"] = evaluation["report"]
    return made
