"""Serve medpipe's deployments from one process (one machine, no work pool or worker to run).

    export PREFECT_API_URL=http://127.0.0.1:4200/api          # a running `prefect server start`
    export MEDPIPE_SOURCE=... MEDPIPE_STORE=... MEDPIPE_OUTPUT=... MEDPIPE_INCOMING=...
    python deployments/serve.py --check       # what would be served, and which variables are unset
    python deployments/serve.py               # serve all of them until Ctrl-C
    python deployments/serve.py --only on-demand,nightly-ingest

The deployments, schedules, parameters and concurrency limits are those of the repository's `prefect.yaml` (also
applied by `prefect deploy --all` for work pools): see deployments/definitions.py. A deployment whose
parameters do not validate (e.g. MEDPIPE_STORE unset) is reported in one line and not served.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.definitions import REPO, DeploymentSpec, load_deployments  # noqa: E402


def parameter_problem(spec: DeploymentSpec) -> str | None:
    """Why the deployment's parameters would be refused at run time (one line), else None."""
    from medpipe.pipeline.params import PipelineParamsError, validate_params

    try:
        validate_params(spec.parameters)
    except PipelineParamsError as exc:
        unset = f" (unset: {', '.join(spec.unset)})" if spec.unset else ""
        return f"{spec.name}: {str(exc).splitlines()[0]}{unset}"
    return None


def runner_deployment(spec: DeploymentSpec):  # -> prefect.deployments.runner.RunnerDeployment
    """The deployment as Prefect's `serve` takes it."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    path, name = spec.entrypoint.split(":")
    flow = load_flow_from_entrypoint(f"{REPO / path}:{name}")
    return flow.to_deployment(
        name=spec.name, description=spec.description, tags=list(spec.tags), parameters=spec.parameters,
        schedules=[Cron(cron, timezone=tz) for cron, tz in spec.crons] or None,
        concurrency_limit=ConcurrencyLimitConfig(**spec.concurrency) if spec.concurrency else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated deployment names (default: all)")
    parser.add_argument("--check", action="store_true", help="print the resolved deployments and problems; serve nothing")
    parser.add_argument("--limit", type=int, default=None, help="most flow runs at once in this process")
    args = parser.parse_args(argv)

    specs = load_deployments()
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - {s.name for s in specs}
        if unknown:
            print(f"error: no deployment named {', '.join(sorted(unknown))} in prefect.yaml", file=sys.stderr)
            return 2
        specs = [s for s in specs if s.name in wanted]
    problems = {s.name: p for s in specs if (p := parameter_problem(s))}
    for line in problems.values():
        print(f"not served: {line}", file=sys.stderr)
    ready = [s for s in specs if s.name not in problems]
    if args.check:
        print(json.dumps([s.to_dict() for s in ready], indent=1))
        return 0 if not problems else 1
    if not ready:
        print("error: nothing to serve (see the lines above)", file=sys.stderr)
        return 2
    if not os.environ.get("PREFECT_API_URL"):
        print("note: PREFECT_API_URL is unset: serving against a temporary local server that the UI cannot see "
              "(start `prefect server start` and export PREFECT_API_URL for a real one)", file=sys.stderr)
    from prefect import serve

    os.chdir(REPO)  # runs load their flow from the entrypoint, relative to the checkout
    serve(*[runner_deployment(s) for s in ready], limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
