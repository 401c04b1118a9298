"""Fixed-length windows of multi-lead signals: resampling to a common rate, window starts, cutting, units.

Conventions: signals are ``(leads, T)`` arrays; a window is ``window`` samples long and windows start every
``stride`` samples (``stride < window`` overlaps). The last window that does not fit is dropped (``"drop"``) or
kept and zero-padded past the record's end (``"pad"``); a record shorter than one window therefore gives no
window with ``"drop"`` and one padded window with ``"pad"``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy.signal import resample_poly

__all__ = ["MAX_RESAMPLE_DENOMINATOR", "cut_windows", "resample_signals", "to_millivolts", "window_starts"]

# Largest up/down factor of the rational approximation of rate_hz / fs: exact for every common pair
# (360 -> 100 is 5/18, 500 -> 100 is 1/5, 257 -> 100 is 100/257) and bounded so that the polyphase filter stays small.
MAX_RESAMPLE_DENOMINATOR = 1000

# Factor from each known voltage unit (compared lower-cased, spaces stripped) to millivolts.
_TO_MV = {"v": 1e3, "mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "nv": 1e-6}


def resample_signals(signals: npt.ArrayLike, fs: float, rate_hz: float) -> npt.NDArray[np.float32]:
    """Resample ``(leads, T)`` signals from ``fs`` to ``rate_hz`` Hz (polyphase, anti-aliased); float32 out.

    The ratio ``rate_hz / fs`` is approximated by a fraction with denominator <= MAX_RESAMPLE_DENOMINATOR; equal
    rates return the signals unchanged (as float32). Output length is ``ceil(T * up / down)``.
    """
    array = np.asarray(signals, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"signals must be (leads, samples), got {array.ndim} dimension(s)")
    if not (np.isfinite(fs) and fs > 0 and np.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"sampling rates must be positive and finite, got {fs} Hz -> {rate_hz} Hz")
    ratio = Fraction(float(rate_hz) / float(fs)).limit_denominator(MAX_RESAMPLE_DENOMINATOR)
    if ratio == 1:
        return array
    if ratio.numerator == 0:
        raise ValueError(f"cannot resample {fs} Hz to {rate_hz} Hz: ratio too small")
    if array.shape[1] == 0:
        return array
    out = resample_poly(array, ratio.numerator, ratio.denominator, axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)


def window_starts(n_samples: int, window: int, stride: int,
                  last_partial: Literal["drop", "pad"]) -> npt.NDArray[np.int64]:
    """Sample index where each window starts, in order.

    Full windows start at 0, stride, 2*stride, ... while they fit. With ``"pad"``, a further window starts at the
    next stride position when samples after the last full window would otherwise be lost (or at 0 for a record
    shorter than one window); it is zero-padded by :func:`cut_windows`.
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got window={window}, stride={stride}")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if last_partial not in ("drop", "pad"):
        raise ValueError(f"last_partial must be 'drop' or 'pad', got {last_partial!r}")
    n_full = (n_samples - window) // stride + 1 if n_samples >= window else 0
    starts = np.arange(n_full, dtype=np.int64) * stride
    if last_partial == "pad" and n_samples > 0:
        covered = int(starts[-1]) + window if n_full else 0
        if covered < n_samples and n_full * stride < n_samples:  # stride > window: samples in gaps are skipped
            starts = np.append(starts, np.int64(n_full * stride))
    return starts


def cut_windows(signals: npt.ArrayLike, starts: npt.ArrayLike, window: int) -> npt.NDArray[np.float32]:
    """Windows ``(W, leads, window)`` float32 cut from ``(leads, T)`` signals at ``starts``; zero past the end."""
    array = np.asarray(signals, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"signals must be (leads, samples), got {array.ndim} dimension(s)")
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    index = np.asarray(starts, dtype=np.int64).reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= max(array.shape[1], 1)):
        raise ValueError(f"window starts must lie in [0, {array.shape[1]}), got {index.min()}..{index.max()}")
    leads, n = array.shape
    out = np.zeros((index.size, leads, window), dtype=np.float32)
    for w, start in enumerate(index.tolist()):
        stop = min(start + window, n)
        out[w, :, : stop - start] = array[:, start:stop]
    return out


def _unit_key(unit: str) -> str:
    return unit.strip().lower()


def to_millivolts(signals: npt.ArrayLike, units: tuple[str, ...] | list[str]
                  ) -> tuple[npt.NDArray[np.float32], tuple[str, ...]]:
    """Convert every lead in a voltage unit (V, mV, uV/µV, nV) to mV; other units (and "") are left as they are.

    Returns the float32 signals and the new unit per lead ("mV" for converted leads).
    """
    array = np.array(signals, dtype=np.float32, copy=True)
    if array.ndim != 2 or array.shape[0] != len(units):
        raise ValueError(f"need one unit per lead: {len(units)} unit(s) for signals of shape {array.shape}")
    out_units = []
    for lead, unit in enumerate(units):
        factor = _TO_MV.get(_unit_key(unit))
        if factor is None:
            out_units.append(unit)
            continue
        if factor != 1.0:
            array[lead] *= np.float32(factor)
        out_units.append("mV")
    return array, tuple(out_units)
