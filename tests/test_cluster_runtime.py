"""The runtime on a real cluster (docs/cluster.md): the flow runs on the scheduler of its parameters (TLS, and the
plaintext refusal), every worker's access is checked, killed runs end Crashed (SIGTERM/SIGINT in the process,
SIGKILL by the run that takes the lock over), and the heartbeat automation for served/deployed runs."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest

from medpipe.ingest.lock import LOCK_NAME, StoreLock, acquire_lock, read_lock, release_lock
from medpipe.preflight import (ALLOW_PLAINTEXT_ENV, PlaintextSchedulerError, WorkerAccessError,
                               check_scheduler_reachable, check_scheduler_transport, check_workers_access)

REPO = Path(__file__).resolve().parents[1]
CLASSES = "none,lesion"
WAIT_S = 180  # upper bound for a subprocess to reach a state; never a speed assertion


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    """A small demo dataset (2D only): enough shards that a run is still working when it is signalled."""
    from medpipe.demo import DemoSpec, generate_demo_dataset

    root = tmp_path_factory.mktemp("cluster") / "data"
    generate_demo_dataset(root, DemoSpec(patients=4, studies_per_patient=2, xray_per_study=3, png_per_study=3,
                                         ct_series_per_study=0, image_size=32, seed=3))
    return root


def _config(**extra):
    from medpipe.config import IngestConfig

    return IngestConfig(classes=CLASSES.split(","), files_per_shard=4, workers=1, **extra)


# ---------------------------------------------------------------- plaintext and TLS


@pytest.mark.parametrize("address", ["tcp://10.1.2.3:8786", "10.1.2.3:8786", "tcp://scheduler.example:8786",
                                     "ws://10.1.2.3:8786"])
def test_plaintext_to_another_host_is_refused_in_one_line(address, monkeypatch):
    monkeypatch.delenv(ALLOW_PLAINTEXT_ENV, raising=False)
    with pytest.raises(PlaintextSchedulerError) as refused:
        check_scheduler_transport(address)
    message = str(refused.value)
    assert "\n" not in message and "in clear" in message and ALLOW_PLAINTEXT_ENV in message and "tls://" in message
    with pytest.raises(PlaintextSchedulerError):  # the CLI's preflight refuses before connecting
        check_scheduler_reachable(address, timeout=0.1)
    monkeypatch.setenv(ALLOW_PLAINTEXT_ENV, "1")
    check_scheduler_transport(address)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:8786", "tcp://localhost:8786", "tcp://[::1]:8786",
                                     "127.0.0.2:8786", "tls://10.1.2.3:8786", "inproc://whatever"])
def test_loopback_and_encrypted_addresses_pass(address, monkeypatch):
    monkeypatch.delenv(ALLOW_PLAINTEXT_ENV, raising=False)
    check_scheduler_transport(address)


def test_tls_needs_certificates(tmp_path, monkeypatch):
    import dask

    from flows.runtime import TLS_ENVS, DaskTlsError, dask_security, dask_task_runner

    for name in TLS_ENVS:
        monkeypatch.delenv(name, raising=False)
    with dask.config.set({"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None}):
        with pytest.raises(DaskTlsError, match="no client certificate is configured"):
            dask_task_runner("tls://10.1.2.3:8786")
    monkeypatch.setenv(TLS_ENVS[0], str(tmp_path / "missing-ca.pem"))
    with pytest.raises(DaskTlsError, match=r"\$MEDPIPE_DASK_TLS_CA names no file"):
        dask_security("tls://10.1.2.3:8786")
    (tmp_path / "ca.pem").write_text("x")
    monkeypatch.setenv(TLS_ENVS[0], str(tmp_path / "ca.pem"))
    with pytest.raises(DaskTlsError, match="MEDPIPE_DASK_TLS_CERT"):
        dask_security("tls://10.1.2.3:8786")
    assert dask_security("tcp://127.0.0.1:8786") is None


def test_a_deployment_refuses_plaintext_before_serving(monkeypatch):
    from deployments.ingest import main

    monkeypatch.delenv(ALLOW_PLAINTEXT_ENV, raising=False)
    with pytest.raises(PlaintextSchedulerError):
        main(["serve", "--source", "s3://b/in", "--store", "s3://b/s.zarr", "--scheduler", "tcp://10.0.0.9:8786"])


def test_the_flow_refuses_plaintext_from_its_parameters(prefect_api, small_source, tmp_path, deid_key, monkeypatch):
    from flows.ingest import run_ingest

    monkeypatch.delenv(ALLOW_PLAINTEXT_ENV, raising=False)
    with pytest.raises(PlaintextSchedulerError):
        run_ingest(str(small_source), str(tmp_path / "s.zarr"), _config(scheduler="tcp://10.9.8.7:8786"))
    assert not (tmp_path / "s.zarr").exists()  # refused before anything was touched


def _write_temporary_certs(folder: Path) -> dict[str, str]:
    """Security.temporary()'s self-signed CA/cert/key as PEM files (what a real deployment has on disk)."""
    from distributed.security import Security

    temporary = Security.temporary()
    files = {}
    for name, value in (("MEDPIPE_DASK_TLS_CA", temporary.tls_ca_file), ("MEDPIPE_DASK_TLS_CERT",
                        temporary.tls_client_cert), ("MEDPIPE_DASK_TLS_KEY", temporary.tls_client_key)):
        path = folder / f"{name.lower()}.pem"
        path.write_text(value)
        path.chmod(0o600)
        files[name] = str(path)
    return files


