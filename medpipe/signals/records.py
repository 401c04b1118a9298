"""Records of physiological signals as read from a file, and the error every reader raises for a bad file.

A `SignalRecord` holds the file's header as read -- identifiers and dates included (PHI) -- so it never leaves
the worker task that read it: `medpipe.signals.signal_deid.deidentify_record` turns it into what the store keeps.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


class SignalReadError(Exception):
    """A file that cannot be read as a signal record. Not a UserError: the ingest quarantines the file with
    `reason`. `detail` is one line and never holds a header value or a path (it reaches reports)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = " ".join(detail.split())
        super().__init__(f"{reason}: {self.detail}" if self.detail else reason)


@dataclass(frozen=True)
class Annotation:
    """One annotation of a record: `sample` is the index at the record's own rate; `symbol` a beat or event code
    (WFDB: "N", "V", "+", ...); `note` its text (WFDB aux_note, e.g. a rhythm "(AFIB"; EDF+ description)."""

    sample: int
    symbol: str
    note: str = ""


@dataclass(frozen=True)
class SignalRecord:
    """A record as read, BEFORE de-identification (holds PHI: never leaves the worker task).

    `signals` is (leads, T) float32 in physical units, NaN where the file marks samples missing.
    """

    signals: np.ndarray
    fs: float
    leads: tuple[str, ...]
    units: tuple[str, ...]
    format: str  # "wfdb" | "edf" | "dicom-waveform" | "csv" | "parquet"
    patient_id: str | None = None
    start: datetime.datetime | None = None
    header: Mapping[str, str] = field(default_factory=dict)
    annotations: tuple[Annotation, ...] = ()

    def __repr__(self) -> str:  # never print header values (PHI) by accident
        return (f"SignalRecord(format={self.format!r}, leads={len(self.leads)}, samples={self.signals.shape[-1]}, "
                f"fs={self.fs})")

    @property
    def duration_s(self) -> float:
        """Length of the record in seconds."""
        return float(self.signals.shape[-1]) / self.fs
