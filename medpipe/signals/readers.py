"""Read physiological signal files (WFDB, EDF/BDF, DICOM waveform ECG, CSV/TSV/Parquet tables) into `SignalRecord`s.

One interface: `read_signal(path)` dispatches on the file suffix through a registry of `SignalReader`s; every
bad input ends as a `SignalReadError(reason, detail)` -- never another exception type -- whose detail names no
header value and no path. The de-identification of what is read happens later (`signal_deid`).

Format notes:
- WFDB: the `.hea` is the record; its `.dat` (and annotation files such as `.atr`) are companions. Multi-segment
  records are joined (`m2s=True`). Header comments `key: value` become header fields; the patient comes from a
  `patient`/`patient_id`/`subject` comment, the start from the record line's base date and time.
- EDF/BDF: discontinuous EDF+D/BDF+D files are refused (their samples are not one time line). Signals at
  different rates are not resampled: the signals at the most common rate are kept (the
  header notes `dropped_signals`); when no rate has more signals than every other, `mixed_sampling_rates`. The
  patient is the first subfield of the header's patient field (EDF+: the patient code), "X" meaning unknown.
- DICOM: 12-lead / general / ambulatory ECG Waveform Storage; the original multiplex group of the longest
  duration (the rhythm strip, not a derived median beat). `Dataset.waveform_array` already applies channel
  sensitivity, its correction factor and baseline, so values are in the ChannelSensitivityUnits (e.g. uV).
- Tables: one numeric column per lead, `name[unit]` gives the unit (`II[mV]`); an optional `time` column (seconds,
  or `time[ms]`) gives the rate, else `table_rate_hz`; an optional `patient`/`patient_id`/`subject` column holds
  the patient (one per file).
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from medpipe.signals.records import Annotation, SignalReadError, SignalRecord

# A record declaring more values (samples x leads) than this is refused before its data is read (1 GiB float32).
MAX_SIGNAL_VALUES = 2**28
# Header comment keys / table columns that name the patient (compared lower-case, spaces and dashes as "_").
PATIENT_KEYS = frozenset({"patient", "patient_id", "patientid", "subject", "subject_id", "subjectid"})
# WFDB annotation files read beside a record, in this order of preference (the first one present is read).
ANNOTATION_EXTENSIONS = ("atr", "ann", "ecg", "qrs")
# DICOM SOP classes of ECG waveforms: 12-lead, general, ambulatory, general 32-bit.
ECG_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.9.1.1", "1.2.840.10008.5.1.4.1.1.9.1.2", "1.2.840.10008.5.1.4.1.1.9.1.3",
    "1.2.840.10008.5.1.4.1.1.9.1.4",
})
TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3}
IRREGULAR_TOLERANCE = 0.01  # a table's time steps may differ from their median by 1 %


@dataclass(frozen=True)
class SignalReader:
    """One file format: the suffixes it reads and `read(path, table_rate_hz) -> SignalRecord`."""

    format: str
    suffixes: tuple[str, ...]
    read: Callable[[Path, float | None], SignalRecord]


def normalize_key(key: str) -> str:
    """Header key as compared: lower case, runs of spaces and dashes as one underscore."""
    return re.sub(r"[\s\-]+", "_", key.strip().lower())


def _too_large(values: int) -> None:
    if values > MAX_SIGNAL_VALUES:
        raise SignalReadError("too_large", f"the header declares {values} values (limit {MAX_SIGNAL_VALUES})")


def _valid_rate(fs: Any) -> float:
    try:
        rate = float(fs)
    except (TypeError, ValueError):
        raise SignalReadError("bad_sampling_rate", "the sampling rate is not a number") from None
    if not np.isfinite(rate) or rate <= 0:
        raise SignalReadError("bad_sampling_rate", "the sampling rate is not a positive number")
    return rate


def _make_record(signals: np.ndarray, fs: Any, leads: Iterable[str], units: Iterable[str], fmt: str,
                 **fields: Any) -> SignalRecord:
    """The checks every reader shares: a positive rate, at least one lead and one sample, names per lead."""
    rate = _valid_rate(fs)
    lead_names, unit_names = tuple(str(x).strip() for x in leads), tuple(str(x).strip() for x in units)
    if signals.ndim != 2 or signals.shape[0] == 0:
        raise SignalReadError("no_signals", "the file holds no signal")
    if signals.shape[1] == 0:
        raise SignalReadError("no_samples", "the file holds no samples")
    if len(lead_names) != signals.shape[0] or len(unit_names) != signals.shape[0]:
        raise SignalReadError("unreadable_header", "the number of lead names does not match the signals")
    with np.errstate(over="ignore"):
        data = np.ascontiguousarray(signals, dtype=np.float32)
    return SignalRecord(signals=data, fs=rate, leads=lead_names, units=unit_names, format=fmt, **fields)


def _patient_from(header: Mapping[str, str]) -> str | None:
    for key, value in header.items():
        if normalize_key(key) in PATIENT_KEYS and value.strip():
            return value.strip()
    return None


# ---------------------------------------------------------------------------------------------------- WFDB

def _comment_fields(comments: Iterable[str]) -> dict[str, str]:
    """WFDB header comments: `key: value` lines as fields, other lines as `comment<i>` (free text)."""
    fields: dict[str, str] = {}
    for i, line in enumerate(comments, start=1):
        key, sep, value = str(line).partition(":")
        key = key.strip()
        if not sep or not key or len(key) > 40:
            key, value = f"comment{i}", str(line)
        if key in fields:
            key = f"{key} ({i})"
        fields[key] = value.strip()
    return fields


def _wfdb_record_line(header_path: Path) -> int | None:
    """Checks of the header's record line, read here rather than by wfdb (which silently reads a negative rate as
    its default 250 Hz, and parses the whole header, slowly, on every call): the rate must be a positive number,
    the signal count an integer. Returns signals x samples when the line declares them (for the size limit before
    any sample is read), None for multi-segment records or a missing length (wfdb's own header parse decides)."""
    try:
        text = header_path.read_text(encoding="latin-1")
    except OSError:
        raise SignalReadError("missing_file", "the header file cannot be read") from None
    for line in text.splitlines():
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        if len(tokens) >= 3:
            rate = tokens[2].split("/")[0].split("(")[0]
            try:
                value = float(rate)
            except ValueError:
                raise SignalReadError("unreadable_header", "the record line's sampling rate is not a number") from None
            if not value > 0:
                raise SignalReadError("bad_sampling_rate", "the sampling rate is not a positive number")
        if len(tokens) < 2 or not tokens[1].isdigit():
            raise SignalReadError("unreadable_header", "the record line does not give the number of signals")
        if "/" in tokens[0] or len(tokens) < 4 or not tokens[3].isdigit():
            return None
        return int(tokens[1]) * int(tokens[3])
    raise SignalReadError("unreadable_header", "the header has no record line")


def wfdb_segment_names(header_text: str) -> tuple[str, ...] | None:
    """The segment records a multi-segment WFDB header lists (its record line reads `name/n_segments ...`, the next
    n lines `segment_name length`; "~" marks a gap, not a file); None for a single-segment header or one whose
    record line cannot be read (the reader reports that when it reads the record)."""
    lines = [tokens for tokens in (line.split("#", 1)[0].split() for line in header_text.splitlines()) if tokens]
    if not lines or "/" not in lines[0][0]:
        return None
    count = lines[0][0].split("/", 1)[1]
    if not count.isdigit():
        return None
    return tuple(tokens[0] for tokens in lines[1 : 1 + int(count)] if tokens[0] != "~")


def _wfdb_annotations(record_name: str, folder: Path, stem: str) -> tuple[Annotation, ...]:
    import wfdb

    for ext in ANNOTATION_EXTENSIONS:
        if not (folder / f"{stem}.{ext}").is_file():
            continue
        try:
            ann = wfdb.rdann(record_name, ext)
        except Exception as exc:
            raise SignalReadError("unreadable_annotations",
                                  f"the .{ext} annotation file cannot be read ({type(exc).__name__})") from None
        notes = list(ann.aux_note or [])
        notes += [""] * (len(ann.sample) - len(notes))
        return tuple(Annotation(int(s), str(sym), str(note or "").strip("\x00 "))
                     for s, sym, note in zip(ann.sample, ann.symbol or [""] * len(ann.sample), notes))
    return ()


def _wfdb_header(record_name: str) -> Any:
    """wfdb's parse of a record's header; SignalReadError when it fails."""
    import wfdb

    try:
        return wfdb.rdheader(record_name)
    except FileNotFoundError:
        raise SignalReadError("missing_file", "the header file is missing") from None
    except Exception as exc:
        raise SignalReadError("unreadable_header", f"the WFDB header cannot be parsed ({type(exc).__name__})") from None


def _read_wfdb(path: Path, table_rate_hz: float | None) -> SignalRecord:
    import wfdb

    record_name = str(path.with_suffix(""))
    values = _wfdb_record_line(path)
    if values is None:  # wfdb's header parse gives the size (a second parse, for these records only)
        header = _wfdb_header(record_name)
        values = int(header.sig_len or 0) * int(header.n_sig or 0)
    _too_large(values)
    try:
        record = wfdb.rdrecord(record_name, m2s=True, physical=True)
    except FileNotFoundError:
        raise SignalReadError("missing_data_file", "a data file named in the header is missing") from None
    except Exception as exc:
        _wfdb_header(record_name)  # a header wfdb cannot parse is the header's fault, not the samples'
        truncated = "not loaded correctly" in str(exc)
        raise SignalReadError("truncated_data" if truncated else "unreadable_data",
                              f"the WFDB samples cannot be read ({type(exc).__name__})") from None
    if record.p_signal is None or not record.n_sig:
        raise SignalReadError("no_signals", "the record holds no signal")
    fields = _comment_fields(record.comments or [])
    start = None
    if record.base_date is not None:
        start = datetime.datetime.combine(record.base_date, record.base_time or datetime.time())
    return _make_record(
        np.asarray(record.p_signal).T, record.fs, record.sig_name, [u or "" for u in record.units], "wfdb",
        patient_id=_patient_from(fields), start=start, header=fields,
        annotations=_wfdb_annotations(record_name, path.parent, path.stem))


# ----------------------------------------------------------------------------------------------------- EDF

def _edf_text_field(path: Path, offset: int, size: int = 80) -> str:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size).decode("latin-1").strip()


