"""Thin Prefect tasks over medpipe.ingest: retries on I/O, no result persistence (results carry pseudonyms only)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from medpipe.config import IngestConfig, PreprocessConfig, StoreConfig
from medpipe.deid import DeidKey
from medpipe.ingest import archive, duplicates, pipeline, scan, training
from medpipe.ingest.records import ArchiveResult, ScanRecord, Unit
from medpipe.ingest.units import UnitPlan

IO_TASK: dict[str, Any] = dict(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, persist_result=False)
STEP_TASK: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="prepare", **IO_TASK)
def prepare(source: str, store: str, config: IngestConfig, key: DeidKey) -> pipeline.IngestRun:
    return pipeline.prepare_ingest(source, store, config, key)


@task(name="scan-shard", **IO_TASK)
def scan_shard(source: str, items: list[tuple[int, str]], key: DeidKey) -> list[ScanRecord]:
    return scan.scan_shard(source, items, key)


@task(name="compare-duplicates", **IO_TASK)
def compare_duplicates(source: str, items: list[tuple[int, str]]) -> dict[int, str | None]:
    return duplicates.pixel_digests(source, items)


@task(name="plan-units", **STEP_TASK)
def plan_units(run: pipeline.IngestRun, scans: list[ScanRecord], digests: dict[int, str | None],
               key: DeidKey) -> tuple[UnitPlan, dict[str, str]]:
    return pipeline.plan_ingest(run, scans, digests, key)


@task(name="archive-shard", **IO_TASK)
def archive_shard(source: str, store: str, units: list[Unit], key: DeidKey, config: StoreConfig,
                  tags: dict[str, str]) -> list[ArchiveResult]:
    return archive.archive_shard(source, store, units, key, config, tags)


@task(name="lay-out-training", **IO_TASK)
def lay_out_training(run: pipeline.IngestRun, outcome: pipeline.ArchiveOutcome
                     ) -> tuple[training.TrainingLayout, dict[str, Any]]:
    return pipeline.lay_out_ingest(run, outcome)


@task(name="assemble-shard", **IO_TASK)
def assemble_shard(store: str, layout: training.TrainingLayout, start: int, stop: int, config: PreprocessConfig) -> int:
    return training.assemble_range(store, layout, start, stop, config)


@task(name="finalize", **IO_TASK)
def finalize(run: pipeline.IngestRun, plan: UnitPlan, outcome: pipeline.ArchiveOutcome,
             layout: training.TrainingLayout, fingerprint: dict[str, Any], key: DeidKey) -> dict[str, Any]:
    return pipeline.finish_ingest(run, plan, outcome, layout, fingerprint, key)
