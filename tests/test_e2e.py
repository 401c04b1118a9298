"""The end-to-end proof, reduced to fit `make test`: a `prefect server`, a Dask scheduler with 2 workers, moto S3
and a served ingest deployment, each a separate process on loopback. A tiny demo source is ingested through the
deployment (runs created through the API; `make e2e` uses the `prefect` CLI) onto s3:// with the external
scheduler, through a proxy that injects S3 faults, while one Dask worker is SIGKILLed with its archive writes in
flight: every flow and task run ends Completed and the store equals a clean ingest's (same content hash, same
accounting; this replaces the former in-process S3 ingest test). `make e2e` runs the full pipeline version (tests/e2e/run_e2e.py, docs/e2e.md)."""

from __future__ import annotations

import psutil
import pytest

from tests.e2e.flaky_s3 import FaultPlan, FlakyS3Proxy
from tests.e2e.processes import DaskCluster, MotoS3, PrefectServer, Stack
from tests.e2e.scenario import (BUCKET, QUICK_QUEUE, kill_worker_in_flight, run_tree, store_summary, submit,
                                upload, wait_final, write_demo_source)
from tests.e2e.targets import ingest_target



def test_flaky_proxy_injects_faults_that_s3fs_retries(moto_s3, tmp_path):
    """The proxy alone: every 3rd request fails (503/500); s3fs/botocore retry; bodies (also a streamed, chunked
    multipart upload) and signed headers arrive intact; the faults are counted."""
    import s3fs

    with FlakyS3Proxy(moto_s3, FaultPlan(every=3, max_faults=25, seed=2)) as proxy:
        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": proxy.endpoint},
                               skip_instance_cache=True)
        fs.mkdir("flaky-proxy")
        blobs = {f"flaky-proxy/obj{i}": bytes([i]) * (1000 * i + 1) for i in range(6)}
        for path, blob in blobs.items():
            fs.pipe_file(path, blob)
        big = (tmp_path / "big.bin")
        big.write_bytes(bytes(range(256)) * (6 * 4096 + 7))  # > 5 MiB: a multipart upload
        fs.put_file(str(big), "flaky-proxy/big.bin", chunksize=5 * 2**20)
        assert {p: fs.cat_file(p) for p in blobs} == blobs
        assert fs.cat_file("flaky-proxy/big.bin") == big.read_bytes()
        assert fs.info("flaky-proxy/obj3")["size"] == 3001  # HEAD through the proxy
    assert proxy.injected > 0 and set(proxy.faults) <= {500, 503}
    assert proxy.requests > proxy.injected


def test_fault_plan_is_seeded_and_bounded():
    plan, again = FaultPlan(rate=0.3, seed=5, max_faults=4), FaultPlan(rate=0.3, seed=5, max_faults=4)
    drawn = [plan.next() for _ in range(100)]
    assert drawn == [again.next() for _ in range(100)]
    assert sum(d is not None for d in drawn) == 4
    every = FaultPlan(every=4, max_faults=2, statuses=(503,))
    assert [every.next() for _ in range(12)] == [None, None, None, 503, None, None, None, 503, None, None, None, None]
    with pytest.raises(ValueError):
        FaultPlan(every=1)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_served_ingest_survives_a_killed_worker_and_flaky_s3(tmp_path):
    source = write_demo_source(tmp_path / "source")
    with Stack(tmp_path / "run") as stack:
        s3 = MotoS3(stack.run_dir)
        proxy = FlakyS3Proxy(s3.endpoint, FaultPlan(every=9, max_faults=12, seed=1)).start()
        stack.on_stop(proxy.stop)
        server = PrefectServer(stack.run_dir, settings=QUICK_QUEUE)
        cluster = DaskCluster(2, "1GiB", stack.run_dir, env={**server.client_env(), **proxy.env()},
                              preload=["tasks.ingest"])  # workers import medpipe while the server starts
        target = ingest_target(stack.run_dir, server, cluster, proxy.env())
        stack.launch(server, s3, cluster)
        stack.wait(server)
        stack.launch(target.served)
        stack.wait(s3, cluster, target.served)
        fs = s3.filesystem()
        upload(fs, source, f"s3://{BUCKET}/source")
        # the reference (local source and store: no S3, so no fault) and the faulted run (s3:// through the flaky
        # proxy, a worker killed mid-archive), both on the external cluster; the deployment runs one at a time,
        # in either order: the kill waits for the faulted run's archive writes
        clean_store, store = tmp_path / "clean.zarr", f"s3://{BUCKET}/store.zarr"
        clean = submit(server.api_url, target.deployment, target.parameters(str(source), str(clean_store)))
        faulted = submit(server.api_url, target.deployment, target.parameters(f"s3://{BUCKET}/source", store))
        kill = kill_worker_in_flight(cluster, proxy, timeout=120)
        run = wait_final(server.api_url, faulted, timeout=180)
        reference = wait_final(server.api_url, clean, timeout=180)

        assert run.state.is_completed() and reference.state.is_completed(), stack.tails()
        assert not psutil.pid_exists(kill.pid) and kill.worker in cluster.killed
        tree = run_tree(server.api_url, faulted)
        assert tree.not_completed() == [] and run_tree(server.api_url, clean).not_completed() == []
        assert any(name.startswith("ingest-shard") for name in tree.task_names())
        assert proxy.injected > 0, "faults must have been injected into the S3 run"
        expected, result = store_summary(str(clean_store)), store_summary(store, s3)
        assert result["content_hash"] == expected["content_hash"]
        assert result["counts"] == expected["counts"]  # nothing counted twice
        units = [e for e in fs.ls(f"{BUCKET}/store.zarr/archive", detail=True) if e["type"] == "directory"]
        assert result["archive_images"] == expected["archive_images"] == len(units)
        counts = result["counts"]
        assert counts["discovered"] == counts["ingested"] + counts["quarantined"] > 0
    assert all(not p.alive() for c in (server, s3, cluster, target.served) for p in c.processes)