def _edf_keep(rates: list[float]) -> list[int]:
    """Indices of the signals at the most common rate; mixed_sampling_rates when no rate dominates."""
    ranked = Counter(rates).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        raise SignalReadError("mixed_sampling_rates", f"{len(ranked)} sampling rates, none shared by most signals")
    return [i for i, rate in enumerate(rates) if rate == ranked[0][0]]


def _read_edf(path: Path, table_rate_hz: float | None) -> SignalRecord:
    import pyedflib

    if _edf_text_field(path, 192, 44).upper().startswith(("EDF+D", "BDF+D")):
        raise SignalReadError("discontinuous_recording", "EDF+D/BDF+D records with gaps are not supported")
    try:
        reader = pyedflib.EdfReader(str(path))
    except OSError as exc:
        truncated = "filesize" in str(exc).lower()
        raise SignalReadError("truncated_data" if truncated else "unreadable_header",
                              "the file is not a readable EDF/BDF file") from None
    try:
        count = reader.signals_in_file
        if count == 0:
            raise SignalReadError("no_signals", "the file holds no signal")
        rates = [float(reader.getSampleFrequency(i)) for i in range(count)]
        keep = _edf_keep(rates)
        n_samples = reader.getNSamples()
        _too_large(int(sum(n_samples[i] for i in keep)))
        signals = np.stack([reader.readSignal(i) for i in keep])
        labels = [reader.getLabel(i) for i in keep]
        units = [reader.getPhysicalDimension(i) for i in keep]
        plus = reader.filetype in (pyedflib.FILETYPE_EDFPLUS, pyedflib.FILETYPE_BDFPLUS)
        info = reader.getHeader() if plus else {}
        try:
            start: datetime.datetime | None = reader.getStartdatetime()
        except Exception:
            start = None
        onsets, _, descriptions = reader.readAnnotations()
    finally:
        reader.close()
    patient_field, recording_field = _edf_text_field(path, 8), _edf_text_field(path, 88)
    header = {"patient_field": patient_field, "recording_field": recording_field}
    # pyedflib's "gender" repeats "sex"; the start is kept as a datetime
    header.update({k: str(v) for k, v in info.items() if k not in ("startdate", "gender") and str(v).strip()})
    if len(keep) < count:
        header["dropped_signals"] = str(count - len(keep))
    first = patient_field.split()[0] if patient_field.split() else ""
    fs = rates[keep[0]]
    annotations = tuple(Annotation(int(round(float(t) * fs)), "", str(text)) for t, text in zip(onsets, descriptions))
    return _make_record(signals, fs, labels, units, "edf", patient_id=first if first not in ("", "X") else None,
                        start=start, header=header, annotations=annotations)


