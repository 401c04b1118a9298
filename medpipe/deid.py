"""De-identification of DICOM headers (DICOM PS3.15 Annex E, Basic Application Confidentiality Profile).

Why this is written here rather than taken from dicognito/deid: medpipe never writes DICOM files back. It keeps a
small, fixed set of header fields next to the pixel data in the store, so the profile only has to act on those
fields -- every other element is dropped (action X). dicognito replaces identifiers with MD5-seeded random values
and walks the whole dataset (~1.3 ms per file here), which would cost more than decoding the pixels; PS3.15 asks
for consistent pseudonyms from a secret, which an HMAC-SHA256 gives directly. The actions for each kept field are
the ones Annex E table E.1-1 lists, with the "Retain Longitudinal Temporal Information with Modified Dates" option
(dates shifted by a per-patient offset) and "Retain Safe Private" not used (all private tags are dropped).

A field kept verbatim (action K) is kept only when its value is a number, a UID or one of the field's defined terms
(`defined_term`): free text in a "technical" field (a name typed into BodyPartExamined, say) is removed and counted
as action X* in the audit.

The key: every pseudonym is an HMAC of an identifier, so anyone holding one (identifier, pseudonym) pair can test
guessed keys offline at HMAC speed. The only defence is a key that cannot be guessed, which `DeidKey` enforces
(KEY_RULE; `generate_key` makes one). The store holds a slow, salted scrypt record of the key (`key_check_record`)
to refuse a rerun with another key, and never a fast digest of the key on its own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pydicom

from medpipe.errors import UserError

KEY_ENV_VAR = "MEDPIPE_DEID_KEY"
# Public on purpose (make demo); long enough to pass the key rule, named so that nobody mistakes it for a secret.
DEMO_KEY = "medpipe-demo-key-NOT-SECRET-public-never-use-for-real-data"
METHOD = "medpipe PS3.15 Annex E basic profile; HMAC-SHA256 pseudonyms; per-patient date shift"
# PS3.16 CID 7050 codes recorded in DeidentificationMethodCodeSequence.
PROFILE_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
MAX_DATE_SHIFT_DAYS = 3650
# Bump whenever KEPT_FIELDS or an action changes: every archived unit is de-identified again on the next run.
# 3: kept fields only as numbers, UIDs or defined terms (X* otherwise); digests of surrogate-escaped text.
DEID_RULES_VERSION = 3

# The key rule (docs/deidentification.md). Counted in characters of the key as text (undecodable bytes count one
# each); "a short pattern repeated" = the key is some prefix of at most half its length, repeated (the last
# repetition may be cut short), e.g. "abcdefghijkl" * 3.
MIN_KEY_CHARS = 32
MIN_DISTINCT_KEY_CHARS = 12
KEY_RULE = (f"at least {MIN_KEY_CHARS} characters, at least {MIN_DISTINCT_KEY_CHARS} distinct characters, "
            "and not one short pattern repeated")
KEY_BYTES = 32  # generate_key: 256 random bits

# key_check_record: scrypt parameters (RFC 7914). N=2**15, r=8 needs 32 MiB and ~0.1 s per check (docs).
KDF_N, KDF_R, KDF_P = 2**15, 8, 1
KDF_SALT_BYTES, KDF_HASH_BYTES = 16, 32
_KDF_MAX_MEMORY = 256 * 2**20  # a record asking for more is refused as malformed (no memory bomb from a store)


class MissingKeyError(UserError, RuntimeError):
    """No de-identification key was configured."""


class WeakKeyError(UserError, ValueError):
    """The de-identification key could be guessed (too short, too few distinct characters, or a repeated pattern)."""


def _raw_bytes(text: str) -> bytes:
    """UTF-8 of `text`, with surrogate escapes turned back into the raw bytes they stand for.

    A file name that is not valid UTF-8 arrives as a str with surrogate escapes (U+DC80..U+DCFF, one per byte);
    hashing its raw bytes makes the digest that of the name on disk. Any other lone surrogate (from JSON or CSV,
    say) is encoded as UTF-8 would encode it if it were allowed (surrogatepass), so every str has a digest.
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        pass
    out = bytearray()
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(code - 0xDC00)
        else:
            out += char.encode("utf-8", "surrogatepass")
    return bytes(out)