def test_ingest_on_a_tls_cluster_named_by_its_parameters(prefect_api, small_source, tmp_path, deid_key,
                                                         monkeypatch):
    """The flow itself (as a deployment runs it) goes to the tls:// scheduler of its config parameter; the
    address reaches neither the store nor its lineage (a rerun on a LocalCluster is a no-op)."""
    from distributed import LocalCluster
    from distributed.security import Security

    from flows.ingest import ingest_flow, run_ingest
    from flows.runtime import shared_api_server
    from tests.phi_scan import store_text

    monkeypatch.delenv("MEDPIPE_DASK_SCHEDULER", raising=False)
    certs = _write_temporary_certs(tmp_path)
    for name, path in certs.items():
        monkeypatch.setenv(name, path)
    security = Security(tls_ca_file=certs["MEDPIPE_DASK_TLS_CA"], tls_scheduler_cert=certs["MEDPIPE_DASK_TLS_CERT"],
                        tls_scheduler_key=certs["MEDPIPE_DASK_TLS_KEY"], tls_worker_cert=certs["MEDPIPE_DASK_TLS_CERT"],
                        tls_worker_key=certs["MEDPIPE_DASK_TLS_KEY"], tls_client_cert=certs["MEDPIPE_DASK_TLS_CERT"],
                        tls_client_key=certs["MEDPIPE_DASK_TLS_KEY"], require_encryption=True)
    store = tmp_path / "tls.zarr"
    with shared_api_server():  # workers inherit the API URL, as remote workers get it from their environment
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, protocol="tls", host="127.0.0.1",
                          security=security, dashboard_address=None) as cluster:
            address = cluster.scheduler_address
            assert address.startswith("tls://")
            summary = ingest_flow(source=str(small_source), store=str(store),
                                  config=_config(scheduler=address).to_dict())
            prefixes = set(cluster.scheduler.task_prefixes)
    assert summary["complete"] and summary["counts"]["ingested"] > 0
    # the mapped steps (one `run_step` task run per shard: scan, ingest) ran on the TLS cluster
    assert any("step" in p or "shard" in p for p in prefixes), prefixes
    port = address.rsplit(":", 1)[1]
    text = store_text(store)
    assert address not in text and "tls://" not in text and f"127.0.0.1:{port}" not in text
    rerun = run_ingest(str(small_source), str(store), _config())  # LocalCluster: same lineage, nothing to do
    assert rerun.get("noop") and rerun["content_hash"] == summary["content_hash"]


# ---------------------------------------------------------------- every worker's access


def _set_env(updates: dict[str, str | None]) -> None:
    for name, value in updates.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": None,
                  "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
                  "AWS_CONFIG_FILE": "/nonexistent/config"}