# --------------------------------------------------------------------------------------------------- DICOM

def _lead_name(channel: Any, index: int) -> str:
    """'Lead I (Einthoven)' -> 'I', 'Lead aVR' -> 'aVR'; the channel label, else 'ch<n>' without a code."""
    sources = channel.get("ChannelSourceSequence") or []
    meaning = str(sources[0].get("CodeMeaning", "")).strip() if sources else ""
    match = re.match(r"lead\s+(\S+)", meaning, re.I)
    if match:
        return match.group(1)
    return meaning or str(channel.get("ChannelLabel", "")).strip() or f"ch{index + 1}"


def _channel_unit(channel: Any) -> str:
    units = channel.get("ChannelSensitivityUnitsSequence") or []
    if "ChannelSensitivity" not in channel or not units:
        return ""
    return str(units[0].get("CodeValue", "")).strip()


def _dicom_start(ds: Any) -> datetime.datetime | None:
    from pydicom.valuerep import DA, DT, TM

    try:
        if ds.get("AcquisitionDateTime"):
            return DT(str(ds.AcquisitionDateTime)).replace(tzinfo=None)
        for date_name, time_name in (("StudyDate", "StudyTime"), ("ContentDate", "ContentTime")):
            if ds.get(date_name):
                day = DA(str(ds.get(date_name)))
                clock = TM(str(ds.get(time_name))) if ds.get(time_name) else datetime.time()
                return datetime.datetime.combine(day, clock).replace(tzinfo=None)
    except (ValueError, TypeError, OverflowError):
        return None
    return None


