"""Train flow: one store -> one trained model (CUDA when present, else CPU), with a table artifact of the
validation history and test metrics."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.runtime import shared_api_server
from medpipe.training.config import TrainConfig
from tasks.train import train_model


@flow(name="train", log_prints=False)
def train_flow(store: str, out_dir: str, config: dict[str, Any] | None = None, resume: bool = False,
               overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Train a model on STORE's train split (validated on val), checkpoints and metrics in OUT_DIR."""
    cfg = TrainConfig.model_validate(config or {})
    summary = train_model(store, out_dir, cfg, resume, overwrite, progress)
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in epoch.items()} for epoch in summary["history"]]
    if rows:
        create_table_artifact(key="train-history", table=rows,
                              description=f"medpipe training: metrics per epoch (validation: {summary['validation']}; "
                                          f"test: {summary['testing']})")
    return summary


def run_train(store: str, out_dir: str, config: TrainConfig, resume: bool = False, overwrite: bool = False,
              progress: bool = False) -> dict[str, Any]:
    """Run the train flow on Prefect's embedded server (or the configured API)."""
    with shared_api_server():
        return train_flow(store=store, out_dir=out_dir, config=config.to_dict(), resume=resume,
                          overwrite=overwrite, progress=progress)
