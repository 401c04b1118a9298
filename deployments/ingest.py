"""Scheduled ingestion: serve `ingest_flow` on a cron schedule (or deploy it to a work pool).

    # serve from this process (simplest; needs a Prefect server: `prefect server start`, PREFECT_API_URL set)
    python deployments/ingest.py serve --source s3://bucket/incoming --store s3://bucket/medpipe.zarr --cron "0 2 * * *"

    # or register a deployment on a work pool (workers pull it; scale-out by configuration only)
    python deployments/ingest.py deploy --source ... --store ... --cron "0 2 * * *" --work-pool medpipe-pool

The key is read by the flow at run time from the Prefect Secret block named by --key-secret (default
`medpipe-deid-key`), so the schedule never carries it. A Dask scheduler address in --scheduler is a flow parameter
(`config["scheduler"]`): every run, wherever it executes, uses that cluster instead of a LocalCluster (the flow
picks its task runner from its parameters at run time). A tls:// scheduler needs the client certificates on the
machine that runs the flow; see docs/cluster.md for the cluster, the workers' environment and killed runs
(deployments/automations.yaml).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.ingest import ingest_flow  # noqa: E402
from medpipe.config import load_config  # noqa: E402
from medpipe.preflight import check_scheduler_transport  # noqa: E402


def build_parameters(args: argparse.Namespace) -> dict:
    """Flow parameters of the deployment (config from YAML, scheduler override): the scheduler travels only here."""
    config = load_config(args.config, scheduler=args.scheduler)
    return {"source": args.source, "store": args.store, "config": config.to_dict(), "key_secret": args.key_secret}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["serve", "deploy"])
    parser.add_argument("--source", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--config", default=None, help="YAML ingest config")
    parser.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: nightly at 02:00)")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address, e.g. tls://scheduler:8786")
    parser.add_argument("--key-secret", default="medpipe-deid-key", help="Prefect Secret block with the key")
    parser.add_argument("--work-pool", default="medpipe-pool")
    parser.add_argument("--name", default="nightly-ingest")
    args = parser.parse_args(argv)
    params = build_parameters(args)
    if params["config"].get("scheduler"):
        check_scheduler_transport(params["config"]["scheduler"])  # refused now, not at 02:00 every night
    # One run at a time (the store lock refuses a second writer anyway; the limit queues it instead).
    if args.mode == "serve":
        ingest_flow.serve(name=args.name, cron=args.cron, parameters=params, global_limit=1)
    else:  # a process work pool runs the flow from this checkout
        repo = Path(__file__).resolve().parents[1]
        ingest_flow.from_source(source=str(repo), entrypoint="flows/ingest.py:ingest_flow").deploy(
            name=args.name, work_pool_name=args.work_pool, cron=args.cron, parameters=params, concurrency_limit=1)


if __name__ == "__main__":
    main()
