import re
import time

import pydicom
import pytest
from pydicom.dataset import Dataset

from medpipe import deid
from medpipe.deid import (
    DEMO_KEY,
    KEEP_RULES,
    KEPT_FIELDS,
    Action,
    DeidAudit,
    DeidKey,
    MissingKeyError,
    Pseudonymizer,
    WeakKeyError,
    deidentify_header,
    defined_term,
    generate_key,
    key_check_record,
    key_matches,
    resolve_key,
)
from medpipe.errors import UserError
from medpipe.identifiers import looks_like_identifier

# planted names in the wrong VR make pydicom warn; that is what these tests feed in
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

KEY_ONE = b"test-deid-key-one-7f3a9c21e5b84d06aa1f"
KEY_TWO = b"test-deid-key-two-0c8e4b7d2a9f1635bb2e"


def _ds() -> Dataset:
    ds = Dataset()
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "12345678"
    ds.PatientBirthDate = "19600101"
    ds.StudyDate = "20240310"
    ds.InstitutionName = "St. Elsewhere General"
    ds.AccessionNumber = "ACC7654321"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.SeriesInstanceUID = "1.2.3.4.6"
    ds.SOPInstanceUID = "1.2.3.4.7"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.RescaleType = "HU"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [0.8, 0.8]
    ds.Rows = 64
    ds.add_new(0x00091001, "LO", "private PHI")
    return ds


def _read_back(ds: Dataset) -> Dataset:
    """`ds` written and read back as a file would be (implicit VR: values are parsed by their dictionary VR)."""
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(buffer, ds)
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(buffer.getvalue()), force=True)


