"""Signal evaluation: naive baselines on analytic signals, the patient bootstrap, metrics, report and comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medpipe.errors import UserError
from medpipe.evaluation.bootstrap import bootstrap_ci
from medpipe.signals.baselines import beat_period, majority_class, persistence_forecast, seasonal_forecast
from medpipe.signals.evaluate import (PatientResampling, evaluate_predictions, forecast_summary, signal_metrics)
from medpipe.signals.report import compare_signal_runs, markdown_signal_summary

RATE = 100.0
N_BOOT = 200


def _sine(periods_s: list[float], n: int, leads: int = 2, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """(len(periods_s), leads, n) sines, one period per window, a phase and amplitude per lead."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    out = np.stack([np.stack([(1 + 0.3 * k) * np.sin(2 * np.pi * t / p + k) for k in range(leads)])
                    for p in periods_s])
    return (out + noise * rng.standard_normal(out.shape)).astype(np.float32)


# ---- baselines ------------------------------------------------------------------------------------------------------


def test_beat_period_finds_the_period_and_seasonal_forecast_is_exact():
    x = _sine([0.5, 0.8, 1.25], 500)
    np.testing.assert_array_equal(beat_period(x[..., :400], RATE), [50, 80, 125])
    forecast = seasonal_forecast(x[..., :400], 100, beat_period(x[..., :400], RATE))
    np.testing.assert_allclose(forecast, x[..., 400:], atol=1e-5)
    assert np.abs(persistence_forecast(x[..., :400], 100) - x[..., 400:]).max() > 0.5


def test_beat_period_of_a_noisy_pulse_train_and_clipping():
    rng = np.random.default_rng(1)
    t = np.arange(600)
    pulses = np.exp(-0.5 * ((t[None, :] % 83 - 20) / 2.0) ** 2) + 0.05 * rng.standard_normal((3, 600))
    assert abs(int(beat_period(pulses[None], RATE)[0]) - 83) <= 1
    short = np.zeros((1, 1, 10), np.float32)  # shorter than 0.3 s: the range is empty, period clipped to the context
    assert int(beat_period(short, RATE)[0]) == 10
    assert seasonal_forecast(np.arange(5, dtype=np.float32)[None, None], 4, 99).tolist() == [[[0, 1, 2, 3]]]


def test_persistence_is_exact_on_a_step():
    x = np.zeros((2, 3, 300), np.float32)
    x[:, :, 150:] = np.array([1.5, -2.0, 0.25])[None, :, None]
    np.testing.assert_array_equal(persistence_forecast(x[..., :200], 100), x[..., 200:])
    with pytest.raises(ValueError, match="horizon"):
        persistence_forecast(x[..., :200], 0)


def test_majority_class_ignores_unlabelled_and_breaks_ties_low():
    assert majority_class(np.array([2, 2, 1, -1, -1, -1])) == 2
    assert majority_class(np.array([1, 0, 1, 0]), 3) == 0
    with pytest.raises(ValueError, match="no labelled"):
        majority_class(np.array([-1, -1]), 2)


# ---- the patient bootstrap ------------------------------------------------------------------------------------------


def test_bootstrap_resamples_patients_not_windows():
    # patient "a" has 50 windows with error 1, four others one window each with error 0
    patients = np.array(["a"] * 50 + ["b", "c", "d", "e"])
    values = np.array([1.0] * 50 + [0.0] * 4)
    res = PatientResampling.of(patients, n_boot=N_BOOT, seed=3)
    assert res.n_patients == 5
    draws = np.random.default_rng(0).integers(0, 5, size=(7, 5))
    mult = res.multiplicities(draws)
    assert mult.shape == (7, 54)
    for b in range(7):  # every window of a patient comes along, as often as its patient was drawn
        for p, name in enumerate("abcde"):
            assert set(mult[b, patients == name]) == {int((draws[b] == p).sum())}
    ci = res.ci(lambda m: (m * values).sum(axis=1) / m.sum(axis=1))
    assert ci["unit"] == "patients" and ci["n_units"] == 5 and ci["n_boot"] == N_BOOT
    assert "patients" in ci["method"]
    low, high = bootstrap_ci(np.mean, values, n_boot=N_BOOT, seed=3)  # windows as if independent: narrow
    assert high - low < 0.15
    assert ci["high"] - ci["low"] > 0.3  # how often "a" is drawn dominates: the honest interval is wide
    assert ci["low"] <= 50 / 54 <= ci["high"]


