"""CLI and train/evaluate flows end to end on a small ingested demo store, and the clear-error paths."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medpipe.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
ANOTHER_KEY = "c4e8a1f05b3d97e26a0c4f18b5d3e7a92f6c0b84d1e5a3f7c9b2d6e0a4f8c1b3"  # strong, and not TEST_KEY


@pytest.fixture(scope="module")
def store_2d(prefect_api, demo_source, tmp_path_factory):
    import os

    from tests.conftest import TEST_KEY

    os.environ["MEDPIPE_DEID_KEY"] = TEST_KEY
    source, _, _ = demo_source
    store = tmp_path_factory.mktemp("cli") / "cli.zarr"
    result = runner.invoke(app, ["ingest", str(source), str(store), "--classes", "none,lesion", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "discovered" in result.output and "= ingested" in result.output
    return store


def test_info_shows_counts_splits_fingerprint(store_2d):
    result = runner.invoke(app, ["info", str(store_2d)])
    assert result.exit_code == 0, result.output
    for word in ("discovered", "splits", "train", "fingerprint", "content hash", "CT", "DX",
                 "patient identity from", "series split into acquisitions", "SOPInstanceUID collisions"):
        assert word in result.output
    assert any("training images" in line and "float32" in line for line in result.output.splitlines())


def test_train_then_evaluate_writes_report(store_2d, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(store_2d), "--task", "classify", "--out", str(run), "--batch-size", "8",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (run / "best.pt").exists() and (run / "metrics.csv").exists()
    result = runner.invoke(app, ["evaluate", str(store_2d), str(run), "--n-boot", "200"])
    assert result.exit_code == 0, result.output
    report = run / "report" / "report.html"
    html = report.read_text()
    assert "Accuracy" in html and 'src="http' not in html
    for png in ("roc.png", "confusion_matrix.png", "gradcam.png", "samples.png", "training_curves.png"):
        assert (run / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run / "report" / "metrics.json").read_text())["metrics"]
    assert metrics["accuracy"] > 0.6  # clearly above chance (0.5) on a small store


def _fails_cleanly(args: list[str], expect: str) -> None:
    result = runner.invoke(app, args, env={"COLUMNS": "20", "LINES": "5"})  # a narrow terminal must not wrap it
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expect in result.output and "Traceback" not in result.output


def test_user_errors_are_one_clear_line(store_2d, demo_source, tmp_path, monkeypatch):
    source, _, _ = demo_source
    tmp_path = tmp_path / ("a-long-temporary-folder-name-" * 4)  # long paths must not wrap either
    tmp_path.mkdir()
    _fails_cleanly(["train", str(store_2d), "--model", "no-such-net", "--out", str(tmp_path / "r")], "no-such-net")
    _fails_cleanly(["train", str(store_2d), "--task", "segment", "--out", str(tmp_path / "r")], "masks")
    _fails_cleanly(["evaluate", str(store_2d), str(tmp_path / "missing")], "no checkpoint")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _fails_cleanly(["evaluate", str(store_2d), str(bad)], "checkpoint")
    _fails_cleanly(["ingest", str(tmp_path / "nowhere"), str(tmp_path / "s.zarr")], "not found")
    _fails_cleanly(["ingest", str(source), str(tmp_path / "s.zarr"), "--shape", "64"], "shape")
    monkeypatch.setenv("MEDPIPE_DEID_KEY", ANOTHER_KEY)
    _fails_cleanly(["ingest", str(source), str(store_2d)], "another key")
    monkeypatch.delenv("MEDPIPE_DEID_KEY")
    _fails_cleanly(["ingest", str(source), str(tmp_path / "s.zarr")], "MEDPIPE_DEID_KEY")


def test_bad_store_paths_fail_before_prefect_starts(demo_source, tmp_path, monkeypatch):
    """STORE inside SOURCE, or a regular file: one line, exit 2, and the flow is never called (no Prefect server is
    started; no wall-clock assertion: that would depend on the machine's load)."""
    import sys
    import types

    from tests.conftest import TEST_KEY

    source, _, _ = demo_source
    calls: list[tuple] = []
    monkeypatch.setitem(sys.modules, "flows.ingest", types.SimpleNamespace(run_ingest=lambda *a, **k: calls.append(a)))
    monkeypatch.setenv("MEDPIPE_DEID_KEY", TEST_KEY)
    file_store = tmp_path / "store.zarr"
    file_store.write_text("not a store")
    for store, expect, extra in ((source / "out.zarr", "would ingest the store's own files on every rerun", []),
                                 (source / "out.zarr", "inside SOURCE", ["--key-secret", "medpipe-deid-key"]),
                                 (file_store, "is a file; give a folder path or URL for the Zarr store", [])):
        _fails_cleanly(["ingest", str(source), str(store), "--no-progress", *extra], expect)
    assert calls == [] and not (source / "out.zarr").exists()


def test_deployment_builds(demo_source, tmp_path):
    from deployments.ingest import build_parameters, main  # noqa: F401
    from flows.ingest import ingest_flow

    import argparse

    args = argparse.Namespace(config=None, scheduler="tcp://scheduler:8786", source="s3://b/in", store="s3://b/s.zarr",
                              key_secret="medpipe-deid-key")
    params = build_parameters(args)
    assert params["config"]["scheduler"] == "tcp://scheduler:8786"
    deployment = ingest_flow.to_deployment(name="nightly", cron="0 2 * * *", parameters=params)
    assert deployment.name == "nightly" and deployment.parameters["store"] == "s3://b/s.zarr"
