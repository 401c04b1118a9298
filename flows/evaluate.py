"""Evaluate flow: checkpoint + store -> metrics.json, figures, report.html, and a markdown artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.runtime import shared_api_server
from tasks.train import evaluate_model


@flow(name="evaluate", log_prints=False)
def evaluate_flow(store: str, model: str, out_dir: str, split: str = "test", n_boot: int = 1000,
                  device: str = "auto") -> dict[str, Any]:
    """Evaluate MODEL (a run folder or checkpoint) on SPLIT of STORE; the report lands in OUT_DIR."""
    result = evaluate_model(store, model, out_dir, split, n_boot, device)
    create_markdown_artifact(key="evaluation", markdown=result["markdown"] + f"\n\nreport: `{result['report']}`",
                             description="medpipe evaluation: key numbers with 95% CIs, model vs baselines")
    return result


def run_evaluate(store: str, model: str, out_dir: str, split: str = "test", n_boot: int = 1000,
                 device: str = "auto") -> dict[str, Any]:
    """Run the evaluate flow on Prefect's embedded server (or the configured API)."""
    with shared_api_server():
        return evaluate_flow(store=store, model=model, out_dir=out_dir, split=split, n_boot=n_boot, device=device)
