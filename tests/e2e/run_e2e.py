"""`make e2e`: the whole pipeline as a scheduled deployment, on real components, with faults (docs/e2e.md).

Starts `prefect server`, moto S3, a Dask scheduler + 2 workers and `deployments/serve.py` as separate processes
on 127.0.0.1 (workers and served flows reach S3 through a fault-injecting proxy, from their own environment),
puts a small 2D demo dataset on s3://, then:

1. clean run: `prefect deployment run 'medpipe-pipeline/on-demand' -p ...` (the real CLI); every flow and task run
   Completed; the store, models, reports and predictions listed in OUTPUT/pipeline.json exist in S3;
2. faults: the same on a new store and OUTPUT, S3 answering some requests with 503 SlowDown / 500, and one Dask
   worker SIGKILLed while archive writes are in flight: Completed, same store content hash and accounting;
3. one pipeline per store: a second run triggered while the first is inside its ingest is queued or refused,
   never interleaved.

Prints a timing table; exit status 0 when everything held. Logs of every process stay in the run folder
(printed at the end; their tails are printed on failure). `--target ingest` runs the ingest deployment instead
of the pipeline (deployments/ingest.py), the fallback from before the pipeline flow existed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Places:
    """The S3 URLs of one run."""

    source: str
    store: str
    output: str
    incoming: str


def places(name: str, bucket: str) -> Places:
    return Places(f"s3://{bucket}/source", f"s3://{bucket}/{name}/store.zarr", f"s3://{bucket}/{name}/output",
                  f"s3://{bucket}/incoming")


PIPELINE_CONFIG: dict[str, Any] = {
    # a test split big enough for the GAN's quality metrics (PRDC needs >= 7 held-out images)
    "ingest": {"classes": ["none", "lesion"], "files_per_shard": 8,
               "split": {"train": 0.5, "val": 0.2, "test": 0.3}},
    "train": {"epochs": 1, "batch_size": 8, "model": "small-cnn", "device": "cpu"},
    "evaluate": {"n_boot": 20, "device": "cpu"},
    # a 1-epoch GAN fails the memorisation gate; publish its samples anyway so that retrain runs too (e2e only)
    "augment": {"gan": {"epochs": 1, "width": 8, "batch_size": 8}, "n_per_class": 8, "classifier_epochs": 1,
                "publish_failing": True},
    "retrain": {"epochs": 1},
    "promote": {"device": "cpu"},
    "predict": {"device": "cpu"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=None, help="folder for data and logs (default: a new temporary one)")
    parser.add_argument("--target", choices=["pipeline", "ingest"], default="pipeline")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each flow run may take")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="medpipe-e2e-")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(run_dir / "driver-prefect-home"))  # before Prefect is imported
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from tests.e2e.scenario import Timings

    timings = Timings()
    print(f"medpipe e2e: run folder {run_dir}")
    try:
        scenario(run_dir, args.target, args.timeout, timings)
    except (AssertionError, TimeoutError, RuntimeError) as exc:
        print(f"\nE2E FAILED: {type(exc).__name__}: {exc}\n\n{timings.table()}\nlogs: {run_dir / 'logs'}",
              file=sys.stderr)
        return 1
    print(f"\nE2E PASSED\n\n{timings.table()}\nlogs: {run_dir / 'logs'}")
    return 0


def scenario(run_dir: Path, target_name: str, timeout: float, timings: Any) -> None:
    from tests.e2e.flaky_s3 import FaultPlan, FlakyS3Proxy
    from tests.e2e.processes import DaskCluster, MotoS3, PrefectServer, Stack
    from tests.e2e.scenario import BUCKET, QUICK_QUEUE, upload, write_demo_source
    from tests.e2e.targets import ingest_target, pipeline_target

    with timings.phase("demo data"):
        source = write_demo_source(run_dir / "demo", patients=8, images=4)
        incoming = write_demo_source(run_dir / "incoming", patients=2, images=1, seed=11)
    with Stack(run_dir) as stack:
        s3 = MotoS3(run_dir)
        proxy = FlakyS3Proxy(s3.endpoint, FaultPlan()).start()
        stack.on_stop(proxy.stop)
        server = PrefectServer(run_dir, settings=QUICK_QUEUE)
        cluster = DaskCluster(2, "2GiB", run_dir, env={**server.client_env(), **proxy.env()}, preload=["tasks.ingest"])
        with timings.phase("start prefect server, moto, dask (parallel)"):
            stack.start(server, s3, cluster)
        fs = s3.filesystem()
        upload(fs, source, f"s3://{BUCKET}/source")
        upload(fs, incoming, f"s3://{BUCKET}/incoming")
        home = places("served", BUCKET)
        if target_name == "pipeline":
            env = {"MEDPIPE_SOURCE": home.source, "MEDPIPE_STORE": home.store, "MEDPIPE_OUTPUT": home.output,
                   "MEDPIPE_INCOMING": home.incoming, "MEDPIPE_REPO": str(REPO)}
            target = pipeline_target(run_dir, server, cluster, proxy.env(), env, PIPELINE_CONFIG)
        else:
            target = ingest_target(run_dir, server, cluster, proxy.env())
        with timings.phase("serve deployments"):
            stack.start(target.served)
        if target_name == "pipeline":
            save_key_secret(server.api_url)
        check = Checks(target, server, cluster, proxy, s3, fs, timeout, timings)
        clean = check.clean_run(places("clean", BUCKET))
        check.faulted_run(places("faulted", BUCKET), clean)
        check.concurrent_runs(places("concurrent", BUCKET))
        print(f"\nprocess logs: {', '.join(p.log.name for c in stack.components for p in c.processes)}")


def save_key_secret(api_url: str) -> None:
    """The public demo key as the Prefect Secret block `medpipe-deid-key` that prefect.yaml's deployments name."""
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from pydantic import SecretStr

    from tests.e2e.scenario import DEMO_KEY

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        Secret(value=SecretStr(DEMO_KEY)).save("medpipe-deid-key", overwrite=True)


