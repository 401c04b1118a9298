"""One pipeline per OUTPUT at a time: the store lock (medpipe.ingest.lock) taken on the OUTPUT url, with a longer
lease (renewed after every stage) and a message that names the pipeline."""

from __future__ import annotations

from typing import Callable

from medpipe.errors import UserError
from medpipe.ingest.lock import (StoreLock, StoreLockedError, acquire_lock, check_lock, read_lock,
                                 release_lock)

PIPELINE_LEASE_S = 4 * 3600.0  # a stage (GAN training on CPU) can take over an hour; renewed after each stage


class PipelineLockedError(UserError):
    """Another pipeline run holds OUTPUT's lock."""


def _refusal(output: str, current: StoreLock | None) -> PipelineLockedError:
    held = (f" (run {current.run_id[:8]}, started {current.acquired}; its lock expires at {current.expires} UTC "
            "unless renewed)") if current else ""
    return PipelineLockedError(f"another pipeline run is writing {output}{held}: wait for it, or remove "
                               f"medpipe.lock from OUTPUT if you are sure no run is writing it")


def check_output_unlocked(output: str) -> None:
    """Refuse (one line) when another live run holds OUTPUT's lock."""
    current = read_lock(output)
    if current is not None and not current.stale():
        raise _refusal(output, current)


def acquire_output_lock(output: str, run_id: str, flow_run_id: str | None = None,
                        on_stale: Callable[[StoreLock], None] | None = None) -> None:
    """Take OUTPUT's lock for `run_id`, or raise PipelineLockedError (one line). `flow_run_id` is recorded in the
    lock, and `on_stale` gets the lock of a killed run before it is taken over (see acquire_lock)."""
    try:
        acquire_lock(output, run_id, PIPELINE_LEASE_S, flow_run_id=flow_run_id, on_stale=on_stale)
    except StoreLockedError:
        raise _refusal(output, read_lock(output)) from None


def renew_output_lock(output: str, run_id: str) -> None:
    """Extend the lease (after each stage); LockLostError when another run took the lock over."""
    check_lock(output, run_id, PIPELINE_LEASE_S)


def release_output_lock(output: str, run_id: str) -> None:
    """Give the lock back (when `run_id` holds it)."""
    release_lock(output, run_id)
