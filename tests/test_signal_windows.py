"""Windowing of signals: resampling against analytic sines, window starts/cuts at the edges, unit conversion."""

from __future__ import annotations

import numpy as np
import pytest

from medpipe.signals.windows import cut_windows, resample_signals, to_millivolts, window_starts


def _sine(fs: float, seconds: float, freq: float, amp: float, phase: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(int(round(fs * seconds))) / fs
    return t, amp * np.sin(2 * np.pi * freq * t + phase)


@pytest.mark.parametrize(("fs", "rate"), [(500, 100), (360, 100), (1000, 100), (100, 250)])
def test_resample_keeps_a_sines_frequency_and_amplitude(fs: float, rate: float) -> None:
    freq, amp, seconds = 7.0, 1.3, 10.0
    _, x = _sine(fs, seconds, freq, amp)
    two_leads = np.stack([x, -0.5 * x])
    out = resample_signals(two_leads, fs, rate)
    assert out.dtype == np.float32
    assert out.shape == (2, int(round(rate * seconds)))
    t_out, expected = _sine(rate, seconds, freq, amp)
    inner = (t_out > 1.0) & (t_out < seconds - 1.0)  # the filter's edge effects stay within the first/last second
    np.testing.assert_allclose(out[0, inner], expected[inner], atol=0.02 * amp)
    np.testing.assert_allclose(out[1, inner], -0.5 * expected[inner], atol=0.02 * amp)
    spectrum = np.abs(np.fft.rfft(out[0]))
    peak_hz = np.fft.rfftfreq(out.shape[1], 1 / rate)[int(np.argmax(spectrum))]
    assert peak_hz == pytest.approx(freq, abs=1 / seconds)


def test_resample_removes_content_above_the_new_nyquist() -> None:
    fs, rate = 500, 100
    _, low = _sine(fs, 10, 5.0, 1.0)
    _, high = _sine(fs, 10, 80.0, 1.0)  # above 50 Hz: must not alias into the 100 Hz signal
    out = resample_signals(np.stack([low + high]), fs, rate)
    t_out, expected = _sine(rate, 10, 5.0, 1.0)
    inner = (t_out > 1.0) & (t_out < 9.0)
    np.testing.assert_allclose(out[0, inner], expected[inner], atol=0.03)


def test_resample_identity_at_equal_rates() -> None:
    x = np.random.default_rng(0).normal(size=(3, 257))
    out = resample_signals(x, 250.0, 250.0)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out, x.astype(np.float32))


@pytest.mark.parametrize(("fs", "rate"), [(0.0, 100.0), (500.0, -1.0), (float("nan"), 100.0)])
def test_resample_rejects_bad_rates(fs: float, rate: float) -> None:
    with pytest.raises(ValueError, match="sampling rates"):
        resample_signals(np.zeros((1, 10)), fs, rate)


def test_resample_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="leads, samples"):
        resample_signals(np.zeros(10), 500, 100)


def test_exact_multiple_gives_only_full_windows() -> None:
    for mode in ("drop", "pad"):
        assert window_starts(1000, 250, 250, mode).tolist() == [0, 250, 500, 750]  # type: ignore[arg-type]


def test_overlapping_windows() -> None:
    assert window_starts(1000, 250, 125, "drop").tolist() == [0, 125, 250, 375, 500, 625, 750]
    assert window_starts(1000, 250, 125, "pad").tolist() == [0, 125, 250, 375, 500, 625, 750]
    assert window_starts(1010, 250, 125, "pad").tolist() == [0, 125, 250, 375, 500, 625, 750, 875]


def test_last_partial_window_drop_or_pad() -> None:
    assert window_starts(1100, 250, 250, "drop").tolist() == [0, 250, 500, 750]
    assert window_starts(1100, 250, 250, "pad").tolist() == [0, 250, 500, 750, 1000]


def test_record_shorter_than_a_window() -> None:
    assert window_starts(100, 250, 250, "drop").size == 0
    assert window_starts(100, 250, 250, "pad").tolist() == [0]
    assert window_starts(0, 250, 250, "pad").size == 0
    signals = np.arange(2 * 100, dtype=np.float64).reshape(2, 100) + 1
    windows = cut_windows(signals, window_starts(100, 250, 250, "pad"), 250)
    assert windows.shape == (1, 2, 250) and windows.dtype == np.float32
    np.testing.assert_array_equal(windows[0, :, :100], signals)
    assert not windows[0, :, 100:].any()


def test_stride_larger_than_window_skips_gaps() -> None:
    assert window_starts(10, 3, 5, "drop").tolist() == [0, 5]
    assert window_starts(10, 3, 5, "pad").tolist() == [0, 5]
    assert window_starts(12, 3, 5, "pad").tolist() == [0, 5, 10]


def test_cut_windows_copies_the_right_samples_and_pads_the_last() -> None:
    signals = np.stack([np.arange(1100), -np.arange(1100)]).astype(np.float32)
    starts = window_starts(1100, 250, 200, "pad")
    windows = cut_windows(signals, starts, 250)
    assert windows.shape == (len(starts), 2, 250)
    for w, start in enumerate(starts):
        n = min(250, 1100 - int(start))
        np.testing.assert_array_equal(windows[w, 0, :n], np.arange(start, start + n))
        np.testing.assert_array_equal(windows[w, 1, :n], -np.arange(start, start + n))
        assert not windows[w, :, n:].any()
    assert windows[-1, 0, 249] == 0 and starts[-1] + 250 > 1100  # the last one is padded


def test_cut_windows_with_no_starts() -> None:
    assert cut_windows(np.ones((3, 50)), np.array([], dtype=np.int64), 100).shape == (0, 3, 100)


@pytest.mark.parametrize(("window", "stride", "mode"), [(0, 1, "drop"), (10, 0, "pad"), (10, 5, "keep")])
def test_window_starts_rejects_bad_arguments(window: int, stride: int, mode: str) -> None:
    with pytest.raises(ValueError):
        window_starts(100, window, stride, mode)  # type: ignore[arg-type]


def test_cut_windows_rejects_starts_outside_the_record() -> None:
    with pytest.raises(ValueError, match="window starts"):
        cut_windows(np.ones((1, 50)), np.array([50]), 10)


def test_to_millivolts_converts_voltages_and_leaves_other_units() -> None:
    signals = np.ones((7, 4), dtype=np.float64) * np.array([[2.0], [2.0], [2000.0], [2000.0], [2e6], [0.002], [37.0]])
    units = ("mV", "mv", "uV", "µV", "nV", "V", "degC")
    out, new_units = to_millivolts(signals, units)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:6], 2.0, rtol=1e-6)
    np.testing.assert_allclose(out[6], 37.0)
    assert new_units == ("mV",) * 6 + ("degC",)
    assert signals[2, 0] == 2000.0  # the input is not modified


def test_to_millivolts_unknown_and_empty_units_untouched() -> None:
    out, units = to_millivolts(np.full((2, 3), 5.0), ["", "a.u."])
    np.testing.assert_array_equal(out, 5.0)
    assert units == ("", "a.u.")


def test_to_millivolts_needs_one_unit_per_lead() -> None:
    with pytest.raises(ValueError, match="one unit per lead"):
        to_millivolts(np.zeros((2, 3)), ["mV"])
