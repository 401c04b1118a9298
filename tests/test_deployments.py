"""prefect.yaml, read as `prefect deploy --all` and `deployments/serve.py` read it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from prefect.client.schemas.schedules import CronSchedule

from deployments.definitions import PREFECT_YAML, REPO, load_deployments, resolve_env

SITE = {"MEDPIPE_SOURCE": "s3://bucket/incoming", "MEDPIPE_STORE": "s3://bucket/store.zarr",
        "MEDPIPE_OUTPUT": "s3://bucket/results", "MEDPIPE_INCOMING": "s3://bucket/to-predict"}


def test_the_four_deployments_and_their_pools() -> None:
    specs = {s.name: s for s in load_deployments(environ=SITE)}
    assert set(specs) == {"nightly-ingest", "weekly-retrain", "batch-predict", "on-demand"}
    assert {s.work_pool for s in specs.values()} == {"medpipe-cpu", "medpipe-gpu"}
    assert specs["weekly-retrain"].work_pool == "medpipe-gpu"  # it trains
    assert specs["nightly-ingest"].parameters["stages"] == ["ingest"]
    assert specs["weekly-retrain"].parameters["stages"] == ["train", "evaluate", "promote"]
    assert specs["batch-predict"].parameters["predict_source"] == "s3://bucket/to-predict"
    assert "stages" not in specs["on-demand"].parameters  # all of them
    assert not specs["on-demand"].crons
    for spec in specs.values():
        assert spec.concurrency == {"limit": 1, "collision_strategy": "ENQUEUE"}
        assert spec.parameters["store"] == "s3://bucket/store.zarr" and spec.unset == ()
        assert "{{" not in json.dumps(spec.parameters)
        for cron, tz in spec.crons:
            CronSchedule(cron=cron, timezone=tz)  # raises on a malformed cron
        path, name = spec.entrypoint.split(":")
        assert (REPO / path).is_file() and f"def {name}(" in (REPO / path).read_text()


def test_unset_variables_are_left_out_and_listed() -> None:
    env = {k: v for k, v in SITE.items() if k != "MEDPIPE_INCOMING"}
    specs = {s.name: s for s in load_deployments(environ=env)}
    assert specs["batch-predict"].unset == ("MEDPIPE_INCOMING",)
    assert "predict_source" not in specs["batch-predict"].parameters
    assert specs["nightly-ingest"].unset == ()


def test_resolve_env_like_prefect_deploy() -> None:
    env = {"A": "x", "B": "y"}
    assert resolve_env({"p": "{{ $A }}/{{ $B }}", "q": "{{ $C }}", "r": ["{{ $A }}", "{{ $C }}", 3]}, env) == \
        {"p": "x/y", "r": ["x", 3]}
    assert resolve_env("plain {{ name }}", env) == "plain {{ name }}"  # not an env placeholder: untouched


@pytest.mark.parametrize("env, code, says", [
    (SITE, 0, None),
    ({k: v for k, v in SITE.items() if k != "MEDPIPE_STORE"}, 1, "MEDPIPE_STORE"),
])
def test_serve_check(env: dict[str, str], code: int, says: str | None, tmp_path) -> None:
    run = subprocess.run([sys.executable, str(REPO / "deployments" / "serve.py"), "--check"], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path),
                                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **env}, timeout=120)
    assert run.returncode == code, run.stderr
    if says is None:
        assert {d["name"] for d in json.loads(run.stdout)} == {"nightly-ingest", "weekly-retrain", "batch-predict",
                                                               "on-demand"}
    else:
        problems = [line for line in run.stderr.splitlines() if line.startswith("not served:")]
        assert problems and all(says in line for line in problems)


def test_prefect_yaml_is_where_prefect_deploy_looks() -> None:
    assert PREFECT_YAML == REPO / "prefect.yaml" and PREFECT_YAML.is_file()


def test_a_deployment_applied_with_a_variable_unset_is_refused_in_one_line() -> None:
    """`prefect deploy --all` keeps `{{ $NAME }}` as written when NAME is unset: the run says which variable."""
    from medpipe.pipeline.params import PipelineParamsError, validate_params

    with pytest.raises(PipelineParamsError, match=r"^invalid pipeline parameters: store: .*set MEDPIPE_STORE") as err:
        validate_params({"store": "{{ $MEDPIPE_STORE }}", "output": "s3://bucket/results", "stages": ["train"]})
    assert "\n" not in str(err.value)
