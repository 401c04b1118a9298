"""Error classes that say whose problem it is.

`UserError`: bad input, a missing file, a wrong key, a bad config — something the user can fix. The CLI prints its
message as one line and exits 2. Every other exception is a medpipe bug or an infrastructure failure: the CLI
prints one line saying where the full traceback was written and exits 1.

`InfrastructureError`: storage, network or cluster trouble (credentials, connections, timeouts, a lost worker).
It fails the task so that Prefect retries it, and fails the run if it persists; it never becomes a per-file
quarantine record.

Messages of both must never hold a source path or a header value (they may name a patient): Prefect stores
exceptions in its database.
"""

from __future__ import annotations

import datetime as dt
import os
import traceback
import uuid
from pathlib import Path


class UserError(Exception):
    """Something the user can fix; its message is one line, shown as is."""


class InfrastructureError(RuntimeError):
    """Storage, network or cluster trouble: retried, never a quarantine reason."""


class StepFailed(RuntimeError):
    """What leaves a pipeline step in place of an unexpected exception: its type and where the traceback is."""


def write_traceback(exc: BaseException, folder: str | os.PathLike[str] | None = None) -> Path:
    """Write the full traceback of `exc` to a new file readable by the user only; returns its path.

    Tracebacks can hold paths and values that name a patient, so they stay on local disk: never in Prefect's
    database, logs or results. Folder: `folder`, else $MEDPIPE_LOG_DIR, else ~/.medpipe/errors."""
    base = Path(folder or os.environ.get("MEDPIPE_LOG_DIR") or Path.home() / ".medpipe" / "errors")
    base.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = base / f"medpipe-{stamp}-{uuid.uuid4().hex[:8]}.txt"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write("".join(traceback.format_exception(exc)))
    return path


def safe_exception(step: str, exc: BaseException) -> BaseException:
    """The exception a step may let Prefect see: medpipe's own (their messages carry no PHI by contract) as they
    are, anything else as a StepFailed naming only its type and the local traceback file."""
    if isinstance(exc, (UserError, InfrastructureError, StepFailed)):
        return exc
    try:
        where = f"; traceback in {write_traceback(exc)} on the machine that ran it"
    except OSError:
        where = ""
    return StepFailed(f"{step} failed with {type(exc).__name__}{where}")
