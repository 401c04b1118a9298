"""De-identification of DICOM headers (DICOM PS3.15 Annex E, Basic Application Confidentiality Profile).

Why this is written here rather than taken from dicognito/deid: medpipe never writes DICOM files back. It keeps a
small, fixed set of header fields next to the pixel data in the store, so the profile only has to act on those
fields -- every other element is dropped (action X). dicognito replaces identifiers with MD5-seeded random values
and walks the whole dataset (~1.3 ms per file here), which would cost more than decoding the pixels; PS3.15 asks
for consistent pseudonyms from a secret, which an HMAC-SHA256 gives directly. The actions for each kept field are
the ones Annex E table E.1-1 lists, with the "Retain Longitudinal Temporal Information with Modified Dates" option
(dates shifted by a per-patient offset) and "Retain Safe Private" not used (all private tags are dropped).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pydicom

from medpipe.errors import UserError

KEY_ENV_VAR = "MEDPIPE_DEID_KEY"
DEMO_KEY = "medpipe-demo-key-NOT-SECRET"
METHOD = "medpipe PS3.15 Annex E basic profile; HMAC-SHA256 pseudonyms; per-patient date shift"
# PS3.16 CID 7050 codes recorded in DeidentificationMethodCodeSequence.
PROFILE_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
MAX_DATE_SHIFT_DAYS = 3650
# Bump whenever KEPT_FIELDS or an action changes: every archived unit is de-identified again on the next run.
DEID_RULES_VERSION = 2


class MissingKeyError(UserError, RuntimeError):
    """No de-identification key was configured."""


class Action(StrEnum):
    """Annex E action codes as applied to kept fields."""

    KEEP = "K"  # not in the profile's table: a technical attribute that carries no identity
    PSEUDONYM = "Z"  # replaced by a keyed pseudonym (Z/D: a dummy value consistent per original)
    UID = "U"  # replaced by a keyed UID, consistent across files and runs
    SHIFT_DATE = "D"  # date shifted by the patient's offset (modified-dates option)
    REMOVE = "X"  # removed


# The header fields medpipe keeps, with the Annex E action applied to each.
KEPT_FIELDS: dict[str, Action] = {
    "PatientID": Action.PSEUDONYM,
    "PatientName": Action.PSEUDONYM,
    "StudyInstanceUID": Action.UID,
    "SeriesInstanceUID": Action.UID,
    "SOPInstanceUID": Action.UID,
    "FrameOfReferenceUID": Action.UID,
    "StudyDate": Action.SHIFT_DATE,
    "SeriesDate": Action.SHIFT_DATE,
    "AcquisitionDate": Action.SHIFT_DATE,
    "ContentDate": Action.SHIFT_DATE,
    "SOPClassUID": Action.KEEP,
    "Modality": Action.KEEP,
    "BodyPartExamined": Action.KEEP,
    "Rows": Action.KEEP,
    "Columns": Action.KEEP,
    "NumberOfFrames": Action.KEEP,
    "SamplesPerPixel": Action.KEEP,
    "PhotometricInterpretation": Action.KEEP,
    "BitsAllocated": Action.KEEP,
    "BitsStored": Action.KEEP,
    "PixelRepresentation": Action.KEEP,
    "PixelSpacing": Action.KEEP,
    "ImagerPixelSpacing": Action.KEEP,
    "SliceThickness": Action.KEEP,
    "SpacingBetweenSlices": Action.KEEP,
    "ImageOrientationPatient": Action.KEEP,
    "RescaleSlope": Action.KEEP,
    "RescaleIntercept": Action.KEEP,
    "RescaleType": Action.KEEP,
    "KVP": Action.KEEP,
    "Manufacturer": Action.REMOVE,  # device identity: removed in the basic profile (no Retain Device Identity)
    "PatientBirthDate": Action.REMOVE,
    "PatientSex": Action.REMOVE,
    "PatientAge": Action.REMOVE,
    "InstitutionName": Action.REMOVE,
    "InstitutionAddress": Action.REMOVE,
    "ReferringPhysicianName": Action.REMOVE,
    "AccessionNumber": Action.REMOVE,
    "StudyID": Action.REMOVE,
    "StudyDescription": Action.REMOVE,
    "SeriesDescription": Action.REMOVE,
    "StudyTime": Action.REMOVE,
    "SeriesTime": Action.REMOVE,
    "OperatorsName": Action.REMOVE,
    "PerformingPhysicianName": Action.REMOVE,
}


@dataclass(frozen=True)
class DeidKey:
    """The secret behind every pseudonym. Its repr never shows the secret."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < 8:
            raise ValueError("the de-identification key must be at least 8 bytes long")

    @property
    def fingerprint(self) -> str:
        """A short keyed digest that identifies the key without revealing it (stored to detect key changes)."""
        return hmac.new(self.secret, b"medpipe-key-check", hashlib.sha256).hexdigest()[:16]

    def digest(self, purpose: str, value: str) -> bytes:
        """HMAC-SHA256 of `value` in a namespace `purpose`."""
        return hmac.new(self.secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def resolve_key(secret_value: str | None = None) -> DeidKey:
    """The key from an explicit value, else from $MEDPIPE_DEID_KEY; refuses clearly when there is none."""
    value = secret_value if secret_value is not None else os.environ.get(KEY_ENV_VAR)
    if not value:
        raise MissingKeyError(
            f"No de-identification key: set {KEY_ENV_VAR} (or pass --key-secret with the name of a Prefect "
            "Secret block). The key keeps pseudonyms consistent across runs and is never stored."
        )
    return DeidKey(value.encode())


class Pseudonymizer:
    """Keyed, consistent replacements for identifiers, UIDs, dates and source paths."""

    def __init__(self, key: DeidKey) -> None:
        self.key = key

    def patient(self, patient_id: str) -> str:
        """Pseudonymous patient id, e.g. 'P-3f9a1c2b7d4e'."""
        return "P-" + self.key.digest("patient", patient_id).hex()[:12]

    def uid(self, original: str) -> str:
        """A valid DICOM UID under the 2.25 root (UUID-derived form), consistent for the same original."""
        return "2.25." + str(int.from_bytes(self.key.digest("uid", original)[:16], "big"))

    def path(self, relative_path: str) -> str:
        """Keyed hash of a source path: the store never sees the path itself (it can hold names)."""
        return self.key.digest("path", relative_path).hex()[:24]

    def date_shift_days(self, patient_id: str) -> int:
        """Per-patient shift into the past, 1..MAX_DATE_SHIFT_DAYS days, the same for every file of the patient."""
        return 1 + int.from_bytes(self.key.digest("date", patient_id)[:4], "big") % MAX_DATE_SHIFT_DAYS

    def shift_date(self, value: str, patient_id: str) -> str | None:
        """Shift a DICOM DA value; an unparseable date is removed (None)."""
        try:
            day = dt.datetime.strptime(str(value).strip()[:8], "%Y%m%d").date()
        except ValueError:
            return None
        return (day - dt.timedelta(days=self.date_shift_days(patient_id))).strftime("%Y%m%d")


@dataclass
class DeidAudit:
    """What the profile did, counted per (field, action). Holds no values."""

    counts: Counter = field(default_factory=Counter)
    dropped_elements: int = 0
    datasets: int = 0

    def merge(self, other: "DeidAudit") -> None:
        self.counts.update(other.counts)
        self.dropped_elements += other.dropped_elements
        self.datasets += other.datasets

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "profile_codes": [code for code, _ in PROFILE_CODES],
            "datasets": self.datasets,
            "dropped_elements": self.dropped_elements,
            "actions": {f"{name}:{action}": n for (name, action), n in sorted(self.counts.items())},
        }

    def to_compact(self) -> list[int]:
        """Small form for one dataset's audit: [datasets, dropped, indices of KEPT_FIELDS acted on...]."""
        names = list(KEPT_FIELDS)
        return [self.datasets, self.dropped_elements, *sorted(names.index(n) for n, _ in self.counts)]

    @classmethod
    def from_compact(cls, data: list[int]) -> "DeidAudit":
        names = list(KEPT_FIELDS)
        audit = cls(datasets=data[0], dropped_elements=data[1]) if data else cls()
        for index in data[2:]:
            audit.counts[(names[index], str(KEPT_FIELDS[names[index]]))] += 1
        return audit


