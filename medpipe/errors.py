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


class UserError(Exception):
    """Something the user can fix; its message is one line, shown as is."""


class InfrastructureError(RuntimeError):
    """Storage, network or cluster trouble: retried, never a quarantine reason."""
