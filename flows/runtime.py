"""Run-time pieces shared by flows: the Dask task runner, the key, progress over mapped futures."""

from __future__ import annotations

import os
from typing import Any, Iterable

from prefect.futures import PrefectFuture, as_completed
from prefect_dask import DaskTaskRunner
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medpipe.deid import DeidKey, resolve_key

SCHEDULER_ENV = "MEDPIPE_DASK_SCHEDULER"


def dask_task_runner(scheduler: str | None = None, workers: int = 2) -> DaskTaskRunner:
    """An existing scheduler when an address is given (or $MEDPIPE_DASK_SCHEDULER), else a LocalCluster."""
    address = scheduler or os.environ.get(SCHEDULER_ENV)
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def load_key(key_secret: str | None = None) -> DeidKey:
    """The de-identification key from a Prefect Secret block (when named) or $MEDPIPE_DEID_KEY."""
    if key_secret:
        from prefect.blocks.system import Secret

        return resolve_key(str(Secret.load(key_secret).get()))
    return resolve_key()


def gather(futures: Iterable[PrefectFuture], label: str, show: bool) -> list[Any]:
    """Results of mapped futures in submission order, with a progress bar on the terminal when `show`."""
    futures = list(futures)
    if show and futures:
        columns = (TextColumn(f"{label:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=False) as bar:
            task_id = bar.add_task(label, total=len(futures))
            for _ in as_completed(futures):
                bar.advance(task_id)
    return [f.result() for f in futures]