# ---- metrics --------------------------------------------------------------------------------------------------------


def _forecast_case(n_patients: int = 6, per_patient: int = 3, horizon: int = 50):
    periods = [0.7 + 0.07 * i for i in range(n_patients) for _ in range(per_patient)]  # non-integer periods in samples
    windows = _sine(periods, 400, leads=2, noise=0.02, seed=5)
    patients = np.array([f"P{i:02d}" for i in range(n_patients) for _ in range(per_patient)], dtype=object)
    table = {"patient": patients, "record": patients, "window": np.zeros(len(periods), np.int32),
             "start_s": np.zeros(len(periods)), "label": np.full(len(periods), -1), "split": np.full(len(periods), 2)}
    attrs = {"rate_hz": RATE, "leads": ["I", "II"], "units": ["mV", "mV"], "window": 400, "stride": 400,
             "classes": [], "content_hash": "abc"}
    context, target = windows[..., :-horizon], windows[..., -horizon:]
    predictions = {"task": "forecast", "indices": np.arange(len(periods)), "context": context, "y_true": target,
                   "y_pred": target.copy()}
    return predictions, table, attrs, windows


def test_perfect_forecaster_beats_both_baselines_and_persistence_does_not():
    predictions, table, attrs, _ = _forecast_case()
    perfect = signal_metrics(predictions, table, attrs, n_boot=N_BOOT)
    assert perfect["mae"] == 0 and perfect["rmse"] == 0
    assert perfect["beats_persistence"] and perfect["beats_seasonal"]
    assert perfect["n_patients"] == 6 and perfect["bootstrap"]["n_units"] == 6
    seasonal = perfect["forecasters"]["seasonal"]
    assert 0 < seasonal["mae"] < perfect["forecasters"]["persistence"]["mae"]  # the previous beat is a good guess
    assert seasonal["ci"]["mae"]["low"] <= seasonal["mae"] <= seasonal["ci"]["mae"]["high"]
    assert set(seasonal["per_lead"]) == {"I", "II"}
    assert perfect["differences"]["seasonal"]["mae"]["value"] == pytest.approx(-seasonal["mae"])

    hold = dict(predictions, y_pred=persistence_forecast(predictions["context"], 50))
    lazy = signal_metrics(hold, table, attrs, n_boot=N_BOOT)
    assert lazy["differences"]["persistence"]["mae"]["value"] == 0
    assert not lazy["beats_persistence"] and not lazy["beats_seasonal"]
    assert lazy["mae"] == pytest.approx(lazy["forecasters"]["persistence"]["mae"])


def test_forecast_summary_rmse_per_lead():
    y = np.zeros((4, 2, 5))
    pred = y.copy()
    pred[:, 1] = 2.0  # lead II off by 2 everywhere
    res = PatientResampling.of(np.array(["a", "a", "b", "c"]), n_boot=50)
    s = forecast_summary(y, {"model": pred}, ["I", "II"], res)
    assert s["forecasters"]["model"]["per_lead"]["I"]["mae"] == 0
    assert s["forecasters"]["model"]["per_lead"]["II"]["rmse"] == pytest.approx(2.0)
    assert s["mae"] == pytest.approx(1.0) and s["rmse"] == pytest.approx(np.sqrt(2.0))


