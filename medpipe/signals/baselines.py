"""Naive baselines a signal model must beat: persistence and seasonal ("previous beat") forecasts, majority class.

Every forecast looks at the context only, never at the target. Arrays are (N windows, L leads, T samples).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import detrend

from medpipe.evaluation.baselines import majority_class as _majority_of

__all__ = ["beat_period", "majority_class", "persistence_forecast", "seasonal_forecast"]


def _check_context(context: np.ndarray, horizon: int) -> np.ndarray:
    context = np.asarray(context, dtype=np.float32)
    if context.ndim != 3 or context.shape[2] == 0:
        raise ValueError(f"context must be (N, leads, T) with T > 0, got shape {context.shape}")
    if horizon < 1:
        raise ValueError(f"horizon must be at least one sample, got {horizon}")
    return context


def persistence_forecast(context: np.ndarray, horizon: int) -> np.ndarray:
    """(N, L, horizon) forecast holding the last context value of each lead."""
    context = _check_context(context, horizon)
    return np.repeat(context[:, :, -1:], horizon, axis=2)


def beat_period(context: np.ndarray, rate_hz: float, min_s: float = 0.3, max_s: float = 2.0) -> np.ndarray:
    """(N,) period in samples of each window: the lag of the highest autocorrelation peak in [min_s, max_s].

    Each lead is linearly detrended and the autocorrelations of the leads are summed. A "peak" is a local maximum
    of the unbiased autocorrelation (divided by the overlap, so its position is not pulled towards short lags); peaks
    are ranked by the biased one (the first beat-to-beat lag wins over its multiples). With no peak in range the
    highest biased value in range is taken. The range is clipped to the context length (at least one sample).
    """
    context = _check_context(context, 1).astype(np.float64)
    n, _, t = context.shape
    if rate_hz <= 0 or not 0 < min_s <= max_s:
        raise ValueError(f"need rate_hz > 0 and 0 < min_s <= max_s, got {rate_hz}, {min_s}, {max_s}")
    lo = max(1, math.ceil(min_s * rate_hz))
    hi = min(t - 1, math.floor(max_s * rate_hz))
    if hi < lo:
        return np.full(n, max(1, min(lo, t)), dtype=np.int64)
    x = detrend(np.nan_to_num(context), axis=-1, type="linear")
    size = 1 << (2 * t - 1).bit_length()
    spec = np.fft.rfft(x, n=size, axis=-1)
    biased = np.fft.irfft(spec * np.conj(spec), n=size, axis=-1)[..., :t].sum(axis=1)  # (N, t), summed over leads
    unbiased = biased / (t - np.arange(t))[None, :]  # peak positions are not pulled towards short lags
    lags = np.arange(lo, hi + 1)
    inner = unbiased[:, lags]
    left, right = unbiased[:, lags - 1], unbiased[:, np.minimum(lags + 1, t - 1)]
    is_peak = (inner > left) & (inner >= right) & (lags < t - 1)[None, :]
    height = biased[:, lags]  # among peaks the biased height wins: the first beat over its multiples
    best = np.where(is_peak.any(axis=1), np.where(is_peak, height, -np.inf).argmax(axis=1), height.argmax(axis=1))
    return lags[best].astype(np.int64)


def seasonal_forecast(context: np.ndarray, horizon: int, period: np.ndarray | int) -> np.ndarray:
    """(N, L, horizon) forecast repeating the last ``period`` samples of each window's context (the previous beat).

    ``period`` is one int or (N,) ints, in samples; values are clipped to [1, context length].
    """
    context = _check_context(context, horizon)
    n, _, t = context.shape
    p = np.clip(np.broadcast_to(np.asarray(period, dtype=np.int64), (n,)), 1, t)
    idx = t - p[:, None] + np.arange(horizon)[None, :] % p[:, None]  # (N, H)
    return np.take_along_axis(context, np.broadcast_to(idx[:, None, :], (n, context.shape[1], horizon)), axis=2)


def majority_class(train_labels: np.ndarray, num_classes: int | None = None) -> int:
    """Most frequent label of the train windows (unlabelled -1 ignored; ties: lowest); ValueError when none."""
    labels = np.asarray(train_labels, dtype=np.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    return _majority_of(labels, max(num_classes, 1))