_DICOM_HEADER_FIELDS = ("PatientName", "PatientBirthDate", "PatientSex", "PatientAge", "OtherPatientIDs",
                        "AccessionNumber", "StudyID", "StudyDescription", "InstitutionName",
                        "ReferringPhysicianName", "OperatorsName")
_WAVEFORM_ELEMENTS = ("NumberOfWaveformChannels", "NumberOfWaveformSamples", "WaveformBitsAllocated",
                      "WaveformSampleInterpretation", "WaveformData", "SamplingFrequency",
                      "ChannelDefinitionSequence")


def _ecg_item(items: list[Any]) -> int:
    """Index of the original multiplex group of the longest duration (first among equals)."""
    def duration(item: Any) -> float:
        try:
            return float(item.NumberOfWaveformSamples) / float(item.SamplingFrequency)
        except (AttributeError, TypeError, ValueError, ZeroDivisionError):
            return 0.0
    original = [i for i, item in enumerate(items) if str(item.get("WaveformOriginality", "")).upper() == "ORIGINAL"]
    candidates = original or list(range(len(items)))
    return max(candidates, key=lambda i: (duration(items[i]), -i))


def _read_dicom(path: Path, table_rate_hz: float | None) -> SignalRecord:
    import pydicom
    from pydicom.waveforms.numpy_handler import WAVEFORM_DTYPES

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:
        raise SignalReadError("unreadable_file", f"not a readable DICOM file ({type(exc).__name__})") from None
    if "WaveformSequence" not in ds or not ds.WaveformSequence:
        raise SignalReadError("not_a_waveform", "the DICOM file holds no waveform sequence")
    if str(ds.get("SOPClassUID", "")) not in ECG_SOP_CLASSES:
        raise SignalReadError("unsupported_waveform", "the DICOM waveform is not an ECG")
    items = list(ds.WaveformSequence)
    index = _ecg_item(items)
    item = items[index]
    missing = [name for name in _WAVEFORM_ELEMENTS if name not in item]
    if missing:
        raise SignalReadError("unreadable_header", f"the waveform lacks {', '.join(missing)}")
    channels, samples = int(item.NumberOfWaveformChannels), int(item.NumberOfWaveformSamples)
    bits, interpretation = int(item.WaveformBitsAllocated), str(item.WaveformSampleInterpretation)
    if (bits, interpretation) not in WAVEFORM_DTYPES:
        raise SignalReadError("unsupported_waveform", f"{bits}-bit {interpretation} samples are not supported")
    _valid_rate(item.SamplingFrequency)
    _too_large(channels * samples)
    if len(item.WaveformData) < channels * samples * bits // 8:
        raise SignalReadError("truncated_data", "the waveform data is shorter than its header declares")
    definitions = list(item.ChannelDefinitionSequence)
    if len(definitions) != channels:
        raise SignalReadError("unreadable_header", "the channel definitions do not match the channel count")
    try:
        data = ds.waveform_array(index).T
    except Exception as exc:
        raise SignalReadError("unreadable_data", f"the waveform cannot be decoded ({type(exc).__name__})") from None
    header = {name: str(ds.get(name)) for name in _DICOM_HEADER_FIELDS if str(ds.get(name, "") or "").strip()}
    patient = str(ds.get("PatientID", "") or "").strip() or None
    return _make_record(data, item.SamplingFrequency, [_lead_name(c, i) for i, c in enumerate(definitions)],
                        [_channel_unit(c) for c in definitions], "dicom-waveform", patient_id=patient,
                        start=_dicom_start(ds), header=header)


