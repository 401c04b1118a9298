"""De-identification of signal records: the same keyed pseudonyms and date shifts as images (`medpipe.deid`).

What is kept of a record's header is an allow-list, each field checked by a rule (everything else is dropped):
- the patient becomes `Pseudonymizer.patient(patient_id)`; the start is shifted back by the patient's
  `Pseudonymizer.date_shift_days` (the same days as the patient's images) and kept as an ISO date-time (the time
  of day is kept: it is no identifier under HIPAA Safe Harbor and matters for ECGs);
- `age` (a number, DICOM "045Y"; or derived from a birth date and the start) is kept up to 89, "90+" above;
  `sex` only as M, F or O;
- diagnosis-like text fields (PhysioNet's `Dx`, `Rx`, `Hx`, `Sx`, `diagnosis`, `rhythm`, `label`) are kept when
  they are a list of numeric codes (SNOMED CT) or text that `looks_like_identifier` does not flag;
- `dropped_signals` (a count the EDF reader notes) is kept;
- names, identifiers, birth dates, free-text comments and every other field are dropped;
- lead names and units that look like identifiers or free text become `lead<n>` / "";
- annotation symbols are kept when they are WFDB beat/event codes, notes when they are WFDB rhythm codes.

The audit counts (field, action) with Annex E action codes; header fields not on the allow-list are counted as
one `header_field` (their keys come from the file and could themselves hold a name).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
import numpy as np

from medpipe.deid import Action, DeidAudit, Pseudonymizer
from medpipe.identifiers import looks_like_identifier
from medpipe.signals.readers import PATIENT_KEYS, normalize_key
from medpipe.signals.records import Annotation, SignalRecord

MAX_AGE = 89  # HIPAA Safe Harbor: ages over 89 are aggregated into one "90+" category
AGE_OVER_MAX = "90+"
MAX_TEXT = 200  # longer kept-field values are free text: dropped

# Aliases (after normalize_key) of the fields that may be kept, mapped to the name they are kept under.
_AGE_KEYS = {"age": "age", "patientage": "age"}
_SEX_KEYS = {"sex": "sex", "gender": "sex", "patientsex": "sex"}
_BIRTH_KEYS = frozenset({"birthdate", "birth_date", "dob", "date_of_birth", "patientbirthdate"})
_TEXT_KEYS = {"dx": "Dx", "rx": "Rx", "hx": "Hx", "sx": "Sx", "diagnosis": "diagnosis", "rhythm": "rhythm",
              "label": "label"}
_COUNT_KEYS = {"dropped_signals": "dropped_signals"}
_SEX_TERMS = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"}
_CODE_LIST = re.compile(r"^\s*[0-9]{4,18}(\s*[,;]\s*[0-9]{4,18})*\s*$")
_AGE_TEXT = re.compile(r"^\s*([0-9]{1,3})(?:\.[0-9]*)?\s*([YMWD]|years?|y)?\s*$", re.I)
_BIRTH_FORMATS = ("%d %b %Y", "%d-%b-%Y", "%Y%m%d", "%Y-%m-%d", "%d.%m.%Y", "%d/%m/%Y")

# WFDB annotation codes (PhysioNet's ann_label_table) and rhythm notes: anything else in an annotation is text.
WFDB_SYMBOLS = frozenset("N L R a V F J A S E j / Q ~ | s T * D \" = p B ^ t + u ? ! [ ] e n @ x f ( ) r".split())
RHYTHM_NOTES = frozenset({
    "(AB", "(AFIB", "(AFL", "(B", "(BII", "(IVR", "(N", "(NOD", "(P", "(PREX", "(SBR", "(SVTA", "(T", "(VFL",
    "(VT", "(SR", "(AF", "(J",
})
_LEAD_NAME = re.compile(r"^[A-Za-z0-9 _.+\-/()']{1,24}$")
_UNIT = re.compile(r"^[A-Za-zµμ°%/0-9.^*\-]{0,16}$")


@dataclass(frozen=True)
class DeidentifiedSignal:
    """What the store may keep of a record: samples, rate, leads, units, pseudonym, shifted start, safe fields."""

    signals: np.ndarray
    fs: float
    leads: tuple[str, ...]
    units: tuple[str, ...]
    format: str
    patient: str
    start: str | None
    annotations: tuple[Annotation, ...]
    header_kept: dict[str, str]
    audit: DeidAudit = field(default_factory=DeidAudit)


def _age_text(value: str) -> str | None:
    match = _AGE_TEXT.match(value)
    if not match:
        return None
    unit = (match.group(2) or "Y").upper()[0]
    years = int(match.group(1)) if unit == "Y" else 0
    return AGE_OVER_MAX if years > MAX_AGE else str(years)


def _birth_date(value: str) -> datetime.date | None:
    for fmt in _BIRTH_FORMATS:
        try:
            return datetime.datetime.strptime(value.strip(), fmt).date()
        except ValueError:
            continue
    return None


def _age_at(birth: datetime.date, start: datetime.datetime) -> str | None:
    day = start.date()
    years = day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))
    if years < 0:
        return None
    return AGE_OVER_MAX if years > MAX_AGE else str(years)


def _safe_text(value: str) -> str | None:
    text = " ".join(value.split())
    if not text or len(text) > MAX_TEXT:
        return None
    if _CODE_LIST.match(text):
        return text
    return None if looks_like_identifier(text) else text


def _kept_field(key: str, value: str) -> tuple[str, str | None] | None:
    """(kept name, kept value or None when the rule removes it) for a field on the allow-list, else None."""
    if key in _AGE_KEYS:
        return _AGE_KEYS[key], _age_text(value)
    if key in _SEX_KEYS:
        return _SEX_KEYS[key], _SEX_TERMS.get(value.strip().lower())
    if key in _TEXT_KEYS:
        return _TEXT_KEYS[key], _safe_text(value)
    if key in _COUNT_KEYS:
        return _COUNT_KEYS[key], value.strip() if value.strip().isdigit() else None
    return None


def _header_kept(record: SignalRecord, audit: DeidAudit) -> dict[str, str]:
    kept: dict[str, str] = {}
    birth: datetime.date | None = None
    for raw_key, raw_value in record.header.items():
        key, value = normalize_key(str(raw_key)), str(raw_value)
        if key in _BIRTH_KEYS:
            birth = birth or _birth_date(value)
            audit.counts[("birth_date", str(Action.REMOVE))] += 1
            continue
        if key in PATIENT_KEYS:  # stands as the pseudonym
            audit.counts[("patient_id", str(Action.REMOVE))] += 1
            continue
        rule = _kept_field(key, value)
        if rule is None:
            audit.counts[("header_field", str(Action.REMOVE))] += 1
            audit.dropped_elements += 1
            continue
        name, kept_value = rule
        if kept_value is None or name in kept:
            audit.counts[(name, str(Action.REMOVE_NOT_DEFINED))] += 1
            continue
        kept[name] = kept_value
        audit.counts[(name, str(Action.KEEP))] += 1
    if "age" not in kept and birth is not None and record.start is not None:
        age = _age_at(birth, record.start)
        if age is not None:
            kept["age"] = age
            audit.counts[("age", "derived")] += 1
    return kept


def _safe_names(names: tuple[str, ...], pattern: re.Pattern[str], fallback: str, audit: DeidAudit,
                field_name: str) -> tuple[str, ...]:
    out = []
    for i, name in enumerate(names):
        if pattern.match(name) and not looks_like_identifier(name):
            out.append(name)
        else:
            out.append(fallback.format(i + 1))
            audit.counts[(field_name, str(Action.REMOVE_NOT_DEFINED))] += 1
    return tuple(out)


def _safe_annotations(annotations: tuple[Annotation, ...], audit: DeidAudit) -> tuple[Annotation, ...]:
    out = []
    for ann in annotations:
        symbol = ann.symbol if ann.symbol in WFDB_SYMBOLS else ""
        note = ann.note if ann.note in RHYTHM_NOTES else ""
        if (symbol, note) != (ann.symbol, ann.note):
            audit.counts[("annotation_text", str(Action.REMOVE_NOT_DEFINED))] += 1
        if symbol or note:
            out.append(Annotation(ann.sample, symbol, note))
    return tuple(out)


def deidentify_record(record: SignalRecord, pseudonyms: Pseudonymizer, patient_id: str) -> DeidentifiedSignal:
    """The de-identified form of `record` (see the module docstring). `patient_id` is the identifier the ingest
    decided on (header, else manifest, else folder): it gives the pseudonym and the date shift."""
    audit = DeidAudit(datasets=1)
    audit.counts[("patient", str(Action.PSEUDONYM))] += 1
    start = None
    if record.start is not None:
        shifted = record.start - datetime.timedelta(days=pseudonyms.date_shift_days(patient_id))
        start = shifted.replace(tzinfo=None).isoformat()
        audit.counts[("start", str(Action.SHIFT_DATE))] += 1
    return DeidentifiedSignal(
        signals=record.signals, fs=record.fs,
        leads=_safe_names(record.leads, _LEAD_NAME, "lead{}", audit, "lead_name"),
        units=_safe_names(record.units, _UNIT, "", audit, "unit"),
        format=record.format, patient=pseudonyms.patient(patient_id), start=start,
        annotations=_safe_annotations(record.annotations, audit),
        header_kept=_header_kept(record, audit), audit=audit)