class Checks:
    """The three scenarios against one set of running components."""

    def __init__(self, target: Any, server: Any, cluster: Any, proxy: Any, s3: Any, fs: Any, timeout: float,
                 timings: Any) -> None:
        self.target, self.server, self.cluster, self.proxy, self.s3, self.fs = target, server, cluster, proxy, s3, fs
        self.timeout, self.timings = timeout, timings
        self.pipeline = target.deployment.startswith("medpipe-pipeline/")

    def params(self, where: Places, stages: list[str] | None = None) -> dict[str, Any]:
        if self.pipeline:
            return self.target.parameters(where.source, where.store, output=where.output,
                                          predict_source=where.incoming, stages=stages)
        return self.target.parameters(where.source, where.store)

    def trigger(self, where: Places, stages: list[str] | None = None) -> str:
        from tests.e2e.scenario import trigger

        return trigger(self.target.deployment, self.params(where, stages), self.server.client_env())

    def finish(self, flow_run_id: str, label: str) -> Any:
        """Wait for the run; assert it and its whole tree Completed."""
        from tests.e2e.scenario import run_tree, wait_final

        run = wait_final(self.server.api_url, flow_run_id, self.timeout)
        assert run.state.is_completed(), f"{label}: flow run {run.name} ended {run.state.name}: {run.state.message}"
        tree = run_tree(self.server.api_url, flow_run_id)
        assert not tree.not_completed(), f"{label}: not Completed: {tree.not_completed()}"
        print(f"{label}: {len(tree.flow_runs)} flow runs, {len(tree.task_runs)} task runs, all Completed")
        return run

    def results(self, where: Places, all_stages: bool = True) -> dict[str, Any]:
        """The store's attributes, and (pipeline) OUTPUT/pipeline.json with every listed URL checked to exist
        (and, after all stages, models/, reports/ and predictions/ not empty)."""
        import json

        from tests.e2e.scenario import store_summary

        store = store_summary(where.store, self.s3)
        assert store.get("complete"), f"{where.store} is not a complete store"
        if not self.pipeline:
            return {"store": store, "pipeline": None}
        pipeline = json.loads(self.fs.cat_file(f"{where.output.removeprefix('s3://')}/pipeline.json"))
        assert pipeline["store_content_hash"] == store["content_hash"]
        missing = [url for stage in pipeline["stages"].values() for url in stage["outputs"]
                   if not self.fs.exists(url.removeprefix("s3://"))]
        assert not missing, f"pipeline.json lists outputs that do not exist: {missing}"
        for folder in ("models", "reports", "predictions") if all_stages else ():
            assert self.fs.ls(f"{where.output.removeprefix('s3://')}/{folder}"), f"OUTPUT/{folder} is empty"
        print("stages: " + ", ".join(f"{name} {s['status']}" for name, s in pipeline["stages"].items()))
        return {"store": store, "pipeline": pipeline}

    def clean_run(self, where: Places) -> dict[str, Any]:
        with self.timings.phase("1 clean run (trigger -> Completed)"):
            flow_run_id = self.trigger(where)
            self.finish(flow_run_id, "clean run")
        result = self.results(where)
        print(f"clean run: content hash {result['store']['content_hash'][:16]}, {result['store']['accounting']}")
        return result

    def faulted_run(self, where: Places, clean: dict[str, Any]) -> None:
        from tests.e2e.flaky_s3 import FaultPlan
        from tests.e2e.scenario import kill_worker_in_flight

        self.proxy.plan = FaultPlan(every=7, max_faults=40, seed=1)
        requests_before = self.proxy.requests
        try:
            with self.timings.phase("2 worker killed + flaky S3 (trigger -> Completed)"):
                flow_run_id = self.trigger(where)
                kill = kill_worker_in_flight(self.cluster, self.proxy, timeout=self.timeout)
                print(f"faults: killed Dask worker {kill.worker} (pid {kill.pid}) with archive writes in flight "
                      f"(busy workers {kill.busy})")
                self.finish(flow_run_id, "faulted run")
        finally:
            self.proxy.plan = FaultPlan()
        injected = dict(self.proxy.faults)
        assert self.proxy.injected > 0, "no S3 fault was injected"
        print(f"faults: injected {injected} into {self.proxy.requests - requests_before} S3 requests; all retried")
        result = self.results(where)
        assert result["store"]["content_hash"] == clean["store"]["content_hash"], "content hash differs"
        assert result["store"]["counts"] == clean["store"]["counts"], "accounting differs (counted twice?)"
        assert result["store"]["archive_images"] == clean["store"]["archive_images"]
        print(f"faulted run: same content hash and accounting as the clean run ({result['store']['accounting']})")

    def concurrent_runs(self, where: Places) -> None:
        from tests.e2e.scenario import ARCHIVE_WRITE, flow_run_logs, read_flow_run, wait_final, wait_state

        api = self.server.api_url
        with self.timings.phase("3 second run on the same store (queued/refused)"):
            arrived = self.proxy.hold(ARCHIVE_WRITE)
            try:
                first = self.trigger(where, stages=["ingest"])  # the lock is the same for any stages
                assert arrived.wait(self.timeout), "the first run never reached its archive writes"
                second = self.trigger(where, stages=["ingest"])
                # the first is held inside its ingest: the second must not get past the lock meanwhile
                seen = wait_state(api, second, {"FAILED", "COMPLETED"}, timeout=15)
                assert seen != "COMPLETED", "a second run completed while the first was still ingesting"
            finally:
                self.proxy.release()
            a = self.finish(first, "first of two runs")
            b = wait_final(api, second, self.timeout)
        if b.state.is_completed():
            b = read_flow_run(api, second)
            assert b.start_time >= a.end_time, f"interleaved: second started {b.start_time}, first ended {a.end_time}"
            print(f"second run: queued until the first ended ({a.end_time:%H:%M:%S}), started {b.start_time:%H:%M:%S}")
        else:
            text = " ".join([b.state.message or "", *flow_run_logs(api, second)])
            assert "lock" in text.lower(), f"second run ended {b.state.name} without a lock refusal: {text[:300]}"
            print(f"second run: refused ({b.state.name}): {(b.state.message or '').splitlines()[0][:160]}")
        self.results(where, all_stages=False)


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"total {time.monotonic() - started:.0f} s")
    sys.exit(code)