def _json_value(value: Any) -> Any:
    """DICOM element value as plain JSON (numbers, strings, lists)."""
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, pydicom.valuerep.IS):
        return int(value)
    if isinstance(value, (pydicom.valuerep.DSfloat, pydicom.valuerep.DSdecimal)):
        return float(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def deidentify_header(ds: pydicom.Dataset, pseudonyms: Pseudonymizer, audit: DeidAudit | None = None) -> dict[str, Any]:
    """Apply the profile to `ds` and return only the kept, de-identified fields as a JSON-ready dict.

    Every element not in KEPT_FIELDS (private tags, sequences, free text) is dropped; the result also carries
    PatientIdentityRemoved=YES and the de-identification method, as PS3.15 asks.
    """
    audit = audit if audit is not None else DeidAudit()
    audit.datasets += 1
    original_patient = str(ds.get("PatientID", "") or "")
    out: dict[str, Any] = {}
    kept = 0
    for name, action in KEPT_FIELDS.items():
        if name not in ds:
            continue
        kept += 1
        value = ds.get(name)
        audit.counts[(name, str(action))] += 1
        if action is Action.REMOVE or value is None or value == "":
            continue
        if action is Action.KEEP:
            out[name] = _json_value(value)
        elif action is Action.UID:
            out[name] = pseudonyms.uid(str(value))
        elif action is Action.SHIFT_DATE:
            shifted = pseudonyms.shift_date(str(value), original_patient)
            if shifted is not None:
                out[name] = shifted
        elif action is Action.PSEUDONYM:
            out[name] = pseudonyms.patient(original_patient) if original_patient else "P-unknown"
    audit.dropped_elements += max(0, len(ds) - kept)
    out["PatientIdentityRemoved"] = "YES"
    out["DeidentificationMethod"] = METHOD
    out["DeidentificationMethodCodeSequence"] = [
        {"CodeValue": code, "CodingSchemeDesignator": "DCM", "CodeMeaning": meaning} for code, meaning in PROFILE_CODES
    ]
    return out