def test_every_worker_is_checked_and_named(moto_s3, tmp_path):
    import s3fs
    from distributed import Client, LocalCluster

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("cluster-check")
    s3fs.S3FileSystem(skip_instance_cache=True).pipe("cluster-check/src/a.png", b"x")
    source, store = "s3://cluster-check/src", "s3://cluster-check/store.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        first, second = sorted(client.scheduler_info()["workers"])
        assert check_workers_access(client, source, store) == 2
        client.run(_set_env, {"AWS_ENDPOINT_URL": None}, workers=[first])
        client.run(_set_env, NO_CREDENTIALS, workers=[second])
        with pytest.raises(WorkerAccessError) as refused:
            check_workers_access(client, source, store)
        message = str(refused.value)
        assert "\n" not in message and first in message and second in message
        assert "an S3 endpoint (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL" in message and "S3 credentials" in message
        assert message.index(first) < message.index("an S3 endpoint") < message.index(second) \
            < message.index("S3 credentials")
        assert "testing" not in message and moto_s3 not in message  # names of settings, never their values

        local_source, local_store = tmp_path / "src", tmp_path / "store.zarr"
        local_source.mkdir()
        local_store.mkdir()
        client.run(_set_env, {"AWS_ENDPOINT_URL": moto_s3}, workers=[first])
        client.run(_set_env, {k: os.environ.get(k) for k in NO_CREDENTIALS}, workers=[second])
        lock = str(local_store / LOCK_NAME)
        with pytest.raises(WorkerAccessError, match="is not the same there"):  # a store of the worker's own disk
            check_workers_access(client, str(local_source), str(local_store), lock_path=lock)
        acquire_lock(str(local_store), "c" * 32)
        assert check_workers_access(client, str(local_source), str(local_store), lock_path=lock) == 2
        release_lock(str(local_store), "c" * 32)
        with pytest.raises(WorkerAccessError, match="SOURCE \\(local path\\) is not visible there"):
            check_workers_access(client, str(tmp_path / "elsewhere"), str(local_store))


def test_a_cluster_without_workers_is_refused_in_one_line(tmp_path):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        with pytest.raises(WorkerAccessError, match="no Dask worker joined the cluster within 1 s"):
            check_workers_access(client, str(tmp_path), str(tmp_path / "s.zarr"), timeout=1)


# ---------------------------------------------------------------- the lock records the flow run


def test_lock_records_the_flow_run_and_hands_over_stale_locks(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    expired = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).isoformat(timespec="seconds")
    old = {"run_id": "a" * 32, "host": "elsewhere", "pid": 1, "acquired": expired, "expires": expired,
           "flow_run_id": "1" * 32, "written_by_a_newer_version": True}
    (store / LOCK_NAME).write_text(json.dumps(old))
    handed: list[StoreLock] = []
    mine = acquire_lock(str(store), "b" * 32, flow_run_id="2" * 32, on_stale=handed.append)
    assert [lock.flow_run_id for lock in handed] == ["1" * 32] and "lease expired" in handed[0].stale_reason()
    assert mine.flow_run_id == read_lock(str(store)).flow_run_id == "2" * 32
    with pytest.raises(Exception, match="another ingest"):  # a live lock is never handed over
        acquire_lock(str(store), "c" * 32, on_stale=handed.append)
    assert len(handed) == 1
    release_lock(str(store), "b" * 32)


# ---------------------------------------------------------------- killed runs


