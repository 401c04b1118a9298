"""Quality checks of signal records: each problem found with its reason, clean ECGs pass, short gaps filled."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medpipe.signals.quality import fill_short_gaps, signal_problem
from medpipe.signals.readers import read_signal

FS = 100.0


def _ecg_like(seconds: float = 10.0, leads: int = 3, seed: int = 0) -> np.ndarray:
    """Sharp periodic beats (~72 bpm) on a little noise, (leads, T) in mV."""
    t = np.arange(int(seconds * FS)) / FS
    beats = np.exp(-(((t % 0.83) - 0.4) ** 2) / 0.0005)
    noise = np.random.default_rng(seed).normal(0, 0.01, size=(leads, t.size))
    return (beats[None, :] * np.linspace(0.5, 1.5, leads)[:, None] + noise).astype(np.float32)


def test_real_and_synthetic_clean_ecgs_pass():
    record = read_signal(pydicom.data.get_testdata_file("waveform_ecg.dcm"))
    assert signal_problem(record.signals, record.fs, min_seconds=5.0) is None
    assert signal_problem(_ecg_like(), FS, min_seconds=10.0) is None


def test_too_short():
    problem = signal_problem(_ecg_like(4.0), FS, min_seconds=5.0)
    assert problem is not None and problem[0] == "too_short" and "4.00 s" in problem[1]


def test_infinite_sample():
    data = _ecg_like()
    data[2, 500] = np.inf
    assert signal_problem(data, FS, min_seconds=1.0) == ("not_finite", "lead 3 holds infinite values")


def test_long_nan_run_is_a_problem_and_short_runs_are_not():
    data = _ecg_like()
    data[1, 200:240] = np.nan  # 0.4 s: within the 0.5 s limit
    assert signal_problem(data, FS, min_seconds=1.0) is None
    data[0, 600:660] = np.nan  # 0.6 s
    problem = signal_problem(data, FS, min_seconds=1.0)
    assert problem is not None and problem[0] == "nan_run" and problem[1].startswith("lead 1 ")
    assert signal_problem(data, FS, min_seconds=1.0, max_nan_seconds=1.0) is None
    data[2, :] = np.nan
    assert signal_problem(data, FS, min_seconds=1.0, max_nan_seconds=1.0)[0] == "nan_run"


@pytest.mark.parametrize(("start", "seconds", "flat"), [
    (0, 10.0, True),      # the whole lead constant (a lead off)
    (300, 2.5, True),     # a stretch longer than flat_seconds
    (800, 2.0, True),     # exactly flat_seconds, at the very end
    (300, 1.5, False),    # a shorter pause is an ECG's business
])
def test_flat_lead(start, seconds, flat):
    data = _ecg_like()
    stop = start + int(seconds * FS)
    data[1, start:stop] = 0.25
    problem = signal_problem(data, FS, min_seconds=1.0, flat_seconds=2.0)
    assert (problem == ("flat_lead", "lead 2 is flat for 2 s or more")) is flat
    assert flat or problem is None


def test_flat_check_sees_through_filled_gaps():
    data = _ecg_like()
    data[0, 100:400] = 1.0
    data[0, 250:260] = np.nan  # a short gap inside a flat stretch: still one flat stretch once filled
    assert signal_problem(data, FS, min_seconds=1.0)[0] == "flat_lead"


def test_fill_short_gaps_interpolates_linearly_and_holds_the_ends():
    data = np.array([[np.nan, 1.0, 2.0, np.nan, np.nan, 5.0, np.nan],
                     [np.nan] * 7], dtype=np.float32)
    filled = fill_short_gaps(data)
    np.testing.assert_array_equal(filled[0], [1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 5.0])
    assert np.isnan(filled[1]).all() and filled.dtype == np.float32
    assert np.isnan(data[0, 0])  # the input is not changed


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="leads, samples"):
        signal_problem(np.zeros(10), FS, min_seconds=1.0)
    with pytest.raises(ValueError, match="positive"):
        signal_problem(_ecg_like(), 0.0, min_seconds=1.0)
