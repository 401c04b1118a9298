"""Task options shared by every medpipe task: nothing persisted in Prefect's result storage (results and failures
stay out of its database and disk), no input-hash caching (inputs are references to data that changes), and
retries with exponential backoff and jitter for steps that do I/O (object stores fail transiently).

Measured (benchmarks/orchestration.py, docs/benchmarks.md): none of these options changes a task's orchestration
cost measurably, Prefect's defaults included; that cost is the task run itself (context serialization at submission,
the engine and its events in the worker). Fewer, larger tasks are what lowers it: see the shard rule there."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

STEP_TASK: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)
# 3 retries after 2, 4 and 8 s (each +-50 %): spreads out the workers that hit the same failing endpoint
IO_TASK: dict[str, Any] = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                               retry_jitter_factor=0.5, **STEP_TASK)
