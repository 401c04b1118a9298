"""Thin Prefect tasks over medpipe.ingest: retries on I/O, no result persistence, and nothing identifying in what
Prefect stores: results carry pseudonyms and hashes only, and an unexpected exception leaves a task as a
`StepFailed` naming its type (the traceback stays in a local file, see medpipe.errors.safe_exception).

The steps themselves and their order live in `medpipe.ingest.pipeline.run_ingest_steps`; the flow hands it
`prefect_mapper` (mapped steps: one task run per shard on the flow's Dask task runner, progress on the terminal)
and `prefect_driver` (driver steps: one task run in the flow's process), so Prefect shows a state per shard and per
step while the work is exactly what the benchmarks run on bare Dask."""

from __future__ import annotations

import functools
from typing import Any, Callable, ParamSpec, TypeVar

from prefect import task, unmapped

from medpipe.config import IngestConfig
from medpipe.deid import DeidKey
from medpipe.errors import safe_exception
from medpipe.ingest import pipeline
from tasks.options import IO_TASK


P = ParamSpec("P")
R = TypeVar("R")


def safe(step: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Let only PHI-free exceptions leave the step (Prefect stores them in its database and logs)."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised in a safe form
                raise safe_exception(step, exc) from None

        return run

    return wrap


@task(name="prepare", **IO_TASK)
@safe("prepare")
def prepare(source: str, store: str, config: IngestConfig, key: DeidKey, run_id: str,
            retry_quarantined: bool) -> pipeline.IngestRun:
    return pipeline.prepare_ingest(source, store, config, key, run_id, retry_quarantined)


class Arguments:
    """A step's arguments in a box Prefect does not look into: it walks lists, tuples, dicts and dataclasses given
    to a task in search of futures, which cost seconds for a shard's thousands of records (measured:
    docs/benchmarks.md). Not a dataclass on purpose."""

    __slots__ = ("values",)

    def __init__(self, values: tuple[Any, ...]) -> None:
        self.values = values

    def __getstate__(self) -> tuple[Any, ...]:
        return self.values

    def __setstate__(self, values: tuple[Any, ...]) -> None:
        self.values = values


@task(name="step", **IO_TASK)
def run_step(step: str, fn: Callable[..., Any], args: Arguments) -> Any:
    """One step of the ingest, `fn(*args)` (a shard of a mapped step, or a driver step); retried on failure."""
    return safe(step)(fn)(*args.values)


def prefect_mapper(show_progress: bool) -> pipeline.Mapper:
    """A Mapper that runs each call as a task run `<step>-shard` on the flow's task runner."""
    from flows.runtime import gather  # flows import tasks, never the other way round at import time

    def mapper(step: str, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        if not calls:
            return []
        futures = run_step.with_options(name=f"{step}-shard").map(unmapped(step), unmapped(fn),
                                                                  [Arguments(c) for c in calls])
        return gather(futures, step, show_progress)

    return mapper


def prefect_driver(step: str, fn: Callable[..., Any], *args: Any) -> Any:
    """A Driver that runs a driver step as the task run `<step>` in the flow's process."""
    return run_step.with_options(name=step)(step, fn, Arguments(args))