def _start_cli_ingest(source: Path, store: Path, key: str) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "MEDPIPE_DEID_KEY": key, "PREFECT_API_URL": PREFECT_API_URL.value()}
    # SIGINT restored first: a test run started in the background of a non-interactive shell inherits it ignored
    # (POSIX), and so would this CLI; `medpipe.cli` then runs as `python -m medpipe.cli` would
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv[0] = 'medpipe'; runpy.run_module('medpipe.cli', run_name='__main__')")
    cmd = [sys.executable, "-c", start, "ingest", str(source), str(store), "--classes", CLASSES,
           "--files-per-shard", "2", "--workers", "1", "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _held_lock(proc: subprocess.Popen, store: Path) -> StoreLock:
    """The lock once the subprocess holds it (its work is under way)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        lock = read_lock(str(store))
        if lock is not None and lock.flow_run_id:
            return lock
        time.sleep(0.05)
    output = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
    raise AssertionError(f"the ingest never took the lock (exit {proc.poll()}): {output[-2000:]}")


def _stop_group(proc: subprocess.Popen) -> None:
    """Whatever is left of the subprocess and its Dask workers (they share its session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=WAIT_S)


def _states(flow_run_id: str) -> list[tuple[str, str, str]]:
    """(flow name, state type, state message) of a flow run and its parent flow runs."""
    from prefect.client.orchestration import get_client

    out = []
    with get_client(sync_client=True) as client:
        run_id: UUID | None = UUID(flow_run_id)
        while run_id is not None:
            run = client.read_flow_run(run_id)
            flow = client.read_flow(run.flow_id)
            out.append((flow.name, run.state.type.value, run.state.message or ""))
            run_id = client.read_task_run(run.parent_task_run_id).flow_run_id if run.parent_task_run_id else None
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_ingest_ends_terminal_and_releases_the_lock(prefect_api, small_source, tmp_path, deid_key,
                                                                signum):
    for attempt in range(3):  # the lock is polled: a run may end between the last look and the signal
        store = tmp_path / f"signalled-{attempt}.zarr"
        proc = _start_cli_ingest(small_source, store, deid_key)
        try:
            lock = _held_lock(proc, store)
            os.kill(proc.pid, signum)  # the process only, as a supervisor (or `kill`) does
            proc.wait(timeout=WAIT_S)
        finally:
            _stop_group(proc)
        if proc.returncode != 0:
            break
    assert proc.returncode != 0
    assert read_lock(str(store)) is None and not (store / LOCK_NAME).exists()
    states = _states(lock.flow_run_id)
    assert [name for name, _, _ in states] == ["ingest-on-dask", "ingest"]
    assert all(state in ("CRASHED", "CANCELLED") for _, state, _ in states), states


def test_a_sigkilled_ingest_is_marked_crashed_by_the_next_run(prefect_api, small_source, tmp_path, deid_key):
    from flows.ingest import run_ingest

    store = tmp_path / "killed.zarr"
    proc = _start_cli_ingest(small_source, store, deid_key)
    try:
        lock = _held_lock(proc, store)
    finally:
        _stop_group(proc)  # SIGKILL: nothing runs in the process, the lock and the flow runs stay behind
    assert read_lock(str(store)) == lock
    assert all(state == "RUNNING" for _, state, _ in _states(lock.flow_run_id))
    summary = run_ingest(str(small_source), str(store), _config())
    assert summary["complete"]
    states = _states(lock.flow_run_id)
    assert [name for name, _, _ in states] == ["ingest-on-dask", "ingest"]
    for _, state, message in states:
        assert state == "CRASHED" and "took over its store lock" in message and "no longer exists" in message


# ---------------------------------------------------------------- the heartbeat automation


def test_heartbeat_automation_is_valid_and_applies(prefect_api):
    import yaml
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.settings import PREFECT_API_URL, get_current_settings

    data = yaml.safe_load((REPO / "deployments" / "automations.yaml").read_text())
    automations = [AutomationCore.model_validate(a) for a in data["automations"]]
    assert len(automations) == 1
    trigger = automations[0].trigger
    assert isinstance(trigger, EventTrigger) and trigger.posture == Posture.Proactive
    assert trigger.after == {"prefect.flow-run.heartbeat"} and trigger.expect == {"prefect.flow-run.*"}
    assert trigger.for_each == {"prefect.resource.id"}  # each flow run on its own
    heartbeat = get_current_settings().flows.heartbeat_frequency
    assert heartbeat and trigger.within.total_seconds() >= 2 * heartbeat
    assert automations[0].actions[0].type == "change-flow-run-state"
    prefect = Path(sys.executable).with_name("prefect")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run([str(prefect), "automation", "create", "--from-file",
                           str(REPO / "deployments" / "automations.yaml")], env=env, capture_output=True, text=True,
                          timeout=WAIT_S)
    assert done.returncode == 0 and "Created automation" in done.stdout, done.stdout + done.stderr
