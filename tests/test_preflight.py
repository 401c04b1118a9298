"""Checks before any work (medpipe.preflight) and the CLI's error rule: user errors one line exit 2, bugs exit 1
with the traceback saved to a 0600 file. Fast: no Prefect server, no Dask, no network beyond loopback."""

from __future__ import annotations

import re
import socket
import stat
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medpipe.errors import InfrastructureError, UserError
from medpipe.preflight import (
    ConfigFileError,
    SchedulerUnreachableError,
    SourceNotAFolderError,
    SourceNotFoundError,
    StorageUnreachableError,
    StorePathError,
    check_config_file,
    check_ingest_paths,
    check_scheduler_reachable,
    check_storage_reachable,
)

runner = CliRunner()
STRONG_KEY = "55481e32071a33e7531f14006c8382283faa5194bd1504c660a423639f02dd19"


def _closed_port() -> int:
    """A loopback port nothing listens on: bind, read the port, close."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


# ---------------------------------------------------------------- paths


@pytest.fixture()
def source(tmp_path) -> Path:
    root = tmp_path / "source"
    (root / "p1").mkdir(parents=True)
    (root / "p1" / "img.png").write_bytes(b"x")
    return root


def test_good_paths_pass(source, tmp_path):
    check_ingest_paths(str(source), str(tmp_path / "store.zarr"))
    check_ingest_paths(str(source), str(tmp_path / "source-store.zarr"))  # a shared name prefix is not inside
    check_ingest_paths(str(source), str(source / ".cache" / "s.zarr"))  # hidden: discovery skips it
    check_ingest_paths(f"file://{source}", str(tmp_path / "store.zarr"))
    check_ingest_paths(str(source), "s3://bucket/store.zarr")  # local and remote never overlap


def test_missing_or_file_source(source, tmp_path):
    with pytest.raises(SourceNotFoundError, match="not found") as missing:
        check_ingest_paths(str(tmp_path / "nowhere"), str(tmp_path / "s.zarr"))
    assert isinstance(missing.value, UserError) and isinstance(missing.value, FileNotFoundError)
    with pytest.raises(SourceNotAFolderError, match="not a folder"):
        check_ingest_paths(str(source / "p1" / "img.png"), str(tmp_path / "s.zarr"))


def test_store_that_is_a_file(source, tmp_path):
    file = tmp_path / "store.zarr"
    file.write_text("not a store")
    with pytest.raises(StorePathError, match="is a file; give a folder path or URL for the Zarr store"):
        check_ingest_paths(str(source), str(file))


def test_store_inside_source_and_source_inside_store(source, tmp_path):
    with pytest.raises(StorePathError, match="would ingest the store's own files on every rerun"):
        check_ingest_paths(str(source), str(source / "out" / "s.zarr"))
    with pytest.raises(StorePathError, match="inside SOURCE"):
        check_ingest_paths(str(source), str(source))
    with pytest.raises(StorePathError, match="inside SOURCE"):  # relative and dotted spellings are resolved
        check_ingest_paths(str(source / "p1" / ".."), str(source / "p1" / "s.zarr"))
    link = tmp_path / "link"
    link.symlink_to(source)
    with pytest.raises(StorePathError, match="inside SOURCE"):  # symlinks are followed
        check_ingest_paths(str(source), str(link / "s.zarr"))
    with pytest.raises(StorePathError, match="SOURCE .* is inside STORE"):
        check_ingest_paths(str(source / "p1"), str(source))


def test_url_containment_by_bucket_and_prefix():
    with pytest.raises(StorePathError, match="inside SOURCE"):
        check_ingest_paths("s3://bucket/in", "s3://bucket/in/store.zarr")
    with pytest.raises(StorePathError, match="inside SOURCE"):
        check_ingest_paths("s3://bucket", "s3a://bucket/store.zarr")
    with pytest.raises(StorePathError, match="is inside STORE"):
        check_ingest_paths("s3://bucket/store.zarr/archive", "s3://bucket/store.zarr/")
    check_ingest_paths("s3://bucket/in", "s3://bucket/input.zarr")
    check_ingest_paths("s3://bucket/in", "s3://other/in/store.zarr")
    check_ingest_paths("s3://bucket/in", "gs://bucket/in/store.zarr")


def test_config_file_checks(tmp_path):
    check_config_file(None)
    good = tmp_path / "good.yaml"
    good.write_text("workers: 2\n")
    check_config_file(good)
    with pytest.raises(ConfigFileError, match="not found"):
        check_config_file(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigFileError, match="mapping"):
        check_config_file(listing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ConfigFileError, match="YAML"):
        check_config_file(broken)


# ---------------------------------------------------------------- scheduler and storage


def test_scheduler_closed_port_fails_fast_with_one_line():
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(SchedulerUnreachableError, match=f"cannot reach Dask scheduler at 127.0.0.1:{port}") as err:
        check_scheduler_reachable(f"tcp://127.0.0.1:{port}", timeout=2.0)
    assert time.monotonic() - start < 3 and "\n" not in str(err.value)
    with pytest.raises(SchedulerUnreachableError, match=f"127.0.0.1:{port}"):
        check_scheduler_reachable(f"tls://127.0.0.1:{port}", timeout=2.0)
    with pytest.raises(SchedulerUnreachableError, match=f"127.0.0.1:{port}"):
        check_scheduler_reachable(f"127.0.0.1:{port}", timeout=2.0)  # a bare host:port is tcp to dask


def test_scheduler_that_is_not_dask_fails():
    with socket.socket() as server:  # accepts, never speaks
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with pytest.raises(SchedulerUnreachableError, match=f"127.0.0.1:{port} .*no Dask handshake within 0.5 s"):
            check_scheduler_reachable(f"tcp://127.0.0.1:{port}", timeout=0.5)

    def speak_http(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    with socket.socket() as server:  # another protocol on the port
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        thread = threading.Thread(target=speak_http, args=(server,), daemon=True)
        thread.start()
        with pytest.raises(SchedulerUnreachableError, match="does not speak the Dask protocol"):
            check_scheduler_reachable(f"tcp://127.0.0.1:{server.getsockname()[1]}", timeout=2.0)
        thread.join(5)
    check_scheduler_reachable("inproc://whatever")  # other transports are not probed


def test_real_dask_scheduler_passes():
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        check_scheduler_reachable(cluster.scheduler_address)


def test_storage_local_paths_pass(tmp_path):
    check_storage_reachable(str(tmp_path / "not-yet.zarr"))


def test_storage_unreachable_endpoint_fails_fast(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError) as err:
        check_storage_reachable("s3://some-bucket/DOE_JOHN/store.zarr")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "s3://some-bucket" in message and "EndpointConnectionError" in message and "AWS_ENDPOINT_URL" in message
    assert "DOE_JOHN" not in message and "\n" not in message  # only scheme://bucket is named


def test_storage_without_credentials_fails_fast(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError, match=r"s3://b \((NoCredentialsError|EndpointConnectionError)\)"):
        check_storage_reachable("s3://b/store.zarr")
    assert time.monotonic() - start < 10


def test_storage_reachable_on_moto(moto_s3):
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3}, skip_instance_cache=True).mkdir("preflight-bucket")
    check_storage_reachable("s3://preflight-bucket/new-store.zarr")  # a new store in an existing bucket is fine
    check_storage_reachable("s3://preflight-bucket")


# ---------------------------------------------------------------- the CLI error rule


@pytest.fixture()
def log_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "logs"
    monkeypatch.setenv("MEDPIPE_LOG_DIR", str(folder))
    return folder


def _fake_store_attrs(monkeypatch, exc: BaseException) -> None:
    import medpipe.store

    def broken(url_or_root):
        raise exc

    monkeypatch.setattr(medpipe.store, "store_attrs", broken)


def test_user_error_is_one_line_exit_2(tmp_path, log_dir, monkeypatch):
    from medpipe.cli import app
    from medpipe.store import StoreError

    _fake_store_attrs(monkeypatch, StoreError("no medpipe store here,\n  look   elsewhere"))
    line = _one_error_line(runner.invoke(app, ["info", str(tmp_path)]), 2)
    assert line == "error: no medpipe store here, look elsewhere"
    assert not log_dir.exists()  # nothing saved for a user error


def test_bug_is_exit_1_with_saved_traceback(tmp_path, log_dir, monkeypatch):
    from medpipe.cli import app

    _fake_store_attrs(monkeypatch, ValueError("a bug that mentions /data/DOE_JOHN/scan.dcm"))
    line = _one_error_line(runner.invoke(app, ["info", str(tmp_path)]), 1)
    match = re.fullmatch(r"error: internal error \(ValueError\); the full traceback is in (.+)", line)
    assert match, line
    assert "DOE_JOHN" not in line  # the message of a bug may hold paths: it stays in the file
    saved = Path(match.group(1))
    assert saved.parent == log_dir and saved.is_file()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    text = saved.read_text()
    assert "Traceback" in text and "ValueError: a bug that mentions /data/DOE_JOHN/scan.dcm" in text


def test_key_error_from_a_bug_is_not_a_user_error(tmp_path, log_dir, monkeypatch):
    from medpipe.cli import app

    _fake_store_attrs(monkeypatch, KeyError("counts"))
    line = _one_error_line(runner.invoke(app, ["info", str(tmp_path)]), 1)
    assert line.startswith("error: internal error (KeyError); the full traceback is in ")


def test_infrastructure_error_names_its_message_and_traceback(tmp_path, log_dir, monkeypatch):
    from medpipe.cli import app

    _fake_store_attrs(monkeypatch, InfrastructureError("storage timed out after 3 retries"))
    line = _one_error_line(runner.invoke(app, ["info", str(tmp_path)]), 1)
    assert line.startswith("error: storage timed out after 3 retries; the full traceback is in ")
    assert Path(line.rsplit(" ", 1)[1]).is_file()


def test_traceback_goes_to_home_without_log_dir(tmp_path, monkeypatch):
    from medpipe.cli import app

    monkeypatch.delenv("MEDPIPE_LOG_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _fake_store_attrs(monkeypatch, RuntimeError("bug"))
    line = _one_error_line(runner.invoke(app, ["info", str(tmp_path)]), 1)
    saved = Path(line.rsplit(" ", 1)[1])
    assert saved.parent == tmp_path / "home" / ".medpipe" / "errors" and saved.is_file()


def test_unwrap_prefect_wrappers_and_groups():
    from prefect.exceptions import FailedRun

    from medpipe.cli import unwrap

    original = UserError("bad")
    wrapped = FailedRun("flow failed")
    wrapped.__cause__ = original
    assert unwrap(wrapped) is original
    assert unwrap(ExceptionGroup("tasks", [wrapped])) is original
    plain = ValueError("x")
    plain.__cause__ = original  # a cause of a non-Prefect exception is not the error
    assert unwrap(plain) is plain


def test_store_given_as_file_and_bad_config_are_user_errors(tmp_path, log_dir):
    from medpipe.cli import app

    file = tmp_path / "store.zarr"
    file.write_text("x")
    assert "is a file" in _one_error_line(runner.invoke(app, ["info", str(file)]), 2)
    listing = tmp_path / "c.yaml"
    listing.write_text("- 1\n")
    line = _one_error_line(runner.invoke(app, ["ingest", str(tmp_path), str(tmp_path / "s.zarr"),
                                               "--config", str(listing)]), 2)
    assert "mapping" in line


def test_info_on_unreachable_s3_is_one_line(monkeypatch, log_dir):
    from medpipe.cli import app

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
    start = time.monotonic()
    line = _one_error_line(runner.invoke(app, ["info", "s3://bucket/store.zarr"]), 2)
    assert time.monotonic() - start < 10
    assert "cannot reach storage s3://bucket (EndpointConnectionError)" in line


def _fake_flows_ingest(monkeypatch, calls: list[dict]) -> None:
    """Stand in for flows.ingest (no Prefect import): records how run_ingest is called."""

    def run_ingest(source, store, config, **kwargs):
        calls.append({"source": source, "store": store, **kwargs})
        return {"noop": True, "accounting": "discovered 1 = ingested 1 + quarantined 0", "warnings": []}

    monkeypatch.setitem(sys.modules, "flows.ingest", types.SimpleNamespace(run_ingest=run_ingest))


def test_ingest_preflight_refuses_before_any_work(source, tmp_path, log_dir, monkeypatch):
    from medpipe.cli import app

    calls: list[dict] = []
    _fake_flows_ingest(monkeypatch, calls)
    monkeypatch.setenv("MEDPIPE_DEID_KEY", STRONG_KEY)
    port = _closed_port()
    cases = [
        ([str(source), str(source / "s.zarr")], "inside SOURCE"),
        ([str(source), str(source / "s.zarr"), "--key-secret", "medpipe-deid-key"], "inside SOURCE"),
        ([str(tmp_path / "nowhere"), str(tmp_path / "s.zarr")], "not found"),
        ([str(source), str(tmp_path / "s.zarr"), "--scheduler", f"tcp://127.0.0.1:{port}"],
         f"cannot reach Dask scheduler at 127.0.0.1:{port}"),
    ]
    for args, expect in cases:
        start = time.monotonic()
        line = _one_error_line(runner.invoke(app, ["ingest", *args, "--no-progress"]), 2)
        assert expect in line and time.monotonic() - start < 10
    monkeypatch.setenv("MEDPIPE_DASK_SCHEDULER", f"tcp://127.0.0.1:{port}")
    assert "cannot reach Dask scheduler" in _one_error_line(
        runner.invoke(app, ["ingest", str(source), str(tmp_path / "s.zarr")]), 2)
    assert calls == []


def test_ingest_passes_retry_quarantined(source, tmp_path, log_dir, monkeypatch):
    from medpipe.cli import app

    calls: list[dict] = []
    _fake_flows_ingest(monkeypatch, calls)
    monkeypatch.setenv("MEDPIPE_DEID_KEY", STRONG_KEY)
    store = tmp_path / "s.zarr"
    for flag, expect in (([], False), (["--retry-quarantined"], True)):
        result = runner.invoke(app, ["ingest", str(source), str(store), "--no-progress", *flag])
        assert result.exit_code == 0, result.output
        assert calls[-1]["retry_quarantined"] is expect


# ---------------------------------------------------------------- keygen


def test_keygen_prints_a_fresh_64_hex_key():
    from medpipe.cli import app

    first, second = runner.invoke(app, ["keygen"]), runner.invoke(app, ["keygen"])
    assert first.exit_code == 0 and second.exit_code == 0, first.output
    keys = [r.stdout.strip() for r in (first, second)]
    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys), keys
    assert keys[0] != keys[1]
    hint = [line for line in first.stderr.splitlines() if line.strip()]
    assert len(hint) == 1 and "MEDPIPE_DEID_KEY" in hint[0] and "Secret" in hint[0]
