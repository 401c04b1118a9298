"""Run-time pieces shared by flows: the Dask task runner, the key, progress over mapped futures."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, cast

from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import TaskRunner
from prefect_dask import DaskTaskRunner
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medpipe.deid import DeidKey, MissingKeyError, resolve_key

SCHEDULER_ENV = "MEDPIPE_DASK_SCHEDULER"


@contextmanager
def shared_api_server() -> Iterator[str]:
    """One Prefect API for the flow and its Dask worker processes.

    Without a configured PREFECT_API_URL, Prefect starts a temporary (embedded) server per process, so every Dask
    worker would start its own (~5 s each) and report task runs to a different database. We start the embedded
    server once and export its URL, which worker processes inherit. A configured API (a real server, or the test
    harness) is exported as it is.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url
    previous = os.environ.get("PREFECT_API_URL")
    server = None
    url = configured
    if not url:
        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        if server is not None:
            _drain_prefect_services()
            server.stop()


def _drain_prefect_services() -> None:
    """Send queued logs and events before the embedded server stops (else they retry for a minute at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


def dask_task_runner(scheduler: str | None = None, workers: int = 2) -> TaskRunner[Any]:
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

        try:
            secret = cast(Secret, Secret.load(key_secret))  # called from sync code: the sync variant of load
        except ValueError as exc:  # Prefect: no block of that name
            raise MissingKeyError(f"no Prefect Secret block named {key_secret!r} ({type(exc).__name__})") from None
        return resolve_key(str(secret.get()))
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