def _smallest_period(text: str) -> int:
    """The length of the shortest prefix that, repeated, gives `text` (the last repetition may be cut short)."""
    border = [0] * len(text)  # Knuth-Morris-Pratt failure function
    k = 0
    for i in range(1, len(text)):
        while k and text[i] != text[k]:
            k = border[k - 1]
        if text[i] == text[k]:
            k += 1
        border[i] = k
    return len(text) - (border[-1] if text else 0)


def key_weakness(secret: bytes) -> str | None:
    """Why `secret` breaks the key rule (KEY_RULE), or None when it passes. Never quotes the key."""
    text = secret.decode("utf-8", "surrogateescape")
    if len(text) < MIN_KEY_CHARS:
        return f"{len(text)} characters"
    if len(set(text)) < MIN_DISTINCT_KEY_CHARS:
        return f"{len(set(text))} distinct characters"
    if _smallest_period(text) <= len(text) // 2:
        return "a short pattern repeated"
    return None


def generate_key() -> str:
    """A new key: 32 random bytes from `secrets`, as 64 hex characters (what `medpipe keygen` prints)."""
    while True:
        key = secrets.token_hex(KEY_BYTES)
        # 64 random hex digits have >= 12 distinct ones except with probability ~2e-7; never hand out a refused key
        if key_weakness(key.encode()) is None:
            return key


