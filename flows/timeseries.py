"""Physiological signal flows: ingest records into a windowed signals store (Dask-parallel, per shard of
records), then train and evaluate signal models (LSTM, GRU, 1D ResNet) for rhythm classification or forecasting,
with a comparison of the models when several are trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.runtime import dask_client, dask_task_runner, held_lock, load_key, shared_api_server
from medpipe.ingest.lock import lock_url
from medpipe.preflight import check_workers_access
from medpipe.report import signal_ingest_markdown
from medpipe.signals.config import SignalIngestConfig
from medpipe.signals.ingest import run_signal_ingest_steps
from medpipe.training.config import TrainConfig
from tasks import signals as t
from tasks.ingest import prefect_driver, prefect_mapper


@flow(name="ingest-signals", log_prints=False)
def ingest_signals_flow(source: str, store: str, config: dict[str, Any] | None = None,
                        key_secret: str | None = None, show_progress: bool = False) -> dict[str, Any]:
    """De-identify the signal records of SOURCE and cut them into the windows of the signals STORE (holding the
    store's lock), on the Dask scheduler of `config["scheduler"]` (else a LocalCluster of `config["workers"]`)."""
    cfg = SignalIngestConfig.model_validate(config or {})
    runner = dask_task_runner(cfg.scheduler, cfg.workers)
    return ingest_signals_on_cluster.with_options(task_runner=runner)(
        source=source, store=store, config=cfg.to_dict(), key_secret=key_secret, show_progress=show_progress)


@flow(name="ingest-signals-on-dask", log_prints=False)
def ingest_signals_on_cluster(source: str, store: str, config: dict[str, Any], key_secret: str | None = None,
                              show_progress: bool = False) -> dict[str, Any]:
    """The signal ingest on the task runner `ingest_signals_flow` chose: key, store lock, workers' access, work."""
    cfg = SignalIngestConfig.model_validate(config)
    key = load_key(key_secret)
    with held_lock(store) as run_id:
        checked = check_workers_access(dask_client(), source, store, lock_path=lock_url(store))
        get_run_logger().info("%d Dask worker(s) can reach SOURCE and STORE", checked)
        run = t.prepare_signals(source, store, cfg, key, run_id)
        if run.up_to_date:
            return {**(run.previous or {}), "noop": True}
        summary = run_signal_ingest_steps(run, key, mapper=prefect_mapper(show_progress), driver=prefect_driver)
    for warning in summary["warnings"]:
        get_run_logger().warning("%s", warning)
    create_markdown_artifact(key="signal-ingest-summary", markdown=signal_ingest_markdown(summary),
                             description="medpipe ingest-signals: accounting, quarantine reasons, store facts")
    return summary


@flow(name="train-signals", log_prints=False)
def train_signals_flow(store: str, out_dir: str, config: dict[str, Any] | None = None,
                       models: list[str] | None = None, evaluate: bool = True, n_boot: int = 1000,
                       resume: bool = False, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Train one model per name in MODELS (default: the config's model) on STORE's train split (validated on
    val), each in OUT_DIR/<model>; evaluate each on test beside its baselines; compare them when several."""
    cfg = TrainConfig.model_validate(config or {})
    names = models or [cfg.model_name("signals")]
    runs: dict[str, Any] = {}
    eval_dirs: list[str] = []
    for name in names:
        run_dir = str(Path(out_dir) / name) if len(names) > 1 else out_dir
        summary = t.train_signal_model(store, run_dir, cfg.model_copy(update={"model": name}), resume, overwrite,
                                       progress)
        rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in epoch.items()}
                for epoch in summary["history"]]
        if rows:
            create_table_artifact(key=f"train-history-{_artifact_key(name)}", table=rows,
                                  description=f"medpipe train ({cfg.task.value}, {name}): metrics per epoch")
        runs[name] = summary
        if evaluate:
            evaluation = t.evaluate_signal_model(store, run_dir, str(Path(run_dir) / "evaluation"), "test", n_boot,
                                                 cfg.device)
            runs[name]["evaluation"] = evaluation
            eval_dirs.append(str(Path(run_dir) / "evaluation"))
            create_markdown_artifact(key=f"evaluation-{_artifact_key(name)}", markdown=evaluation["markdown"],
                                     description=f"medpipe evaluation of {name}: model vs baselines, 95% CIs")
    result: dict[str, Any] = {"runs": runs}
    if len(eval_dirs) > 1:
        comparison = t.compare_signal_models(eval_dirs, out_dir)
        create_markdown_artifact(key="signal-model-comparison", markdown=comparison["markdown"],
                                 description="medpipe: signal models compared on the test split")
        result["comparison"] = comparison
    return result


@flow(name="evaluate-signals", log_prints=False)
def evaluate_signals_flow(store: str, model: str, out_dir: str, split: str = "test", n_boot: int = 1000,
                          device: str = "auto") -> dict[str, Any]:
    """Evaluate a signal MODEL (run folder or checkpoint) on SPLIT of STORE beside its baselines; report in
    OUT_DIR."""
    result = t.evaluate_signal_model(store, model, out_dir, split, n_boot, device)
    create_markdown_artifact(key="signal-evaluation", markdown=result["markdown"],
                             description="medpipe evaluation of a signal model: model vs baselines, 95% CIs")
    return result


def _artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def run_ingest_signals(source: str, store: str, config: SignalIngestConfig, key_secret: str | None = None,
                       show_progress: bool = False) -> dict[str, Any]:
    """Run the signal ingest flow on Prefect's embedded server (or the configured API)."""
    with shared_api_server():
        return ingest_signals_flow(source=source, store=store, config=config.to_dict(), key_secret=key_secret,
                                   show_progress=show_progress)


def run_train_signals(store: str, out_dir: str, config: TrainConfig, models: list[str] | None = None,
                      evaluate: bool = True, n_boot: int = 1000, resume: bool = False, overwrite: bool = False,
                      progress: bool = False) -> dict[str, Any]:
    """Run the signal training flow on Prefect's embedded server (or the configured API)."""
    with shared_api_server():
        return train_signals_flow(store=store, out_dir=out_dir, config=config.to_dict(), models=models,
                                  evaluate=evaluate, n_boot=n_boot, resume=resume, overwrite=overwrite,
                                  progress=progress)


def run_evaluate_signals(store: str, model: str, out_dir: str, split: str = "test", n_boot: int = 1000,
                         device: str = "auto") -> dict[str, Any]:
    """Run the signal evaluation flow on Prefect's embedded server (or the configured API)."""
    with shared_api_server():
        return evaluate_signals_flow(store=store, model=model, out_dir=out_dir, split=split, n_boot=n_boot,
                                     device=device)


if __name__ == "__main__":
    import sys

    print(run_ingest_signals(sys.argv[1], sys.argv[2], SignalIngestConfig(), show_progress=True)["counts"])