def _rhythm_case():
    rng = np.random.default_rng(2)
    patients = np.array([f"P{i}" for i in range(8) for _ in range(4)], dtype=object)
    labels = np.array([w % 2 for _ in range(8) for w in range(4)])  # both rhythms in every test patient
    split = np.array([0] * 16 + [2] * 16)  # patients 0-3 train, 4-7 test
    labels[:16] = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0])  # train: class 1 is the majority
    test = np.flatnonzero(split == 2)
    y_true = labels[test].copy()
    y_true[-1] = -1  # one unlabelled test window
    prob1 = np.clip(np.where(labels[test] == 1, 0.8, 0.2) + 0.05 * rng.standard_normal(test.size), 0, 1)
    predictions = {"task": "classify", "indices": test, "y_true": y_true,
                   "y_prob": np.stack([1 - prob1, prob1], axis=1), "y_pred": (prob1 > 0.5).astype(int)}
    table = {"patient": patients, "record": patients, "window": np.zeros(32, np.int32), "start_s": np.zeros(32),
             "label": labels, "split": split}
    attrs = {"rate_hz": RATE, "leads": ["II"], "units": ["mV"], "window": 200, "stride": 200,
             "classes": ["normal", "irregular"], "content_hash": "abc"}
    return predictions, table, attrs


def test_rhythm_metrics_beside_the_majority_class():
    predictions, table, attrs = _rhythm_case()
    m = signal_metrics(predictions, table, attrs, n_boot=N_BOOT)
    assert m["n"] == 15 and m["n_windows"] == 16 and m["n_patients"] == 4
    assert m["accuracy"] == 1.0 and m["ci"]["accuracy"]["n_units"] == 4
    major = m["baselines"]["majority"]
    assert major["tuning"] == {"class": "irregular", "chosen_on": "train"}
    assert major["metrics"]["accuracy"] == pytest.approx(7 / 15)
    assert major["difference"]["accuracy"]["value"] == pytest.approx(8 / 15)
    assert m["beats_majority"]
    one_rhythm_each = dict(table, label=np.array([i % 2 for i in range(8) for _ in range(4)]))
    truth = one_rhythm_each["label"][predictions["indices"]]
    few = signal_metrics(dict(predictions, y_true=truth, y_prob=np.eye(2)[truth]), one_rhythm_each, attrs,
                         n_boot=N_BOOT)
    assert few["accuracy"] == 1.0 and not few["beats_majority"]  # 4 patients: a resample can hold one rhythm only
    assert any("unlabelled" in note for note in m["notes"])
    with pytest.raises(ValueError, match="task"):
        signal_metrics(dict(predictions, task="segment"), table, attrs)


# ---- report and comparison --------------------------------------------------------------------------------------------


