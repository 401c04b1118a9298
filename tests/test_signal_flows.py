"""The signal commands as a user runs them, through the Prefect flows: ingest-signals, info, train --task rhythm and
--task forecast (two models: evaluated and compared), evaluate; one-line errors; nothing identifying in Prefect."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from medpipe.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """RNNs slow down ~50x when two torch processes share 2 cores with 2 threads each (make test runs two test
    files at once): one thread here, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def signal_store(prefect_api, deid_key_module, tmp_path_factory):
    from medpipe.signals.demo import SignalDemoSpec, generate_demo_signals

    root = tmp_path_factory.mktemp("ecg")
    demo = generate_demo_signals(root / "source", SignalDemoSpec(patients=10, records_per_patient=2, seconds=20.0,
                                                                 seed=5))
    store = root / "sig.zarr"
    result = runner.invoke(app, ["ingest-signals", str(root / "source"), str(store), "--no-progress",
                                 "--window", "4"])
    assert result.exit_code == 0, result.output
    assert "discovered 20 records = ingested 20 + quarantined 0" in result.output
    return root, store, demo


def test_info_of_a_signal_store(signal_store):
    _, store, _ = signal_store
    result = runner.invoke(app, ["info", str(store)])
    assert result.exit_code == 0, result.output
    for text in ("leads", "aVR", "100 Hz / 400 / 400 samples", "irregular, normal", "splits (windows)"):
        assert text in result.output, text


def test_rhythm_then_evaluate(signal_store):
    root, store, _ = signal_store
    run = root / "rhythm"
    result = runner.invoke(app, ["train", str(store), "--task", "rhythm", "--out", str(run), "--epochs", "4",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (run / "best.pt").exists() and (run / "metrics.csv").exists()
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["task"] == "classify" and "Majority class" in result.output
    result = runner.invoke(app, ["evaluate", str(store), str(run), "--split", "val", "--n-boot", "100",
                                 "--out", str(root / "val-report")])
    assert result.exit_code == 0, result.output
    assert (root / "val-report" / "report.html").exists()


def test_forecast_two_models_are_compared(signal_store):
    root, store, _ = signal_store
    run = root / "forecast"
    result = runner.invoke(app, ["train", str(store), "--task", "forecast", "--model", "gru,resnet1d", "--out",
                                 str(run), "--epochs", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    for name in ("gru", "resnet1d"):
        assert (run / name / "best.pt").exists()
        metrics = json.loads((run / name / "evaluation" / "metrics.json").read_text())
        assert metrics["task"] == "forecast"
    comparison = (run / "comparison.md").read_text()
    assert "gru" in comparison and "resnet1d" in comparison and "| gru |" in result.output.replace("  ", " ")
    assert (run / "comparison.html").exists()


def test_signal_commands_fail_in_one_line(signal_store, tmp_path):
    root, store, _ = signal_store
    for args, expect in ((["train", str(store), "--task", "segment", "--out", str(tmp_path / "x")], "rhythm or forecast"),
                         (["ingest-signals", str(tmp_path / "missing"), str(tmp_path / "s.zarr")], "not found"),
                         (["evaluate", str(store), str(tmp_path / "no-run")], "no checkpoint"),
                         (["train", str(store), "--task", "forecast", "--model", "gru,nosuch", "--out",
                           str(tmp_path / "y")], "unknown signal model"),
                         (["ingest-signals", str(root / "source"), str(tmp_path / "s.zarr"), "--overlap", "9"],
                          "overlap")):
        result = runner.invoke(app, args, env={"COLUMNS": "20"})
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and expect in lines[0], result.output


def test_nothing_identifying_reaches_prefect(signal_store):
    from tests.phi_scan import prefect_text

    _, _, demo = signal_store
    text = prefect_text()
    assert "medpipe ingest-signals" in text  # the fixture's ingest artifact: the scan reads what the runs wrote
    for values in demo.phi.values():
        for value in values:
            assert value not in text, value
