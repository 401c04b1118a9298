"""What the scenarios run: a served deployment, its name, and the parameters of one run of it.

- `ingest_target`: `flows/ingest.py:ingest_flow` served by `deployments/ingest.py serve` (the ingest deployment).
- `pipeline_target`: `medpipe-pipeline/on-demand` served by `deployments/serve.py` (prefect.yaml's deployments).

The served process gets, in its own environment, the Prefect API, the S3 endpoint and fake credentials and the
de-identification key, as a real serving machine would; the runner polls for runs every second (default 10 s).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from tests.e2e.processes import REPO, DaskCluster, PrefectServer, ServedFlows
from tests.e2e.scenario import CLASSES, DEMO_KEY

PIPELINE_DEPLOYMENTS = ("on-demand", "nightly-ingest", "weekly-retrain", "batch-predict")


@dataclass(frozen=True)
class Target:
    """A served deployment and how to parametrise one run of it."""

    deployment: str  # "flow-name/deployment-name"
    served: ServedFlows
    make_parameters: Callable[..., dict[str, Any]]

    def parameters(self, source: str, store: str, **extra: Any) -> dict[str, Any]:
        return self.make_parameters(source, store, **extra)


def served_env(server: PrefectServer, s3_env: Mapping[str, str], extra: Mapping[str, str] | None = None
               ) -> dict[str, str]:
    """Environment of a serving process: Prefect API, S3 endpoint + credentials, the demo key, fast polling."""
    return {**server.client_env(), **s3_env, "MEDPIPE_DEID_KEY": DEMO_KEY, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            **(extra or {})}


def ingest_config(cluster: DaskCluster, files_per_shard: int = 3) -> dict[str, Any]:
    """A small ingest config on the external scheduler: many shards of a few files (so a kill finds work)."""
    return {"classes": CLASSES, "files_per_shard": files_per_shard, "scheduler": cluster.address}


def ingest_target(run_dir: Path, server: PrefectServer, cluster: DaskCluster, s3_env: Mapping[str, str]) -> Target:
    """`ingest/nightly-ingest` served by deployments/ingest.py; the key comes from the environment."""
    argv = [sys.executable, str(REPO / "deployments" / "ingest.py"), "serve", "--source", "unset", "--store",
            "unset", "--scheduler", cluster.address, "--cron", "0 2 * * *", "--name", "nightly-ingest"]
    served = ServedFlows(run_dir, argv, served_env(server, s3_env), server.api_url, ["ingest/nightly-ingest"])

    def parameters(source: str, store: str, **extra: Any) -> dict[str, Any]:
        return {"source": source, "store": store, "config": ingest_config(cluster), "key_secret": None, **extra}

    return Target("ingest/nightly-ingest", served, parameters)


def pipeline_target(run_dir: Path, server: PrefectServer, cluster: DaskCluster, s3_env: Mapping[str, str],
                    urls: Mapping[str, str], config: Mapping[str, Any]) -> Target:
    """`medpipe-pipeline/on-demand` (and the other deployments of prefect.yaml) served by deployments/serve.py.

    `urls`: MEDPIPE_SOURCE / MEDPIPE_STORE / MEDPIPE_OUTPUT / MEDPIPE_INCOMING for prefect.yaml's templates."""
    argv = [sys.executable, str(REPO / "deployments" / "serve.py")]
    served = ServedFlows(run_dir, argv, served_env(server, s3_env, dict(urls)), server.api_url,
                         [f"medpipe-pipeline/{name}" for name in PIPELINE_DEPLOYMENTS])

    def parameters(source: str, store: str, **extra: Any) -> dict[str, Any]:
        return {"source": source, "store": store, "scheduler": cluster.address, "config": dict(config), **extra}

    return Target("medpipe-pipeline/on-demand", served, parameters)
