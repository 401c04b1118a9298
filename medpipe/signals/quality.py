"""Quality checks of a record's samples: the reasons a record is quarantined, and the filling of short gaps.

`signal_problem` returns the first problem found, checked in this order: "not_finite" (an infinite sample),
"too_short", "nan_run" (missing samples for longer than `max_nan_seconds` in a lead), "flat_lead" (a lead whose
peak-to-peak stays below FLAT_EPSILON over its whole length or over any `flat_seconds` stretch: a lead off, a
saturated amplifier). Short NaN runs are then filled by `fill_short_gaps` (linear interpolation).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import maximum_filter1d, minimum_filter1d

# Peak-to-peak below this (in the record's physical units) is "constant": far below one ADC step of any ECG.
FLAT_EPSILON = 1e-6


def _as_leads(signals: np.ndarray) -> np.ndarray:
    data = np.asarray(signals)
    if data.ndim != 2:
        raise ValueError(f"signals must be (leads, samples), got {data.ndim} dimensions")
    return data


def _longest_run(mask: np.ndarray) -> int:
    """Length of the longest run of True in a 1-D boolean array."""
    if not mask.any():
        return 0
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int((ends - starts).max())


def _flat_leads(data: np.ndarray, width: int) -> np.ndarray:
    """(leads,) bool: does each lead stay within FLAT_EPSILON over its whole length or over any `width` consecutive
    samples? A flat stretch needs width - 1 consecutive steps of at most FLAT_EPSILON, so only leads with such a
    run (none, in a recording with a signal) get the exact rolling max/min test (which costs ~20x more)."""
    leads, samples = data.shape
    if samples == 0:
        return np.zeros(leads, dtype=bool)
    flat = np.ptp(data, axis=1) <= FLAT_EPSILON
    if samples < width:
        return flat
    still = np.abs(np.diff(data, axis=1)) <= FLAT_EPSILON
    for lead in np.flatnonzero(~flat & still.any(axis=1)):
        if _longest_run(still[lead]) >= width - 1:
            peak = maximum_filter1d(data[lead], width)
            trough = minimum_filter1d(data[lead], width)
            low, high = width // 2, samples - (width - 1) // 2  # centres whose window lies inside the lead
            flat[lead] = bool(np.any(peak[low:high] - trough[low:high] <= FLAT_EPSILON))
    return flat


def signal_problem(signals: np.ndarray, fs: float, *, min_seconds: float, max_nan_seconds: float = 0.5,
                   flat_seconds: float = 2.0) -> tuple[str, str] | None:
    """(reason, one-line detail) of the first problem of a (leads, T) record at `fs` Hz, or None when it is clean.

    Leads are named by their 1-based index (never by a name from the file).
    """
    data = _as_leads(signals)
    if not fs > 0:
        raise ValueError("fs must be a positive number of Hz")
    infinite = np.isinf(data)
    if infinite.any():
        lead = int(np.flatnonzero(infinite.any(axis=1))[0]) + 1
        return "not_finite", f"lead {lead} holds infinite values"
    seconds = data.shape[1] / fs
    if seconds < min_seconds:
        return "too_short", f"the record lasts {seconds:.2f} s, less than {min_seconds:g} s"
    missing = np.isnan(data)
    for index in np.flatnonzero(missing.any(axis=1)):
        run = _longest_run(missing[index]) / fs
        if run > max_nan_seconds:
            return "nan_run", f"lead {index + 1} misses {run:.2f} s of samples in a row (limit {max_nan_seconds:g} s)"
    filled = fill_short_gaps(data) if missing.any() else data
    width = max(2, int(round(flat_seconds * fs)))
    flat = np.flatnonzero(_flat_leads(filled.astype(np.float64), width))
    if flat.size:
        return "flat_lead", f"lead {int(flat[0]) + 1} is flat for {flat_seconds:g} s or more"
    return None


def fill_short_gaps(signals: np.ndarray) -> np.ndarray:
    """A copy of a (leads, T) record with every NaN linearly interpolated from its neighbours in the lead (the
    first/last valid value held at the ends). Meant for records `signal_problem` passed, whose gaps are short;
    a lead with no valid sample stays NaN."""
    source = _as_leads(signals)
    data = np.array(source, dtype=np.result_type(source.dtype, np.float32))
    positions = np.arange(data.shape[1])
    for lead in data:
        missing = np.isnan(lead)
        if missing.any() and not missing.all():
            lead[missing] = np.interp(positions[missing], positions[~missing], lead[~missing])
    return data
