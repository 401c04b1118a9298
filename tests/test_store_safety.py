"""Store safety without a flow: the lock's rules, infrastructure errors vs bad files, what leaves a task."""

from __future__ import annotations

import datetime as dt
import json
import os

import fsspec
import pytest

from medpipe.deid import DeidKey
from medpipe.errors import InfrastructureError, StepFailed, UserError, safe_exception
from medpipe.ingest.lock import (LOCK_NAME, LockLostError, StoreLockedError, acquire_lock, check_lock, read_lock,
                                 release_lock)
from medpipe.ingest.scan import scan_shard

KEY = DeidKey(b"store-safety-key-5c1e9d47a3f08b62d7e4c19a")


def test_lock_refuses_a_second_run_and_is_released(tmp_path):
    store = str(tmp_path / "s.zarr")
    acquire_lock(store, "a" * 32)
    with pytest.raises(StoreLockedError, match="expires at"):
        acquire_lock(store, "b" * 32)
    check_lock(store, "a" * 32)  # the holder passes and renews
    with pytest.raises(LockLostError):
        check_lock(store, "b" * 32)
    release_lock(store, "b" * 32)  # only the holder releases
    assert read_lock(store) is not None
    release_lock(store, "a" * 32)
    assert read_lock(store) is None and not os.path.exists(os.path.join(store, LOCK_NAME))


def test_stale_locks_are_taken_over(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    future = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).isoformat(timespec="seconds")
    dead = {"run_id": "d" * 32, "host": os.uname().nodename, "pid": 2**22 + 12345, "acquired": future,
            "expires": future}  # this host, a process that does not exist: a killed run
    (store / LOCK_NAME).write_text(json.dumps(dead))
    assert acquire_lock(str(store), "e" * 32).run_id == "e" * 32
    release_lock(str(store), "e" * 32)


def test_lock_on_an_object_store(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.mkdir("/locktest")
    acquire_lock("memory://locktest/s.zarr", "a" * 32)
    with pytest.raises(StoreLockedError):
        acquire_lock("memory://locktest/s.zarr", "b" * 32)
    release_lock("memory://locktest/s.zarr", "a" * 32)
    assert read_lock("memory://locktest/s.zarr") is None


class _Unreachable(fsspec.AbstractFileSystem):
    """A filesystem whose every open fails the way a worker without network or credentials does."""

    protocol = "unreachable"

    def _open(self, path, mode="rb", **kwargs):
        raise ConnectionError("connection refused by 10.0.0.9 while reading /data/DOE_JOHN/1.dcm")


def test_storage_errors_fail_the_task_instead_of_quarantining(monkeypatch):
    from medpipe.ingest import scan

    monkeypatch.setattr(scan, "source_fs", lambda url: (_Unreachable(), "/data"))
    with pytest.raises(InfrastructureError) as raised:
        scan_shard("unreachable://data", [(0, "DOE_JOHN/1.dcm")], KEY, 1 << 30)
    assert "DOE_JOHN" not in str(raised.value) and "10.0.0.9" not in str(raised.value)


def test_only_safe_exceptions_leave_a_task(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPIPE_LOG_DIR", str(tmp_path / "errors"))
    bug = ValueError("cannot parse /data/DOE_JOHN_12345678/IM0001.dcm")
    safe = safe_exception("archive-shard", bug)
    assert isinstance(safe, StepFailed) and "DOE_JOHN" not in str(safe) and "ValueError" in str(safe)
    written = list((tmp_path / "errors").iterdir())
    assert len(written) == 1 and "DOE_JOHN" in written[0].read_text()  # the traceback stays on local disk
    assert oct(written[0].stat().st_mode & 0o777) == "0o600"
    for own in (UserError("bad config"), InfrastructureError("ConnectionError reading a source file")):
        assert safe_exception("scan-shard", own) is own


def test_cli_refuses_a_locked_store_before_any_server_starts(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from medpipe.cli import app
    from tests.conftest import TEST_KEY

    source, store = tmp_path / "src", tmp_path / "s.zarr"
    source.mkdir()
    acquire_lock(str(store), "f" * 32)
    monkeypatch.setenv("MEDPIPE_DEID_KEY", TEST_KEY)
    result = CliRunner().invoke(app, ["ingest", str(source), str(store), "--no-progress"], env={"COLUMNS": "30"})
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "expires at" in lines[0], result.output
    release_lock(str(store), "f" * 32)


def test_lease_renewals_of_one_run_never_see_a_torn_lock(tmp_path):
    """Writing steps of one run renew the lease concurrently (Dask threads/processes): a reader must never see the
    lock half-rewritten, which it would take for a lost lock (LockLostError killed a 2-worker ingest)."""
    import threading

    from medpipe.ingest.lock import acquire_lock, check_lock, new_run_id

    run_id = new_run_id()
    acquire_lock(str(tmp_path), run_id)
    errors: list[str] = []

    def renew() -> None:
        for _ in range(200):
            try:
                check_lock(str(tmp_path), run_id)
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(type(exc).__name__)

    threads = [threading.Thread(target=renew) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
