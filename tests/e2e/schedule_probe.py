"""A trivial flow served on schedules, for tests/test_schedules.py: proves that a real `prefect server` schedules
runs of served deployments and that the served process starts them.

    python -m tests.e2e.schedule_probe      # serves e2e-schedule-probe/every-minute (cron) and /every-5-seconds
"""

from __future__ import annotations

from prefect import flow, serve

FLOW = "e2e-schedule-probe"
CRON_DEPLOYMENT = "every-minute"
INTERVAL_DEPLOYMENT = "every-5-seconds"


@flow(name=FLOW)
def probe() -> str:
    """Does nothing but complete."""
    return "ran"


if __name__ == "__main__":
    serve(probe.to_deployment(name=CRON_DEPLOYMENT, cron="* * * * *"),
          probe.to_deployment(name=INTERVAL_DEPLOYMENT, interval=5))