def test_reports_hold_the_numbers_and_comparison_lists_every_run(tmp_path):
    from medpipe.signals.store import read_window_table, write_signal_store

    predictions, table, attrs, windows = _forecast_case()
    store = str(tmp_path / "store.zarr")
    write_signal_store(store, windows, table, {k: v for k, v in attrs.items() if k != "content_hash"})
    stored_table = read_window_table(store)
    runs = []
    for name, pred in (("perfect", predictions["y_pred"]),
                       ("persistence", persistence_forecast(predictions["context"], 50))):
        out = tmp_path / name
        m = evaluate_predictions(dict(predictions, y_pred=pred), stored_table, attrs, out, n_boot=N_BOOT,
                                 model_info={"model_name": name, "params": 1234, "train_seconds": 2.5})
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["metrics"]["mae"] == pytest.approx(m["mae"])
        assert saved["metrics"]["beats_persistence"] is (name == "perfect")
        html = (out / "report.html").read_text()
        assert f"{m['forecasters']['seasonal']['mae']:.4f}" in html and "95% CI" in html
        for png in ("windows.png", "errors.png"):
            assert (out / png).read_bytes().startswith(b"\x89PNG")
        assert "P00" not in html and "P00" not in (out / "metrics.json").read_text()  # no pseudonyms
        md = markdown_signal_summary(m)
        assert f"{m['mae']:.4f}" in md and ("beats it" in md) is (name == "perfect")
        runs.append(out)

    r_pred, r_table, r_attrs = _rhythm_case()
    signals = np.random.default_rng(0).standard_normal((32, 1, 200)).astype(np.float32)
    out = tmp_path / "rhythm"
    m = evaluate_predictions(r_pred, r_table, r_attrs, out, signals=signals, n_boot=N_BOOT,
                             model_info={"model_name": "lstm"})
    html = (out / "report.html").read_text()
    assert "Majority class" in html and f"{m['baselines']['majority']['metrics']['accuracy']:.2f}" in html
    for png in ("windows.png", "confusion_matrix.png", "roc.png"):
        assert (out / png).is_file()
    runs.append(out)

    result = compare_signal_runs(runs, tmp_path / "compare")
    assert [r["run"] for r in result["rows"]] == ["perfect", "persistence", "rhythm"]
    assert [r["beats_baselines"] for r in result["rows"]] == [True, False, True]
    md = (tmp_path / "compare" / "comparison.md").read_text()
    assert result["markdown"] == md
    assert all(name in md for name in ("perfect", "persistence", "rhythm", "lstm", "1,234", "2.5"))
    assert (tmp_path / "compare" / "comparison.html").read_text().count("<tr>") == 4  # header + 3 runs
    with pytest.raises(UserError, match="no metrics.json"):
        compare_signal_runs([tmp_path / "missing"], tmp_path / "compare")


def test_evaluate_signal_checkpoint_from_a_trained_run(tmp_path):
    from medpipe.signals.evaluate import evaluate_signal_checkpoint
    from medpipe.signals.store import write_signal_store
    from medpipe.signals.train import train_signals
    from medpipe.training import CheckpointMismatchError
    from medpipe.training.config import TrainConfig

    _, table, attrs, windows = _forecast_case(n_patients=6, per_patient=4)
    table["split"] = np.array([0] * 8 + [1] * 8 + [2] * 8)
    attrs = {k: v for k, v in attrs.items() if k != "content_hash"}
    store, other = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    write_signal_store(store, windows, table, attrs)
    write_signal_store(other, windows[::-1].copy(), table, attrs)
    config = TrainConfig(task="forecast", model="gru", epochs=1, rnn_hidden=8, rnn_layers=1, device="cpu",
                         batch_size=8, horizon_s=0.5)
    train_signals(store, tmp_path / "run", config, progress=False)
    m = evaluate_signal_checkpoint(store, tmp_path / "run", tmp_path / "eval", n_boot=50, device="cpu")
    assert m["task"] == "forecast" and m["horizon"] == 50 and m["n_patients"] == 2
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["model_info"]["model_name"] == "gru" and saved["model_info"]["params"] > 0
    assert (tmp_path / "eval" / "report.html").is_file()
    with pytest.raises(CheckpointMismatchError, match="different store"):
        evaluate_signal_checkpoint(other, tmp_path / "run", tmp_path / "eval2", n_boot=50, device="cpu")


def test_one_patient_gives_no_interval():
    """Resampling a single patient cannot show any spread: the interval is undefined, never a zero-width one."""
    from medpipe.signals.evaluate import PatientResampling

    one = PatientResampling.of(np.array(["P-a"] * 6), n_boot=50)
    low, high = one.interval(lambda m: (m * np.arange(6)).sum(axis=1) / m.sum(axis=1))
    assert np.isnan(low) and np.isnan(high)
    two = PatientResampling.of(np.array(["P-a"] * 3 + ["P-b"] * 3), n_boot=200)
    low, high = two.interval(lambda m: (m * np.arange(6)).sum(axis=1) / m.sum(axis=1))
    assert low < high
