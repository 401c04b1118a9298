"""A trivial flow served on a cron schedule, for tests/test_schedules.py: proves that a real `prefect server`
schedules runs of a served deployment and that the served process starts them.

    python -m tests.e2e.schedule_probe "* * * * *"     # serves e2e-schedule-probe/every-minute
"""

from __future__ import annotations

import sys

from prefect import flow

FLOW = "e2e-schedule-probe"
DEPLOYMENT = "every-minute"


@flow(name=FLOW)
def probe() -> str:
    """Does nothing but complete."""
    return "ran"


if __name__ == "__main__":
    probe.serve(name=DEPLOYMENT, cron=sys.argv[1] if len(sys.argv) > 1 else "* * * * *")