# -------------------------------------------------------------------------------------------------- tables

_UNIT_SUFFIX = re.compile(r"^(.*?)\s*\[([^\[\]]*)\]\s*$")
TIME_COLUMNS = frozenset({"time", "t", "time_s", "seconds"})


def split_unit(column: str) -> tuple[str, str]:
    """'II[mV]' -> ('II', 'mV'); 'II' -> ('II', '')."""
    match = _UNIT_SUFFIX.match(column)
    return (match.group(1).strip(), match.group(2).strip()) if match else (column.strip(), "")


def _table_rate(values: Any, unit: str) -> float:
    if unit.lower() not in TIME_UNITS:
        raise SignalReadError("unknown_time_unit", "the time column's unit is not s or ms")
    times = np.asarray(values, dtype=np.float64) * TIME_UNITS[unit.lower()]
    if times.size < 2 or not np.all(np.isfinite(times)):
        raise SignalReadError("bad_sampling_rate", "the time column needs two or more finite values")
    steps = np.diff(times)
    step = float(np.median(steps))
    if not step > 0:
        raise SignalReadError("bad_sampling_rate", "the time column does not increase")
    if float(np.max(np.abs(steps - step))) > IRREGULAR_TOLERANCE * step:
        raise SignalReadError("irregular_sampling", "the time column's steps are not regular")
    return float(round(1.0 / step, 6))


def _table_patient(column: Any) -> str | None:
    import pandas as pd

    values = column.dropna()
    if pd.api.types.is_float_dtype(values) and bool(np.all(np.mod(values, 1) == 0)):
        values = values.astype(np.int64)
    distinct = values.astype(str).str.strip().unique()
    if len(distinct) > 1:
        raise SignalReadError("mixed_patients", f"the patient column holds {len(distinct)} patients")
    return str(distinct[0]) if len(distinct) and distinct[0] else None


