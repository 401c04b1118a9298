"""Thin Prefect tasks over medpipe.signals: the read/assemble shards and driver steps run through the same
`run_step` task as the image ingest (tasks.ingest: PHI-free exceptions, arguments in an opaque box); training
and evaluation of signal models as one task each."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from medpipe.deid import DeidKey
from medpipe.signals import ingest as pipeline
from medpipe.signals.config import SignalIngestConfig
from medpipe.training.config import TrainConfig
from tasks.ingest import prefect_driver
from tasks.options import STEP_TASK


def prepare_signals(source: str, store: str, config: SignalIngestConfig, key: DeidKey,
                    run_id: str) -> pipeline.SignalRun:
    """The `prepare` driver step as a task run (discovery, manifest, key check)."""
    run: pipeline.SignalRun = prefect_driver("prepare", pipeline.prepare_signal_ingest, source, store, config, key,
                                             run_id)
    return run


@task(name="train-signal-model", **STEP_TASK)
def train_signal_model(store: str, out_dir: str, config: TrainConfig, resume: bool, overwrite: bool,
                       progress: bool) -> dict[str, Any]:
    """Train one signal model (rhythm or forecast); one log line per epoch. Returns the run summary (paths and
    numbers only)."""
    from dataclasses import asdict

    from medpipe.signals.train import train_signals

    logger = get_run_logger()

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        logger.info("%s epoch %d: %s", config.model, epoch,
                    ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

    result = train_signals(store, out_dir, config, resume=resume, progress=progress, overwrite=overwrite,
                           on_epoch_end=log_epoch)
    return {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in asdict(result).items()}


@task(name="evaluate-signal-model", **STEP_TASK)
def evaluate_signal_model(store: str, model: str, out_dir: str, split: str, n_boot: int,
                          device: str) -> dict[str, Any]:
    """Metrics beside baselines with CIs, plots and report.html of one signal checkpoint: {"metrics", "markdown"
    (the summary for artifacts and the terminal), "report" (path of report.html)}."""
    from pathlib import Path

    from medpipe.signals.evaluate import evaluate_signal_checkpoint
    from medpipe.signals.report import markdown_signal_summary

    metrics = evaluate_signal_checkpoint(store, model, out_dir, split=split, n_boot=n_boot, device=device)
    return {"metrics": metrics, "markdown": markdown_signal_summary(metrics),
            "report": str(Path(out_dir) / "report.html")}


@task(name="compare-signal-models", **STEP_TASK)
def compare_signal_models(eval_dirs: list[str], out_dir: str) -> dict[str, Any]:
    """The comparison table (markdown + html) of several evaluated signal models."""
    from medpipe.signals.report import compare_signal_runs

    return compare_signal_runs(eval_dirs, out_dir)