def test_profile_removes_phi_and_records_method():
    out = deidentify_header(_ds(), Pseudonymizer(DeidKey(KEY_ONE)), audit := DeidAudit())
    text = str(out)
    for phi in ("DOE", "12345678", "19600101", "Elsewhere", "ACC7654321", "HOUSE", "private PHI", "20240310"):
        assert phi not in text
    assert out["PatientIdentityRemoved"] == "YES"
    assert out["PatientID"].startswith("P-") and out["PatientName"] == out["PatientID"]
    assert out["Modality"] == "CT" and out["PixelSpacing"] == [0.8, 0.8]
    assert (out["BodyPartExamined"], out["RescaleType"], out["PhotometricInterpretation"]) == ("CHEST", "HU", "MONOCHROME2")
    assert out["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.2" and out["Rows"] == 64
    assert re.fullmatch(r"2\.25\.\d+", out["StudyInstanceUID"]) and len(out["StudyInstanceUID"]) <= 64
    assert audit.to_dict()["actions"]["InstitutionName:X"] == 1
    assert audit.dropped_elements >= 1
    assert "DOE" not in str(audit.to_dict())


def test_free_text_in_kept_fields_is_removed_and_counted():
    ds = _ds()
    ds.BodyPartExamined = "DOE JOHN"
    ds.RescaleType = "Smith"
    ds.Modality = "JANE"
    ds.PhotometricInterpretation = "ROE^RICHARD"
    ds.SOPClassUID = "Dr. Mabuse"
    out = deidentify_header(ds, Pseudonymizer(DeidKey(KEY_ONE)), audit := DeidAudit())
    for name in ("BodyPartExamined", "RescaleType", "Modality", "PhotometricInterpretation", "SOPClassUID"):
        assert name not in out
        assert audit.to_dict()["actions"][f"{name}:X*"] == 1
        assert f"{name}:K" not in audit.to_dict()["actions"]
    assert not any(word in str(out) for word in ("DOE", "Smith", "JANE", "RICHARD", "Mabuse"))
    assert audit.to_dict()["action_codes"]["X*"].startswith("removed")
    # the compact per-image form keeps the distinction
    restored = DeidAudit.from_compact(audit.to_compact())
    assert restored.counts == audit.counts


def test_defined_terms_are_trimmed_and_upper_cased():
    ds = _ds()
    ds.BodyPartExamined = " chest "
    ds.RescaleType = "hu"
    out = deidentify_header(ds, Pseudonymizer(DeidKey(KEY_ONE)))
    assert (out["BodyPartExamined"], out["RescaleType"]) == ("CHEST", "HU")
    for term in ("ABDOMEN", "HEAD", "BRAIN", "PELVIS", "SPINE", "CSPINE", "TSPINE", "LSPINE", "KNEE", "HAND", "FOOT",
                 "BREAST", "HEART", "LUNG", "LIVER", "KIDNEY", "NECK", "SKULL", "SHOULDER", "ELBOW", "WRIST", "HIP",
                 "ANKLE", "EXTREMITY", "WHOLEBODY", "CHESTABDOMEN", "ABDOMENPELVIS", "HEADNECK", "NECKCHESTABDPELV"):
        assert defined_term("BodyPartExamined", term) == term
    for term in ("HU", "US", "OD", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"):
        assert defined_term("RescaleType", term) == term
    assert defined_term("Modality", "DX") == "DX" and defined_term("Modality", "PET") is None
    assert defined_term("PhotometricInterpretation", "YBR_FULL_422") == "YBR_FULL_422"
    assert defined_term("BodyPartExamined", ["CHEST", "HEAD"]) is None
    assert defined_term("StudyDescription", "CHEST") is None


def test_text_in_numeric_fields_is_removed():
    ds = _ds()
    ds.add(pydicom.DataElement(0x00180060, "LO", "Jane Roe"))  # KVP (DS) holding text
    ds.add(pydicom.DataElement(0x00280008, "LO", "ROE"))  # NumberOfFrames (IS) holding text
    ds.add(pydicom.DataElement(0x00180050, "LO", "2.5"))  # SliceThickness: a number with a wrong VR
    del ds.PixelSpacing
    ds.add(pydicom.DataElement(0x00280030, "LO", "0.7\\Roe"))
    out = deidentify_header(_read_back(ds), Pseudonymizer(DeidKey(KEY_ONE)), audit := DeidAudit())
    assert "Roe" not in str(out) and "ROE" not in str(out)
    assert {"KVP", "NumberOfFrames", "PixelSpacing"}.isdisjoint(out) and out["SliceThickness"] == 2.5
    actions = audit.to_dict()["actions"]
    assert actions["KVP:X*"] == actions["NumberOfFrames:X*"] == actions["PixelSpacing:X*"] == 1


def test_every_kept_verbatim_field_has_a_check():
    assert set(KEEP_RULES) == {name for name, action in KEPT_FIELDS.items() if action is Action.KEEP}
    assert Action.REMOVE_NOT_DEFINED not in KEPT_FIELDS.values()


def test_pseudonyms_consistent_per_key_and_differ_across_keys():
    a, b = Pseudonymizer(DeidKey(KEY_ONE)), Pseudonymizer(DeidKey(KEY_TWO))
    assert a.patient("123") == Pseudonymizer(DeidKey(KEY_ONE)).patient("123")
    assert a.patient("123") != b.patient("123") and a.patient("123") != a.patient("124")
    assert a.uid("1.2.3") == a.uid("1.2.3") != a.uid("1.2.4")


def test_digest_hashes_surrogate_escaped_names_as_their_raw_bytes():
    key = DeidKey(KEY_ONE)
    raw = b"DOE_J\xfcRGEN/scan.dcm"  # Latin-1 file name: not valid UTF-8
    name = raw.decode("utf-8", "surrogateescape")
    import hashlib
    import hmac

    assert key.digest("path", name) == hmac.new(KEY_ONE, b"path\x00" + raw, hashlib.sha256).digest()
    assert key.digest("path", name) != key.digest("path", "DOE_JURGEN/scan.dcm")
    assert len(key.digest("path", "lone \ud800 surrogate")) == 32  # any str has a digest
    assert key.digest("path", "plain") == hmac.new(KEY_ONE, b"path\x00plain", hashlib.sha256).digest()
    assert Pseudonymizer(key).path(name) == Pseudonymizer(key).path(name)


def test_dates_shift_consistently_per_patient():
    p = Pseudonymizer(DeidKey(KEY_ONE))
    d1, d2 = p.shift_date("20240310", "123"), p.shift_date("20240320", "123")
    from datetime import datetime

    delta = datetime.strptime(d2, "%Y%m%d") - datetime.strptime(d1, "%Y%m%d")
    assert delta.days == 10  # intervals within a patient are kept
    assert p.shift_date("not a date", "123") is None
    assert 1 <= p.date_shift_days("123") <= 3650


def test_missing_key_refuses_clearly(monkeypatch):
    monkeypatch.delenv("MEDPIPE_DEID_KEY", raising=False)
    with pytest.raises(MissingKeyError, match="MEDPIPE_DEID_KEY"):
        resolve_key()
    with pytest.raises(ValueError):
        DeidKey(b"short")
    assert "test-deid" not in repr(DeidKey(KEY_ONE))


@pytest.mark.parametrize("weak", [
    b"tiny",
    b"correct horse battery staple",  # 28 characters
    b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    b"abababababababababababababababab1",  # 3 distinct characters
    b"0123456789ab" * 3,  # a short pattern repeated
    b"abcdefghijklmnop" * 2,
    b"abcdefghijklmnopq" * 2 + b"abc",  # repeated, the last repetition cut short
])
def test_weak_keys_are_refused_with_one_line(weak):
    with pytest.raises(WeakKeyError) as info:
        DeidKey(weak)
    message = str(info.value)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert "\n" not in message and "medpipe keygen" in message and "32 characters" in message
    assert weak.decode() not in message


def test_resolve_key_refuses_a_weak_key_and_takes_a_strong_one():
    with pytest.raises(WeakKeyError):
        resolve_key("medpipe-test-key")
    assert resolve_key(KEY_ONE.decode()) == DeidKey(KEY_ONE)
    DeidKey(DEMO_KEY.encode())  # the public demo key passes the rule
    DeidKey(("Grüße, ÄÖÜ — ein langer Schlüssel " * 1).encode())  # counted in characters, not bytes


def test_generate_key_is_random_hex_and_passes_the_rule():
    keys = {generate_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert re.fullmatch(r"[0-9a-f]{64}", key)
        DeidKey(key.encode())


def test_identity_is_keyed_and_not_the_secret():
    one, two = DeidKey(KEY_ONE), DeidKey(KEY_TWO)
    assert one.identity == DeidKey(KEY_ONE).identity != two.identity
    assert re.fullmatch(r"[0-9a-f]{64}", one.identity) and KEY_ONE.hex() not in one.identity
    assert not hasattr(one, "fingerprint")


def test_key_check_record_matches_only_its_key():
    record = key_check_record(DeidKey(KEY_ONE))
    assert (record["kdf"], record["n"], record["r"], record["p"]) == ("scrypt", 2**15, 8, 1)
    assert re.fullmatch(r"[0-9a-f]{32}", record["salt"]) and re.fullmatch(r"[0-9a-f]{64}", record["hash"])
    assert KEY_ONE.hex() not in str(record) and KEY_ONE.decode() not in str(record)
    started = time.perf_counter()
    assert key_matches(DeidKey(KEY_ONE), record)
    elapsed = time.perf_counter() - started
    assert not key_matches(DeidKey(KEY_TWO), record)
    assert elapsed > 0.01  # slow on purpose (~0.1 s here): a word list is ~10^5 times slower than against an HMAC
    assert key_check_record(DeidKey(KEY_ONE))["salt"] != record["salt"]  # salted: equal keys, different records


@pytest.mark.parametrize("broken", [
    {},
    {"kdf": "pbkdf2"},
    {"kdf": "scrypt", "n": 2**15, "r": 8, "p": 1, "salt": "zz", "hash": "00" * 32},
    {"kdf": "scrypt", "n": 3, "r": 8, "p": 1, "salt": "00" * 16, "hash": "00" * 32},
    {"kdf": "scrypt", "n": 2**30, "r": 8, "p": 1, "salt": "00" * 16, "hash": "00" * 32},
    {"kdf": "scrypt", "n": "32768", "r": 8, "p": 1, "salt": "00" * 16, "hash": "00" * 32},
    {"kdf": "scrypt", "n": True, "r": 8, "p": 1, "salt": "00" * 16, "hash": "00" * 32},
    {"kdf": "scrypt", "n": 2**15, "r": 8, "p": 1, "salt": "00" * 16, "hash": None},
    {"kdf": "scrypt", "n": 2**15, "r": 8, "p": 1, "salt": "00" * 16, "hash": "00" * 4},
])
def test_key_matches_is_false_for_malformed_records(broken):
    assert key_matches(DeidKey(KEY_ONE), broken) is False


def test_key_matches_reads_the_cost_from_the_record(monkeypatch):
    monkeypatch.setattr(deid, "KDF_N", 2**10)
    record = key_check_record(DeidKey(KEY_ONE))
    assert record["n"] == 2**10 and key_matches(DeidKey(KEY_ONE), record)


MUST_PASS = [
    # ChestX-ray14
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", "No Finding",
    # CheXpert / MIMIC-CXR
    "Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
    # other common labels
    "lesion", "none", "small", "normal", "abnormal", "T2-weighted", "COVID-19", "Viral Pneumonia", "NO FINDING",
    "Ground Glass Opacity", "Brain Tumor", "Glioma", "Meningioma", "Pituitary Tumor", "No Tumor", "Melanoma",
    "Basal Cell Carcinoma", "Actinic Keratosis", "Necrotic Tumor Core", "Peritumoral Edema", "Enhancing Tumor",
    "Chest X-Ray", "Grade I", "Stage IV", "BI-RADS 4", "L4-L5", "0", "1", "class 2", "0.5", "Diabetic Retinopathy",
    "Non-Hodgkin Lymphoma", "Hepatitis B Virus", "benign", "malignant", "",
]
MUST_FLAG = [
    "DOE^JOHN", "Doe^Jane^^Dr", "John Smith", "JOHN DOE", "Doe, John", "Doe, J.", "John F. Kennedy",
    "Mary-Jane Watson", "José García", "Ludwig van Beethoven", "Pneumonia John Smith", "St. Elsewhere General",
    "12345678", "ACC7654321", "MRN1234", "ID-2024", "1.2.840.10008.5.1.4.1.1.2",
    "20240310", "2024-03-10", "10.03.2024", "3/10/2024", "10 March 2024", "March 10, 2024",
    "john.doe@example.com", "+1 (555) 123-4567", "555-123-4567", "0161 496 0000",
]


@pytest.mark.parametrize("label", MUST_PASS)
def test_medical_labels_do_not_look_like_identifiers(label):
    assert not looks_like_identifier(label)


@pytest.mark.parametrize("text", MUST_FLAG)
def test_names_ids_and_dates_look_like_identifiers(text):
    assert looks_like_identifier(text)
