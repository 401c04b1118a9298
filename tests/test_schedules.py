"""Schedules fire: deployments served with a cron and an interval schedule against a real `prefect server` (a
separate process) get Scheduled flow runs (the cron one on minute boundaries), and a scheduled run actually starts
at its time and completes. This failed with SQLAlchemy 2.1 (the server's scheduler service died on "Can't evaluate
bulk DML statement", for every kind of schedule); SQLAlchemy is pinned to 2.0.

The server's scheduler loop runs every 2 s instead of 60 s and the runner polls every second instead of 10 s; the
run that is waited for is the 5-second interval one (the same scheduler service makes it), so the test does not
sit out a minute boundary."""

from __future__ import annotations

import datetime as dt
import sys
import time

import pytest

from tests.e2e.processes import PrefectServer, ServedFlows, Stack
from tests.e2e.schedule_probe import CRON_DEPLOYMENT, FLOW, INTERVAL_DEPLOYMENT
from tests.e2e.scenario import prefect_client, wait_final

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SCHEDULER_ERRORS = ("Can't evaluate bulk DML", "Traceback", "ERROR")


def scheduled_runs(api_url: str, deployment: str) -> list:
    """The deployment's flow runs in state Scheduled, earliest first."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, \
        FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with prefect_client(api_url) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.SCHEDULED]))))
    return sorted(runs, key=lambda r: r.expected_start_time)


def wait_for_scheduled(api_url: str, deployment: str, count: int, timeout: float = 30) -> list:
    """The deployment's Scheduled runs once there are `count` of them (or whatever there is after `timeout` s).

    The two deployments are registered one after the other, so one scheduler loop may see only the first."""
    deadline = time.monotonic() + timeout
    runs = scheduled_runs(api_url, deployment)
    while len(runs) < count and time.monotonic() < deadline:
        time.sleep(1)
        runs = scheduled_runs(api_url, deployment)
    return runs


def test_cron_deployment_gets_scheduled_runs_that_start(tmp_path):
    with Stack(tmp_path) as stack:
        server = PrefectServer(tmp_path, settings={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"})
        stack.start(server)
        cron, interval = f"{FLOW}/{CRON_DEPLOYMENT}", f"{FLOW}/{INTERVAL_DEPLOYMENT}"
        served = ServedFlows(tmp_path, [sys.executable, "-m", "tests.e2e.schedule_probe"],
                             {**server.client_env(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, server.api_url,
                             [cron, interval])
        stack.start(served)

        runs = wait_for_scheduled(server.api_url, cron, 2)
        assert len(runs) >= 2, f"the scheduler made {len(runs)} Scheduled cron run(s) in 30 s"
        starts = [r.expected_start_time for r in runs]
        assert all(s.second == 0 and s.microsecond == 0 for s in starts)
        assert all(b - a == dt.timedelta(minutes=1) for a, b in zip(starts, starts[1:]))

        interval_runs = wait_for_scheduled(server.api_url, interval, 1)
        assert interval_runs, "the scheduler made no Scheduled interval run in 30 s"
        first = interval_runs[0]
        wait = (first.expected_start_time - dt.datetime.now(dt.timezone.utc)).total_seconds()
        assert wait <= 30  # a few intervals at most (earlier ones may already be running)
        finished = wait_final(server.api_url, str(first.id), timeout=max(wait, 0) + 45)
        assert finished.state.is_completed(), stack.tails()
        # it ran at its time (the runner may submit a run a moment early: it prefetches scheduled runs)
        assert abs(finished.start_time - first.expected_start_time) < dt.timedelta(seconds=30)
        log = server.processes[0].log.read_text(errors="replace")
        assert not [e for e in SCHEDULER_ERRORS if e in log], stack.tails()