@dataclass(frozen=True)
class DeidKey:
    """The secret behind every pseudonym. Its repr never shows the secret; a guessable secret is refused."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes):
            raise TypeError("DeidKey takes the key as bytes")
        weakness = key_weakness(self.secret)
        if weakness is not None:
            raise WeakKeyError(f"the de-identification key is too weak ({weakness}): a key needs {KEY_RULE}; "
                               "run `medpipe keygen` to make one")

    @property
    def identity(self) -> str:
        """Keyed HMAC-SHA256 (hex) of a constant: stands for the key inside other digests (run tags).

        Never store it on its own: it is a fast check of a guessed key. The store's key check is
        `key_check_record` (scrypt).
        """
        return hmac.new(self.secret, b"medpipe-key-identity", hashlib.sha256).hexdigest()

    def digest(self, purpose: str, value: str) -> bytes:
        """HMAC-SHA256 of `value` in a namespace `purpose`; any str (surrogate escapes hash as their raw bytes)."""
        return hmac.new(self.secret, _raw_bytes(f"{purpose}\x00{value}"), hashlib.sha256).digest()


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # OpenSSL needs about 128*r*(n + p + 2) bytes; its default limit (32 MiB) is exactly too small for N=2**15, r=8
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=128 * r * (n + p + 2) + 2**20)


def key_check_record(key: DeidKey) -> dict[str, Any]:
    """A slow, salted record of the key for the store's attributes (to refuse a rerun with another key).

    scrypt with N=2**15, r=8, p=1 and a random 16-byte salt: one check costs ~0.1 s and 32 MiB, so testing a word
    list against it is ~10^5 times slower than against an HMAC of the key (docs/deidentification.md).
    """
    salt = secrets.token_bytes(KDF_SALT_BYTES)
    digest = _scrypt(key.secret, salt, KDF_N, KDF_R, KDF_P, KDF_HASH_BYTES)
    return {"kdf": "scrypt", "n": KDF_N, "r": KDF_R, "p": KDF_P, "salt": salt.hex(), "hash": digest.hex()}


def _bounded_int(value: Any, low: int, high: int) -> int | None:
    return value if type(value) is int and low <= value <= high else None


def key_matches(key: DeidKey, record: Mapping[str, Any]) -> bool:
    """Whether `record` (from key_check_record) was made with `key`; False for an unknown or malformed record.

    The parameters are read from the record (so that a store made with other scrypt costs stays checkable), within
    bounds; the comparison is constant-time.
    """
    try:
        if record.get("kdf") != "scrypt":
            return False
        n = _bounded_int(record.get("n"), 2, 2**22)
        r = _bounded_int(record.get("r"), 1, 64)
        p = _bounded_int(record.get("p"), 1, 16)
        salt_hex, hash_hex = record.get("salt"), record.get("hash")
        if n is None or r is None or p is None or n & (n - 1) or 128 * r * (n + p) > _KDF_MAX_MEMORY:
            return False
        if not isinstance(salt_hex, str) or not isinstance(hash_hex, str):
            return False
        salt, expected = bytes.fromhex(salt_hex), bytes.fromhex(hash_hex)
        if not 8 <= len(salt) <= 64 or not 16 <= len(expected) <= 64:
            return False
        return hmac.compare_digest(_scrypt(key.secret, salt, n, r, p, len(expected)), expected)
    except (AttributeError, TypeError, ValueError, MemoryError):
        return False


def resolve_key(secret_value: str | None = None) -> DeidKey:
    """The key from an explicit value, else from $MEDPIPE_DEID_KEY; refuses clearly when there is none."""
    value = secret_value if secret_value is not None else os.environ.get(KEY_ENV_VAR)
    if not value:
        raise MissingKeyError(
            f"No de-identification key: set {KEY_ENV_VAR} (or pass --key-secret with the name of a Prefect "
            "Secret block). The key keeps pseudonyms consistent across runs and is never stored."
        )
    return DeidKey(_raw_bytes(value))


class Action(StrEnum):
    """Annex E action codes as applied to kept fields."""

    KEEP = "K"  # not in the profile's table: a technical attribute that carries no identity
    PSEUDONYM = "Z"  # replaced by a keyed pseudonym (Z/D: a dummy value consistent per original)
    UID = "U"  # replaced by a keyed UID, consistent across files and runs
    SHIFT_DATE = "D"  # date shifted by the patient's offset (modified-dates option)
    REMOVE = "X"  # removed
    # a K field whose value is not a number, UID or defined term (free text can hold a name): removed. Only ever
    # recorded in the audit, never in KEPT_FIELDS.
    REMOVE_NOT_DEFINED = "X*"


ACTION_MEANINGS = {
    Action.KEEP: "kept: a number, UID or defined term",
    Action.PSEUDONYM: "replaced by a keyed pseudonym",
    Action.UID: "replaced by a keyed UID",
    Action.SHIFT_DATE: "date shifted by the patient's offset",
    Action.REMOVE: "removed",
    Action.REMOVE_NOT_DEFINED: "removed: not a number, UID or defined term",
}

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

# Defined terms of the K fields that hold text. Values are compared upper-case after trimming spaces.
# BodyPartExamined: the code strings of DICOM PS3.16 Annex L (CID 4031 Common Anatomic Regions and the rest of the
# anatomic region table, with the few veterinary ones and the older ARM/LEG/SACRUM).
BODY_PART_TERMS = frozenset("""
    ABDOMEN ABDOMENPELVIS ABDOMINALAORTA ACA ACJOINT ADRENAL AMNIOTICFLUID ANKLE ANTCARDIACV ANTCOMMA ANTECUBITALV
    ANTSPINALA ANTTIBIALA ANUSRECTUMSIGMD AORTA AORTICARCH APPENDIX ARM ARTERY ASCAORTA ASCENDINGCOLON ATLANTOAXIAL
    ATLANTOOCCIPITAL AXILLA AXILLARYA AXILLARYV AZYGOSVEIN BACK BASILARA BILEDUCT BILIARYTRACT BLADDER BLADDERURETHRA
    BRACHIALA BRACHIALV BRAIN BREAST BRONCHUS BULB BUTTOCK CALCANEUS CALF CAROTID CARPUS CCA CELIACA CEPHALICV
    CEREBELLUM CEREBHEMISPHERE CEREBRALA CERVIX CFA CFV CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS CHOROIDPLEXUS
    CIRCLEOFWILLIS CLAVICLE COCCYX COLON COMILIACA COMILIACV COMMONBILEDUCT CORNEA CORONARYARTERY CORONARYSINUS
    CSPINE CTSPINE CULDESAC DESCAORTA DESCENDINGCOLON DIGIT DISTALPHALANX DUODENUM EAC EAR ECA ELBOW ENDOARTERIAL
    ENDOCARDIAC ENDOESOPHAGEAL ENDOMETRIUM ENDONASAL ENDONASOPHARYNYX ENDORECTAL ENDORENAL ENDOURETERIC ENDOURETHRAL
    ENDOVAGINAL ENDOVASCULAR ENDOVENOUS ENDOVESICAL EPIDIDYMIS EPIGASTRIC ESOPHAGUS EXTILIACA EXTILIACV EXTJUGV
    EXTREMITY EYE EYELID FACE FACIALA FEMORALA FEMORALV FEMUR FETALARM FETALDIGIT FETALHEART FETALLEG FETALPOLE
    FIBULA FINGER FLANK FONTANEL FOOT FOREARM FOREFETLOCK FOREFOOT FRONTALSINUS GALLBLADDER GASTRICV GENICULARA
    GESTSAC GLUTEAL GSV HAND HEAD HEADNECK HEART HEPATICA HEPATICV HINDFETLOCK HINDFOOT HIP HUMERUS HYPOGASTRIC
    HYPOPHARYNX IAC ICA ILEUM ILIACA ILIACV ILIUM INFMESA INFVENACAVA INGUINAL INNOMINATEA INNOMINATEV INTILIACA
    INTJUGULARV INTMAMMARYA INTRACRANIAL JAW JEJUNUM JOINT KIDNEY KNEE LACRIMALA LARGEINTESTINE LARYNX LATRIUM
    LATVENTRICLE LEG LEGS LFEMORALA LHEPATICV LHYPOCHONDRIAC LINGUALA LINGUINAL LIVER LLQ LLUMBAR LOWERLEG LOWERLIMB
    LPORTALV LPULMONARYA LSPINE LSSPINE LSUPPULMONARYV LUMBAR LUMBARA LUMEN LUNG LUQ LVENTRICLE MANDIBLE MASTOID
    MAXILLA MCA MEDIASTINUM MESENTRICA MESENTRICV MIDHEPATICV MORISONSPOUCH MOUTH NASOPHARYNX NECK NECKCHEST
    NECKCHESTABDOMEN NECKCHESTABDPELV NOSE OCCIPTALV OCCPITALA OCCPITALV OPHTHALMICA OPTICCANAL ORBIT OVARY PANCBILEDUCT
    PANCREAS PANCREATICDUCT PARASTERNAL PARATHYROID PAROTID PATELLA PCA PELVIS PELVISLOWEXTREMT PENILEA PENIS
    PERINEUM PERONEALA PHANTOM PHARYNX PHARYNXLARYNX PLACENTA POPLITEALA POPLITEALFOSSA POPLITEALV PORTALV POSCOMMA
    POSTIBIALA PROFFEMA PROFFEMV PROSTATE PULMONARYA PULMONARYV RADIALA RADIUS RADIUSULNA RATRIUM RECTUM RENALA RENALV
    RETROPERITONEUM RFEMORALA RHEPATICV RHYPOCHONDRIAC RIB RINGUINAL RLQ RLUMBAR RPORTALV RPULMONARYA RSUPPULMONARYV
    RUQ RVENTRICLE SACRUM SAPHENOUSV SCALP SCAPULA SCJOINT SCLERA SCROTUM SELLA SEMVESICLE SESAMOID SFA SFJ SFV
    SHOULDER SIGMOID SIJOINT SKULL SMA SMALLINTESTINE SPINALCORD SPINE SPLEEN SPLENICA SPLENICV SSPINE STERNUM
    STOMACH SUBCLAVIANA SUBCLAVIANV SUBCOSTAL SUBMANDIBULAR SUPRACLAVICULAR SUPRAPUBIC SUPTHYROIDA SVC TAIL TESTIS
    THALAMUS THIGH THORACICAORTA THORAX THUMB THYMUS THYROID TIBIA TIBIAFIBULA TLSPINE TMJ TOE TONGUE TRACHEA
    TRACHEABRONCHUS TRANSVERSECOLON TSPINE ULNA ULNARA UMBILICAL UMBILICALA UMBILICALV UPPERARM UPPERLIMB
    UPRURINARYTRACT URETER URETHRA UTERUS VAGINA VEIN VERTEBRALA VULVA WHOLEBODY WRIST ZYGOMA 3RDVENTRICLE
    4THVENTRICLE
