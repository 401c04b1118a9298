"""Ingest flow: discover -> scan (Dask, per shard) -> plan -> ingest shards (Dask: archive + training samples from
the same decoded arrays) -> training table -> finalize; ends with a markdown artifact of the accounting."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.runtime import dask_client, dask_task_runner, held_lock, load_key, shared_api_server
from medpipe.config import IngestConfig
from medpipe.deid import DeidKey
from medpipe.ingest.lock import lock_url
from medpipe.ingest.pipeline import run_ingest_steps
from medpipe.preflight import check_workers_access
from medpipe.report import ingest_markdown
from tasks import ingest as t


@flow(name="ingest", log_prints=False)
def ingest_flow(source: str, store: str, config: dict[str, Any] | None = None, key_secret: str | None = None,
                show_progress: bool = False, retry_quarantined: bool = False) -> dict[str, Any]:
    """De-identify and ingest SOURCE into the Zarr STORE (holding the store's lock); returns the store summary.

    Runs on the Dask scheduler of `config["scheduler"]` (else $MEDPIPE_DASK_SCHEDULER, else a LocalCluster of
    `config["workers"]`), decided here at run time, so a deployment, `serve`, the CLI and the pipeline all honour
    the parameter: the work itself is the subflow `ingest-on-dask` on that task runner."""
    cfg = IngestConfig.model_validate(config or {})
    runner = dask_task_runner(cfg.scheduler, cfg.workers)  # refuses plaintext to another host, in one line
    return ingest_on_cluster.with_options(task_runner=runner)(
        source=source, store=store, config=cfg.to_dict(), key_secret=key_secret, show_progress=show_progress,
        retry_quarantined=retry_quarantined)


@flow(name="ingest-on-dask", log_prints=False)
def ingest_on_cluster(source: str, store: str, config: dict[str, Any], key_secret: str | None = None,
                      show_progress: bool = False, retry_quarantined: bool = False) -> dict[str, Any]:
    """The ingest on the task runner `ingest_flow` chose: the key, the store lock (recording this flow run, so a
    killed run is marked Crashed by the next), every Dask worker's access to SOURCE and STORE, then the work."""
    cfg = IngestConfig.model_validate(config)
    key = load_key(key_secret)
    with held_lock(store) as run_id:  # one writer per store; refused in one line while another run holds it
        checked = check_workers_access(dask_client(), source, store, lock_path=lock_url(store))
        get_run_logger().info("%d Dask worker(s) can reach SOURCE and STORE", checked)
        return _ingest(source, store, cfg, key, run_id, show_progress, retry_quarantined)


def _ingest(source: str, store: str, cfg: IngestConfig, key: DeidKey, run_id: str, show_progress: bool,
            retry_quarantined: bool) -> dict[str, Any]:
    """prepare, then the steps of medpipe.ingest.pipeline.run_ingest_steps (scan -> duplicates -> plan -> ingest
    shards (archive + samples) -> training -> finalize), mapped steps as one task run per shard."""
    run = t.prepare(source, store, cfg, key, run_id, retry_quarantined)
    if run.up_to_date:
        return {**(run.previous or {}), "noop": True}
    for problem in run.problems:
        get_run_logger().warning("the store was marked complete but %s: ingesting again", problem)
    summary = run_ingest_steps(run, key, mapper=t.prefect_mapper(show_progress), driver=t.prefect_driver)
    for warning in summary["warnings"]:
        get_run_logger().warning("%s", warning)
    create_markdown_artifact(key="ingest-summary", markdown=ingest_markdown(summary),
                             description="medpipe ingest: accounting, quarantine reasons, fingerprint")
    return summary


def run_ingest(source: str, store: str, config: IngestConfig, key_secret: str | None = None,
               show_progress: bool = False, retry_quarantined: bool = False) -> dict[str, Any]:
    """Run the flow on the configured Dask cluster (local by default, `config.scheduler` when set).

    `retry_quarantined`: re-examine the quarantined files even when the store is up to date with the source."""
    with shared_api_server():
        return ingest_flow(source=source, store=store, config=config.to_dict(), key_secret=key_secret,
                           show_progress=show_progress, retry_quarantined=retry_quarantined)


if __name__ == "__main__":
    import sys

    print(run_ingest(sys.argv[1], sys.argv[2], IngestConfig(), show_progress=True)["accounting"])
