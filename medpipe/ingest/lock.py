"""One writer per store: a lock object with a run id and a lease, on local disks and object stores alike.

`STORE/medpipe.lock` holds `{run_id, host, pid, acquired, expires, flow_run_id}`. An ingest takes it before it
touches the store, every step that writes checks that it still holds it (and extends the lease), and the run
releases it when it is done. A lock is stale, and may be taken over, when its lease has expired, or when it was
taken on this host by a process that no longer exists (a run killed with SIGKILL can be rerun at once on the same
machine). `flow_run_id` is the orchestrator's id of the run that holds the lock (a Prefect flow run): a killed run
cannot report its own end, so whoever takes over a stale lock is handed the stale lock (`on_stale`) and can mark
that run as crashed (flows/runtime.py does, through the Prefect API; this module knows nothing of Prefect).

Written by hand because neither zarr nor fsspec offers a lock that works on S3. Creating the lock is atomic on a
local disk (`O_CREAT | O_EXCL`); on an object store the lock is written and read back after a short pause, and
the run that reads its own id back holds it (object stores have no portable compare-and-swap through fsspec; two
runs starting within that pause of each other are the remaining window, and every writing step re-checks).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import fsspec

from medpipe.errors import UserError
from medpipe.store import store_fs
from medpipe.ingest.discover import is_local_fs

LOCK_NAME = "medpipe.lock"
DEFAULT_LEASE_S = 600.0  # extended by every writing step; a step longer than this would lose the lock
_SETTLE_S = 0.5  # object stores: pause between writing the lock and reading it back


class StoreLockedError(UserError):
    """Another run holds the store's lock."""


class LockLostError(UserError):
    """This run no longer holds the store's lock (its lease expired and another run took it): stop writing."""


@dataclass(frozen=True)
class StoreLock:
    """The content of the lock object."""

    run_id: str
    host: str
    pid: int
    acquired: str
    expires: str
    flow_run_id: str | None = None  # absent in locks written before it was recorded

    @classmethod
    def from_json(cls, data: Any) -> StoreLock:
        """A lock from its JSON form; keys this version does not know are ignored (a newer writer's)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(data).items() if k in known})

    def expired(self, now: dt.datetime | None = None) -> bool:
        return (now or _now()) >= dt.datetime.fromisoformat(self.expires)

    def dead_here(self) -> bool:
        """Taken on this host by a process that is gone (killed run)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def stale(self) -> bool:
        return self.expired() or self.dead_here()

    def stale_reason(self) -> str:
        """Why the lock is stale, in words (for the message that marks its run crashed)."""
        if self.dead_here():
            return f"its process (pid {self.pid} on {self.host}) no longer exists"
        return f"its lease expired at {self.expires} UTC without being renewed"


def new_run_id() -> str:
    return uuid.uuid4().hex


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def lock_url(store_url: str) -> str:
    """The URL (or path) of the lock object of a store, as given to any fsspec filesystem."""
    return f"{store_url.rstrip('/')}/{LOCK_NAME}"


def _path(store_url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = store_fs(store_url)
    return fs, f"{root}/{LOCK_NAME}"




def _write(fs: fsspec.AbstractFileSystem, path: str, payload: bytes) -> None:
    """Replace the lock object whole: readers never see it half-written (a concurrent `check_lock` of the same run
    would take a torn lock for a lost one). Local disks: a temporary file renamed over it (atomic on POSIX); object
    stores: one PUT, which replaces an object atomically."""
    if is_local_fs(fs):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, payload)


def read_lock(store_url: str) -> StoreLock | None:
    """The lock now on the store, or None (absent or unreadable: a half-written lock counts as none)."""
    fs, path = _path(store_url)
    try:
        return StoreLock.from_json(json.loads(fs.cat_file(path)))
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None


def _lock_for(run_id: str, lease_s: float, flow_run_id: str | None) -> StoreLock:
    now = _now()
    return StoreLock(run_id, socket.gethostname(), os.getpid(), now.isoformat(timespec="seconds"),
                     (now + dt.timedelta(seconds=lease_s)).isoformat(timespec="seconds"), flow_run_id)


def _refuse(current: StoreLock) -> StoreLockedError:
    return StoreLockedError(
        f"the store is being written by another ingest (run {current.run_id[:8]}, started {current.acquired}); its "
        f"lock expires at {current.expires} UTC unless renewed. Wait for it, or remove {LOCK_NAME} from the store if "
        "you are sure no run is writing it")


def check_unlocked(store_url: str) -> None:
    """Raise StoreLockedError (one line, naming when the lock expires) if another run holds the store's lock."""
    current = read_lock(store_url)
    if current is not None and not current.stale():
        raise _refuse(current)


def acquire_lock(store_url: str, run_id: str, lease_s: float = DEFAULT_LEASE_S, flow_run_id: str | None = None,
                 on_stale: Callable[[StoreLock], None] | None = None) -> StoreLock:
    """Take the store's lock for `run_id`; raises StoreLockedError (one line, with the expiry) if another run holds it.

    `flow_run_id` is recorded in the lock; `on_stale` is called with a stale lock of another run just before it is
    taken over (to mark that run as crashed: it cannot say so itself)."""
    fs, path = _path(store_url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    current = read_lock(store_url)
    if current is not None and current.run_id != run_id:
        if not current.stale():
            raise _refuse(current)
        if on_stale is not None:
            on_stale(current)
        fs.rm(path)
    mine = _lock_for(run_id, lease_s, flow_run_id)
    payload = json.dumps(asdict(mine)).encode()
    if is_local_fs(fs):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = read_lock(store_url)
            if other is not None and other.run_id != run_id:
                raise _refuse(other) from None
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            return mine
    fs.pipe_file(path, payload)
    time.sleep(0 if is_local_fs(fs) else _SETTLE_S)
    held = read_lock(store_url)
    if held is None or held.run_id != run_id:
        raise _refuse(held or mine)
    return mine


def check_lock(store_url: str, run_id: str, lease_s: float = DEFAULT_LEASE_S) -> None:
    """Called by every writing step: raise LockLostError unless `run_id` holds the lock; extend its lease."""
    current = read_lock(store_url)
    if current is None or current.run_id != run_id:
        raise LockLostError("this ingest no longer holds the store's lock (another run took it over): stopping "
                            "before writing")
    fs, path = _path(store_url)
    renewed = StoreLock(current.run_id, current.host, current.pid, current.acquired,
                        (_now() + dt.timedelta(seconds=lease_s)).isoformat(timespec="seconds"), current.flow_run_id)
    _write(fs, path, json.dumps(asdict(renewed)).encode())


def release_lock(store_url: str, run_id: str) -> None:
    """Remove the lock if `run_id` holds it."""
    current = read_lock(store_url)
    if current is not None and current.run_id == run_id:
        fs, path = _path(store_url)
        fs.rm(path)
