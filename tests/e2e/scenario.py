"""Steps of the end-to-end scenarios, shared by `tests/test_e2e.py` and `make e2e` (tests/e2e/run_e2e.py):
demo data on S3, triggering a deployment with the real `prefect` CLI, waiting through the Prefect API, the states
of a flow run's whole tree, and killing a Dask worker while a step is provably in flight."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, cast
from uuid import UUID

from tests.e2e.flaky_s3 import FlakyS3Proxy
from tests.e2e.processes import BIN, REPO, DaskCluster, MotoS3

DEMO_KEY = "medpipe-demo-key-NOT-SECRET-public-never-use-for-real-data"
BUCKET = "medpipe-e2e"
CLASSES = ["none", "lesion"]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# a run queued by a deployment's concurrency limit retries every 2 s instead of 30 s (a server setting)
QUICK_QUEUE = {"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}
ARCHIVE_WRITE = r"^PUT /[^/]+/.+/archive/[^/]+/"  # a worker writing an archive image (not the store's root groups)


@dataclass
class Timings:
    """Wall-clock seconds of named phases, in order; `table()` prints them."""

    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begin = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = time.monotonic() - begin

    def table(self) -> str:
        width = max((len(k) for k in self.phases), default=5)
        rows = [f"{'phase':<{width}}  seconds", f"{'-' * width}  -------"]
        rows += [f"{name:<{width}}  {secs:7.1f}" for name, secs in self.phases.items()]
        return "\n".join(rows)


def write_demo_source(folder: Path, patients: int = 3, images: int = 2, size: int = 64, seed: int = 3) -> Path:
    """A small 2D demo dataset (DICOM X-rays and PNGs, no CT) with its labels manifest; returns its folder."""
    from medpipe.demo import DemoSpec, generate_demo_dataset

    generate_demo_dataset(folder, DemoSpec(patients=patients, studies_per_patient=1, xray_per_study=images,
                                           png_per_study=images, ct_series_per_study=0, image_size=size, seed=seed))
    return folder


def upload(fs: Any, folder: Path, url: str) -> None:
    """Copy a local folder to s3://bucket/prefix (creating the bucket)."""
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(f"{folder}/", url.removeprefix("s3://") + "/", recursive=True)


def store_summary(url: str, s3: MotoS3 | None = None) -> dict[str, Any]:
    """The medpipe attributes of a store (content hash, counts, ...); an s3:// store is read straight from `s3`."""
    import zarr

    from medpipe.store import store_attrs

    options = s3.storage_options() if url.startswith("s3://") and s3 is not None else None
    return store_attrs(zarr.open_group(url, mode="r", storage_options=options))


def trigger(deployment: str, params: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """`prefect deployment run DEPLOYMENT -p k=json ...` (the real CLI, in its own process); the flow run id."""
    argv = [str(BIN / "prefect"), "deployment", "run", deployment]
    for name, value in params.items():
        argv += ["-p", f"{name}={json.dumps(value)}"]
    done = subprocess.run(argv, cwd=REPO, env={**_base_env(), **env}, capture_output=True, text=True, timeout=120)
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"prefect deployment run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return found.group(1)


def submit(api_url: str, deployment: str, params: Mapping[str, Any]) -> str:
    """Create a run of DEPLOYMENT through the API (as `trigger` does, without a CLI process); the flow run id."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        run = cast(FlowRun, run_deployment(deployment, parameters=dict(params), timeout=0))  # sync caller
    return str(run.id)


def _base_env() -> dict[str, str]:
    """This process's environment without its Prefect settings (the caller's `env` names the server)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}


@contextmanager
def prefect_client(api_url: str) -> Iterator[Any]:
    """A synchronous Prefect client on `api_url` (this process's own settings are left alone)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            yield client


def read_flow_run(api_url: str, flow_run_id: str) -> Any:
    with prefect_client(api_url) as client:
        return client.read_flow_run(flow_run_id)


def state_of(api_url: str, flow_run_id: str) -> str:
    """The state type of a flow run (e.g. "RUNNING"), or "SCHEDULED" while it has none yet."""
    run = read_flow_run(api_url, flow_run_id)
    return run.state.type.value if run.state else "SCHEDULED"


def wait_final(api_url: str, flow_run_id: str, timeout: float, interval: float = 1.0) -> Any:
    """Poll the flow run until it is in a final state; TimeoutError (naming its last state) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        run = read_flow_run(api_url, flow_run_id)
        if run.state and run.state.type.value in FINAL:
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow run {run.name} still {run.state.name if run.state else 'unscheduled'} "
                               f"after {timeout:.0f} s")
        time.sleep(interval)


def wait_state(api_url: str, flow_run_id: str, states: set[str], timeout: float) -> str:
    """Poll until the flow run's state type is one of `states` (or final); returns it (or the last seen)."""
    deadline = time.monotonic() + timeout
    seen = state_of(api_url, flow_run_id)
    while seen not in states | FINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = state_of(api_url, flow_run_id)
    return seen


@dataclass(frozen=True)
class RunTree:
    """A flow run, its subflow runs (recursively) and all their task runs."""

    flow_runs: list[Any]
    task_runs: list[Any]

    def not_completed(self) -> list[str]:
        """'kind name: STATE' of every run in the tree that is not Completed."""
        bad = [("flow", r) for r in self.flow_runs if not (r.state and r.state.is_completed())]
        bad += [("task", r) for r in self.task_runs if not (r.state and r.state.is_completed())]
        return [f"{kind} {r.name}: {r.state.name if r.state else 'no state'}" for kind, r in bad]

    def task_names(self) -> list[str]:
        return sorted(r.name for r in self.task_runs)


def run_tree(api_url: str, flow_run_id: str) -> RunTree:
    """Every flow run under `flow_run_id` (itself included) and every task run of those."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with prefect_client(api_url) as client:
        flows = [client.read_flow_run(flow_run_id)]
        frontier = [flows[0].id]
        while frontier:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            flows += children
            frontier = [c.id for c in children]
        ids = [f.id for f in flows]
        tasks: list[Any] = []
        while True:  # the API answers at most 200 a page
            page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200,
                                         offset=len(tasks))
            tasks += page
            if len(page) < 200:
                break
    return RunTree(flows, tasks)


def flow_run_logs(api_url: str, flow_run_id: str) -> list[str]:
    """The messages a flow run logged to the API."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with prefect_client(api_url) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])))
    return [log.message for log in logs]


@dataclass(frozen=True)
class Kill:
    """A Dask worker killed while a step was in flight."""

    worker: int
    pid: int
    busy: list[int]
    held_for: float


def kill_worker_in_flight(cluster: DaskCluster, proxy: FlakyS3Proxy, timeout: float,
                          pattern: str = ARCHIVE_WRITE) -> Kill:
    """Hold the S3 requests matching `pattern` (by default: archive image writes) at the proxy; once one arrives,
    SIGKILL a worker that is processing a task (one whose write is held), then let the requests through."""
    arrived = proxy.hold(pattern)
    begin = time.monotonic()
    try:
        if not arrived.wait(timeout):
            raise TimeoutError(f"no S3 request matched {pattern!r} within {timeout:.0f} s")
        busy: list[int] = []
        while not busy and time.monotonic() - begin < timeout:
            busy = cluster.busy_workers()
        if not busy:
            raise TimeoutError("no Dask worker was processing a task while the writes were held")
        pid = cluster.kill_worker(busy[0])
        return Kill(worker=busy[0], pid=pid, busy=busy, held_for=time.monotonic() - begin)
    finally:
        proxy.release()
