"""Thin Prefect tasks over medpipe.ingest: retries on I/O, no result persistence, and nothing identifying in what
Prefect stores: results carry pseudonyms and hashes only, and an unexpected exception leaves a task as a
`StepFailed` naming its type (the traceback stays in a local file, see medpipe.errors.safe_exception)."""

from __future__ import annotations

import functools
from typing import Any, Callable, ParamSpec, TypeVar

from prefect import task

from medpipe.config import IngestConfig, PreprocessConfig, StoreConfig
from medpipe.deid import DeidKey
from medpipe.errors import safe_exception
from medpipe.ingest import archive, duplicates, pipeline, scan, training
from medpipe.ingest.records import ArchiveResult, ScanRecord, Unit
from medpipe.ingest.units import UnitPlan
from tasks.options import IO_TASK, STEP_TASK


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


@task(name="scan-shard", **IO_TASK)
@safe("scan-shard")
def scan_shard(source: str, items: list[tuple[int, str]], key: DeidKey, max_image_bytes: int) -> list[ScanRecord]:
    return scan.scan_shard(source, items, key, max_image_bytes)


@task(name="compare-duplicates", **IO_TASK)
@safe("compare-duplicates")
def compare_duplicates(source: str, items: list[tuple[int, str]], max_image_bytes: int) -> dict[int, str | None]:
    return duplicates.pixel_digests(source, items, max_image_bytes)


@task(name="plan-units", **STEP_TASK)
@safe("plan-units")
def plan_units(run: pipeline.IngestRun, scans: list[ScanRecord], digests: dict[int, str | None],
               key: DeidKey) -> tuple[UnitPlan, dict[str, str]]:
    return pipeline.plan_ingest(run, scans, digests, key)


@task(name="archive-shard", **IO_TASK)
@safe("archive-shard")
def archive_shard(source: str, store: str, units: list[Unit], key: DeidKey, config: StoreConfig,
                  tags: dict[str, str], run_id: str, max_image_bytes: int) -> list[ArchiveResult]:
    return archive.archive_shard(source, store, units, key, config, tags, run_id, max_image_bytes)


@task(name="lay-out-training", **IO_TASK)
@safe("lay-out-training")
def lay_out_training(run: pipeline.IngestRun, outcome: pipeline.ArchiveOutcome
                     ) -> tuple[training.TrainingLayout, dict[str, Any]]:
    return pipeline.lay_out_ingest(run, outcome)


@task(name="assemble-shard", **IO_TASK)
@safe("assemble-shard")
def assemble_shard(store: str, layout: training.TrainingLayout, start: int, stop: int, config: PreprocessConfig,
                   run_id: str, store_config: StoreConfig) -> training.AssembleResult:
    return training.assemble_range(store, layout, start, stop, config, run_id, store_config)


@task(name="finalize", **IO_TASK)
@safe("finalize")
def finalize(run: pipeline.IngestRun, plan: UnitPlan, outcome: pipeline.ArchiveOutcome,
             layout: training.TrainingLayout, fingerprint: dict[str, Any], key: DeidKey,
             assembled: list[training.AssembleResult]) -> dict[str, Any]:
    return pipeline.finish_ingest(run, plan, outcome, layout, fingerprint, key, assembled)
