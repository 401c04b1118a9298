"""Thin Prefect tasks over medpipe.training and medpipe.evaluation."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task

from medpipe.training.config import TrainConfig
from tasks.options import STEP_TASK


@task(name="train-model", **STEP_TASK)
def train_model(store: str, out_dir: str, config: TrainConfig, resume: bool, overwrite: bool,
                progress: bool) -> dict[str, Any]:
    """Train; logs one line per epoch to Prefect. Returns the run summary (paths and numbers only), including
    `validation` (what selected best.pt: "val split" or "none: ...") and `testing` (where test_metrics come from);
    a run without validation or test data is logged as a warning."""
    from medpipe.training.engine import TEST_ON_TEST, VALIDATION_ON_VAL, train

    logger = get_run_logger()

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                      if isinstance(v, float)))

    result = train(store, out_dir, config, resume=resume, progress=progress, overwrite=overwrite,
                   on_epoch_end=log_epoch)
    if result.validation != VALIDATION_ON_VAL:
        logger.warning("validation: %s", result.validation)
    if result.testing != TEST_ON_TEST:
        logger.warning("test: %s", result.testing)
    summary = asdict(result)
    return {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in summary.items()}


@task(name="evaluate-model", **STEP_TASK)
def evaluate_model(store: str, model: str, out_dir: str, split: str, n_boot: int, device: str) -> dict[str, Any]:
    """Metrics, figures and report for a checkpoint; returns paths and the metrics."""
    from medpipe.evaluation.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(store, model, out_dir, split=split, n_boot=n_boot, device=device)