def _table_record(frame: Any, table_rate_hz: float | None, fmt: str) -> SignalRecord:
    """One numeric column per lead; optional time and patient columns (see the module docstring)."""
    import pandas as pd

    leads: list[str] = []
    units: list[str] = []
    columns: list[Any] = []
    fs: float | None = None
    patient = None
    for column in frame.columns:
        base, unit = split_unit(str(column))
        key = normalize_key(base)
        if key in TIME_COLUMNS and fs is None:
            if not pd.api.types.is_numeric_dtype(frame[column]):
                raise SignalReadError("bad_sampling_rate", "the time column is not numeric")
            fs = _table_rate(frame[column].to_numpy(), unit)
        elif key in PATIENT_KEYS:
            patient = _table_patient(frame[column])
        elif pd.api.types.is_numeric_dtype(frame[column]) and not pd.api.types.is_bool_dtype(frame[column]):
            leads.append(base)
            units.append(unit)
            columns.append(column)
    if not columns:
        raise SignalReadError("no_signal_columns", "the table has no numeric signal column")
    if fs is None:
        if table_rate_hz is None:
            raise SignalReadError("no_sampling_rate", "the table has no time column and no rate was configured")
        fs = _valid_rate(table_rate_hz)
    signals = frame[columns].to_numpy(dtype=np.float64, na_value=np.nan).T
    return _make_record(signals, fs, leads, units, fmt, patient_id=patient)


def _reader_of_table(fmt: str, load: Callable[[Path], Any]) -> Callable[[Path, float | None], SignalRecord]:
    def read(path: Path, table_rate_hz: float | None) -> SignalRecord:
        try:
            frame = load(path)
        except Exception as exc:
            raise SignalReadError("unreadable_file", f"not a readable {fmt} table ({type(exc).__name__})") from None
        return _table_record(frame, table_rate_hz, fmt)
    return read


def _load_csv(path: Path) -> Any:
    import pandas as pd

    return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")


def _load_parquet(path: Path) -> Any:
    import pandas as pd

    return pd.read_parquet(path, engine="pyarrow")


# ------------------------------------------------------------------------------------------------ registry

READERS: tuple[SignalReader, ...] = (
    SignalReader("wfdb", (".hea",), _read_wfdb),
    SignalReader("edf", (".edf", ".bdf"), _read_edf),
    SignalReader("dicom-waveform", (".dcm",), _read_dicom),
    SignalReader("csv", (".csv", ".tsv"), _reader_of_table("csv", _load_csv)),
    SignalReader("parquet", (".parquet", ".pq"), _reader_of_table("parquet", _load_parquet)),
)
_BY_SUFFIX: dict[str, SignalReader] = {suffix: reader for reader in READERS for suffix in reader.suffixes}
SIGNAL_SUFFIXES: frozenset[str] = frozenset(_BY_SUFFIX)


def is_signal_file(relative_path: str) -> bool:
    """Is this path a signal record (a WFDB .hea, EDF/BDF, DICOM, CSV/TSV/Parquet)? A WFDB record's .dat and
    annotation files are companions of its .hea, not records of their own."""
    return PurePosixPath(relative_path).suffix.lower() in SIGNAL_SUFFIXES


def read_signal(path: str, *, table_rate_hz: float | None = None) -> SignalRecord:
    """Read the local signal file at `path` (see the module docstring per format).

    `table_rate_hz` is the sampling rate of CSV/Parquet tables without a time column. Raises SignalReadError for
    every bad input, with a short reason code and a detail that holds no header value or path.
    """
    file = Path(path)
    reader = _BY_SUFFIX.get(file.suffix.lower())
    if reader is None:
        raise SignalReadError("unsupported_format", "no signal reader for this file suffix")
    if not file.is_file():
        raise SignalReadError("missing_file", "the file does not exist")
    try:
        return reader.read(file, table_rate_hz)
    except SignalReadError:
        raise
    except Exception as exc:  # a library failing on a bad file in a way not mapped above
        raise SignalReadError("unreadable_file", f"the {reader.format} reader failed ({type(exc).__name__})") from None