""".split())
# RescaleType: PS3.3 C.11.1.1.2 defined terms.
RESCALE_TYPE_TERMS = frozenset({"OD", "HU", "US", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"})
# Modality: PS3.3 C.7.3.1.1.1 defined terms, with the retired ones (old files still carry them) and SC, which is
# not a defined term but is what many secondary-capture files carry (two letters: it cannot hold a name).
MODALITY_TERMS = frozenset("""
    ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL IVOCT
    IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG RESP RF RG
    RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA
    XA XAPROTOCOL XC
    AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
    SC
""".split())
# PhotometricInterpretation: PS3.3 C.7.6.3.1.2 enumerated values (with the retired HSV, ARGB, CMYK).
PHOTOMETRIC_TERMS = frozenset({
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
    "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB", "HSV", "ARGB", "CMYK",
})
TEXT_TERMS: dict[str, frozenset[str]] = {
    "Modality": MODALITY_TERMS,
    "BodyPartExamined": BODY_PART_TERMS,
    "PhotometricInterpretation": PHOTOMETRIC_TERMS,
    "RescaleType": RESCALE_TYPE_TERMS,
}


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
            "action_codes": {str(action): meaning for action, meaning in ACTION_MEANINGS.items()},
        }

    def to_compact(self) -> list[int]:
        """Small form for one dataset's audit: [datasets, dropped, fields acted on...], each field as its index in
        KEPT_FIELDS (its KEPT_FIELDS action) or as -1-index (X*: removed, not a defined term)."""
        names = list(KEPT_FIELDS)
        return [self.datasets, self.dropped_elements,
                *sorted(-1 - names.index(n) if a == Action.REMOVE_NOT_DEFINED else names.index(n)
                        for n, a in self.counts)]

    @classmethod
    def from_compact(cls, data: list[int]) -> "DeidAudit":
        names = list(KEPT_FIELDS)
        audit = cls(datasets=data[0], dropped_elements=data[1]) if data else cls()
        for index in data[2:]:
            if index < 0:
                audit.counts[(names[-1 - index], str(Action.REMOVE_NOT_DEFINED))] += 1
            else:
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


_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_NUMBER_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
# K fields that hold numbers (IS, DS, US; one value or several).
NUMERIC_FIELDS = (
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "SpacingBetweenSlices", "ImageOrientationPatient",
    "RescaleSlope", "RescaleIntercept", "KVP",
)


def defined_term(name: str, value: Any) -> str | None:
    """`value` as a defined term of the text field `name` (trimmed, upper-case: 'chest ' -> 'CHEST'), else None.

    None for a field without defined terms (TEXT_TERMS), for several values, and for anything not in the list.
    """
    terms = TEXT_TERMS.get(name)
    if terms is None or not isinstance(value, str):
        return None
    text = value.strip(" \x00").upper()
    return text if text in terms else None


def _uid_value(value: Any) -> str | None:
    """A syntactically valid UID (digits and dots, at most 64 characters), else None."""
    if not isinstance(value, str):
        return None
    text = value.strip(" \x00")
    return text if len(text) <= 64 and _UID_RE.fullmatch(text) else None


def _number(value: Any) -> int | float | None:
    json_value = _json_value(value)
    if isinstance(json_value, bool):
        return None
    if isinstance(json_value, int):
        return json_value
    if isinstance(json_value, float):
        return json_value if math.isfinite(json_value) else None
    text = json_value.strip(" \x00") if isinstance(json_value, str) else ""
    if _NUMBER_RE.fullmatch(text):  # a number pydicom did not convert (a wrong VR in the file)
        number = float(text)
        if math.isfinite(number):
            return int(number) if number.is_integer() and re.fullmatch(r"[+-]?[0-9]+", text) else number
    return None


def _numeric_value(value: Any) -> int | float | list[int | float] | None:
    """A number or a list of numbers (all finite), else None: a text where a number belongs is not kept."""
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        numbers = [_number(v) for v in value]
        return [n for n in numbers if n is not None] if numbers and None not in numbers else None
    return _number(value)


def _defined_term_rule(name: str) -> Callable[[Any], str | None]:
    return lambda value: defined_term(name, value)


# How each K field's value is checked: the value kept, or None (removed, X*). A K field without a rule is removed.
KEEP_RULES: dict[str, Callable[[Any], Any]] = {
    "SOPClassUID": _uid_value,
    **{name: _defined_term_rule(name) for name in TEXT_TERMS},
    **{name: _numeric_value for name in NUMERIC_FIELDS},
}


def kept_value(name: str, value: Any) -> Any:
    """The JSON value a K field keeps (a number, UID or defined term), or None when it must be removed."""
    rule = KEEP_RULES.get(name)
    return rule(value) if rule is not None else None


def deidentify_header(ds: pydicom.Dataset, pseudonyms: Pseudonymizer, audit: DeidAudit | None = None) -> dict[str, Any]:
    """Apply the profile to `ds` and return only the kept, de-identified fields as a JSON-ready dict.

    Every element not in KEPT_FIELDS (private tags, sequences, free text) is dropped; a K field keeps its value only
    when it is a number, UID or defined term (else it is removed and counted as X*); the result also carries
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
        try:
            value = ds.get(name)
        except Exception:  # noqa: BLE001 - a value pydicom cannot convert is never kept
            audit.counts[(name, str(Action.REMOVE if action is Action.REMOVE else Action.REMOVE_NOT_DEFINED))] += 1
            continue
        if action is Action.REMOVE or value is None or value == "":
            audit.counts[(name, str(action))] += 1
            continue
        if action is Action.KEEP:
            checked = kept_value(name, value)
            if checked is None:
                audit.counts[(name, str(Action.REMOVE_NOT_DEFINED))] += 1
                continue
            out[name] = checked
        elif action is Action.UID:
            out[name] = pseudonyms.uid(str(value))
        elif action is Action.SHIFT_DATE:
            shifted = pseudonyms.shift_date(str(value), original_patient)
            if shifted is not None:
                out[name] = shifted
        elif action is Action.PSEUDONYM:
            out[name] = pseudonyms.patient(original_patient) if original_patient else "P-unknown"
        audit.counts[(name, str(action))] += 1
    audit.dropped_elements += max(0, len(ds) - kept)
    out["PatientIdentityRemoved"] = "YES"
    out["DeidentificationMethod"] = METHOD
    out["DeidentificationMethodCodeSequence"] = [
        {"CodeValue": code, "CodingSchemeDesignator": "DCM", "CodeMeaning": meaning} for code, meaning in PROFILE_CODES
    ]
    return out
