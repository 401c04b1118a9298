"""Signal models and training on the engine: shapes, learning, forecasting vs persistence, resume, refusals."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import zarr

from medpipe.signals.data import SignalWindowDataset, read_windows
from medpipe.signals.models import SIGNAL_MODELS, SignalModelSpec, build_signal_model, standardise
from medpipe.signals.store import write_signal_store
from medpipe.signals.train import load_signal_model, predict_signals, train_signals
from medpipe.training import (CheckpointMismatchError, MissingLabelsError,
                              StoreNotCompleteError, TrainingError, UnknownModelError)
from medpipe.training.checkpoints import load_checkpoint
from medpipe.training.config import TrainConfig
from medpipe.training.selection import improved, lower_is_better
from training_store import check_kill_and_resume

RATE = 50.0
WINDOW = 200  # 4 s at 50 Hz
LEADS = 3
SPLITS = [0] * 12 + [1] * 4 + [2] * 4  # per patient: 12 train, 4 val, 4 test
PER_PATIENT = 8


def _store(url, windows_of, labels_of, seed=0) -> str:
    """A signals store of 20 patients x 8 windows; `windows_of(rng, patient)` -> (8, L, T)."""
    rng = np.random.default_rng(seed)
    signals, table = [], {k: [] for k in ("patient", "record", "window", "start_s", "label", "split")}
    for p, split in enumerate(SPLITS):
        signals.append(windows_of(rng, p))
        for w in range(PER_PATIENT):
            table["patient"].append(f"patient-{p:02d}")
            table["record"].append(f"record-{p:02d}")
            table["window"].append(w)
            table["start_s"].append(w * WINDOW / RATE)
            table["label"].append(labels_of(p))
            table["split"].append(split)
    write_signal_store(str(url), np.concatenate(signals), {k: np.asarray(v) for k, v in table.items()},
                       {"rate_hz": RATE, "leads": ["I", "II", "V1"], "units": ["mV"] * LEADS, "window": WINDOW,
                        "stride": WINDOW, "classes": ["regular", "fast"]})
    return str(url)


def _rhythm_label(p: int) -> int:
    return 1 if p % 3 == 0 else 0  # val patients 12..15 -> 1, 0, 0, 1; train 4 of 12 are class 1


def _rhythm(rng, p):
    """Class 0: a 1 Hz sine; class 1: 1.8 Hz; random amplitude, phase and noise per window and lead (mV)."""
    t = np.arange(WINDOW) / RATE
    freq = 1.8 if _rhythm_label(p) else 1.0
    amp = rng.uniform(0.5, 1.5, size=(PER_PATIENT, LEADS, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(PER_PATIENT, LEADS, 1))
    return amp * np.sin(2 * np.pi * freq * t + phase) + 0.05 * rng.standard_normal((PER_PATIENT, LEADS, WINDOW))


def _periodic(rng, p):
    """A clean periodic multi-lead signal: two harmonics of a per-patient rate, lead-specific gain and lag."""
    t = np.arange(WINDOW) / RATE
    freq = rng.uniform(1.0, 2.0)
    phase = rng.uniform(0, 2 * np.pi, size=(PER_PATIENT, 1, 1))
    gain = np.array([1.0, 0.6, -0.8])[None, :, None]
    lag = np.array([0.0, 0.4, 1.1])[None, :, None]
    arg = 2 * np.pi * freq * t + phase + lag
    return gain * (np.sin(arg) + 0.4 * np.sin(2 * arg + 0.3))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the small recurrent steps gain nothing from more, and a busy shared machine (other
    processes on the same cores) slows spinning OpenMP threads by orders of magnitude. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rhythm_store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("sig") / "rhythm.zarr", _rhythm, _rhythm_label)


@pytest.fixture(scope="module")
def periodic_store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("sig") / "periodic.zarr", _periodic, lambda p: -1, seed=1)


def _quick(**kwargs) -> TrainConfig:
    base = dict(epochs=6, batch_size=16, rnn_hidden=16, rnn_layers=1, early_stopping_patience=0, lr=5e-3)
    return TrainConfig(**{**base, **kwargs})


# -- models --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,bidirectional,layers", [("lstm", True, 2), ("lstm", False, 1), ("gru", True, 1),
                                                       ("gru", False, 2), ("resnet1d", False, 1)])
def test_model_output_shapes(name, bidirectional, layers):
    x = torch.randn(4, LEADS, 120)
    common = dict(name=name, leads=LEADS, hidden=8, layers=layers, bidirectional=bidirectional)
    clf = build_signal_model(SignalModelSpec(task="classify", num_outputs=5, **common)).eval()
    assert clf(x).shape == (4, 5)
    fc = build_signal_model(SignalModelSpec(task="forecast", num_outputs=0, horizon=7, **common)).eval()
    out = fc(x)
    assert out.shape == (4, LEADS, 7)
    # an untrained forecaster starts at persistence (the last context sample), in the input's units
    torch.testing.assert_close(out, x[:, :, -1:].expand(-1, -1, 7), rtol=1e-4, atol=1e-4)
    if name != "resnet1d":
        rnn = fc.rnn  # type: ignore[attr-defined]
        assert rnn.bidirectional is bidirectional and rnn.num_layers == layers


def test_model_registry_and_standardisation():
    assert set(SIGNAL_MODELS) == {"lstm", "gru", "resnet1d"}
    with pytest.raises(UnknownModelError, match="valid names"):
        build_signal_model(SignalModelSpec(name="small-cnn", task="classify", leads=2, num_outputs=2))
    with pytest.raises(TrainingError, match="horizon"):
        build_signal_model(SignalModelSpec(name="gru", task="forecast", leads=2, num_outputs=0, horizon=0))
    x = torch.randn(2, 3, 50) * 0.2 + 5.0
    z, mean, std = standardise(x)
    torch.testing.assert_close(z.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z * std + mean, x)
    flat = standardise(torch.ones(1, 1, 10))[0]
    assert torch.all(flat == 0), "a flat lead is centred, not divided by ~0"


def test_mae_is_minimised():
    assert lower_is_better("mae") and lower_is_better("val_rmse") and not lower_is_better("macro_f1")
    assert improved(0.1, 0.2, "mae") and not improved(0.3, 0.2, "mae")


# -- data ----------------------------------------------------------------------------------------------------------
def test_dataset_batches(rhythm_store):
    store = zarr.open_group(rhythm_store, mode="r")
    full = np.asarray(store["signals"][...])
    rows = np.array([150, 3, 77, 4])
    np.testing.assert_array_equal(read_windows(store["signals"], rows), full[rows])
    for cache in (True, False):
        ds = SignalWindowDataset(rhythm_store, "val", "forecast", horizon=10, cache=cache)
        assert ds.cached is cache and len(ds) == 4 * PER_PATIENT and ds.sample_shape == (LEADS, WINDOW - 10)
        batch = ds.__getitems__([0, 5, 2])
        idx = batch["index"].numpy()
        np.testing.assert_array_equal(batch["image"].numpy(), full[idx, :, : WINDOW - 10])
        np.testing.assert_array_equal(batch["target"].numpy(), full[idx, :, WINDOW - 10 :])
    clf = SignalWindowDataset(rhythm_store, "train", "classify", augment=True)
    batch = clf.__getitems__(list(range(6)))
    assert batch["image"].shape == (6, LEADS, WINDOW) and batch["label"].dtype == torch.int64
    assert not np.array_equal(batch["image"].numpy(), full[batch["index"].numpy()]), "train is augmented"
    with pytest.raises(TrainingError, match="horizon"):
        SignalWindowDataset(rhythm_store, "val", "forecast", horizon=WINDOW)


# -- training ------------------------------------------------------------------------------------------------------
def test_rhythm_classification_learns(rhythm_store, tmp_path):
    result = train_signals(rhythm_store, tmp_path / "run", _quick(model="resnet1d", epochs=8, class_weights=True),
                           progress=False)
    assert result.monitor == "macro_f1" and {"accuracy", "macro_f1"} <= set(result.test_metrics)
    model, meta = load_signal_model(result.best_path)
    assert meta["layout"] == "signals" and meta["rate_hz"] == RATE and meta["window"] == WINDOW
    out = predict_signals(model, rhythm_store, "val")
    y_true = out["y_true"]
    majority = np.bincount(y_true).max() / y_true.size
    assert out["y_prob"].shape == (y_true.size, 2) and out["y_pred"].shape == y_true.shape
    assert (out["y_pred"] == y_true).mean() > majority + 0.2, "the classifier learns beyond the majority class"


def test_forecast_beats_persistence(periodic_store, tmp_path):
    cfg = _quick(task="forecast", model="gru", bidirectional=False, rnn_hidden=32, horizon_s=0.3, epochs=6,
                 lr=1e-2)
    result = train_signals(periodic_store, tmp_path / "run", cfg, progress=False)
    assert result.monitor == "mae" and {"mae", "rmse"} <= set(result.test_metrics)
    model, _ = load_signal_model(result.best_path)
    out = predict_signals(model, periodic_store, "val")
    horizon = int(round(0.3 * RATE))
    windows = np.asarray(zarr.open_group(periodic_store, mode="r")["signals"][...])[out["indices"]]
    np.testing.assert_array_equal(out["context"], windows[:, :, :-horizon])
    np.testing.assert_array_equal(out["y_true"], windows[:, :, -horizon:])
    assert out["y_pred"].shape == (len(out["indices"]), LEADS, horizon)
    persistence = np.abs(windows[:, :, -horizon - 1 : -horizon] - windows[:, :, -horizon:]).mean()
    model_mae = np.abs(out["y_pred"] - out["y_true"]).mean()
    assert model_mae < 0.6 * persistence, (model_mae, persistence)


def test_resume_after_kill_continues(rhythm_store, tmp_path):
    cfg = _quick(model="gru", epochs=3)
    check_kill_and_resume(train_signals, rhythm_store, tmp_path, cfg, epochs=3)


def test_mismatches_are_refused(rhythm_store, periodic_store, tmp_path):
    cfg = _quick(model="resnet1d", epochs=1)
    run = tmp_path / "run"
    train_signals(rhythm_store, run, cfg, progress=False)
    other = _store(tmp_path / "other.zarr", _rhythm, _rhythm_label, seed=9)
    with pytest.raises(CheckpointMismatchError, match="different store"):
        train_signals(other, run, cfg, resume=True, progress=False)
    with pytest.raises(CheckpointMismatchError, match="different config"):
        train_signals(rhythm_store, run, _quick(model="resnet1d", epochs=1, rnn_hidden=8), resume=True,
                      progress=False)
    with pytest.raises(TrainingError, match="horizon"):
        train_signals(periodic_store, tmp_path / "h", _quick(task="forecast", horizon_s=WINDOW / RATE),
                      progress=False)
    with pytest.raises(MissingLabelsError, match="2 classes"):
        train_signals(periodic_store, tmp_path / "c", _quick(), progress=False)
    with pytest.raises(UnknownModelError, match="valid names"):
        train_signals(rhythm_store, tmp_path / "m", _quick(model="small-cnn"), progress=False)
    with pytest.raises(TrainingError, match="classify .rhythm. or forecast"):
        train_signals(rhythm_store, tmp_path / "s", _quick(task="segment"), progress=False)
    with pytest.raises(TrainingError, match="image stores"):
        train_signals(rhythm_store, tmp_path / "f", _quick(train_fraction=0.5), progress=False)
    with pytest.raises(StoreNotCompleteError):
        train_signals(str(tmp_path / "missing.zarr"), tmp_path / "x", cfg, progress=False)
    with pytest.raises(TrainingError, match="signal model"):
        predict_signals(torch.nn.Linear(2, 2), rhythm_store)


def test_engine_entry_points_take_signal_stores(rhythm_store, periodic_store, tmp_path):
    from medpipe.training.engine import check_training_inputs, store_layout_of, train

    assert store_layout_of(rhythm_store) == "signals"
    with pytest.raises(MissingLabelsError, match="2 classes"):
        check_training_inputs(periodic_store, _quick(), tmp_path / "none")
    result = train(rhythm_store, tmp_path / "run", _quick(epochs=1), progress=False)
    assert load_checkpoint(result.best_path)["model_name"] == "resnet1d", "model auto for rhythm classification"
    assert TrainConfig(task="forecast").model_name("signals") == "lstm", "model auto for forecasting"
