import re

import pydicom
import pytest
from pydicom.dataset import Dataset

from medpipe.deid import DeidAudit, DeidKey, MissingKeyError, Pseudonymizer, deidentify_header, resolve_key


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
    ds.Modality = "CT"
    ds.PixelSpacing = [0.8, 0.8]
    ds.Rows = 64
    ds.add_new(0x00091001, "LO", "private PHI")
    return ds


def test_profile_removes_phi_and_records_method():
    out = deidentify_header(_ds(), Pseudonymizer(DeidKey(b"secret-key-1")), audit := DeidAudit())
    text = str(out)
    for phi in ("DOE", "12345678", "19600101", "Elsewhere", "ACC7654321", "HOUSE", "private PHI", "20240310"):
        assert phi not in text
    assert out["PatientIdentityRemoved"] == "YES"
    assert out["PatientID"].startswith("P-") and out["PatientName"] == out["PatientID"]
    assert out["Modality"] == "CT" and out["PixelSpacing"] == [0.8, 0.8]
    assert re.fullmatch(r"2\.25\.\d+", out["StudyInstanceUID"]) and len(out["StudyInstanceUID"]) <= 64
    assert audit.to_dict()["actions"]["InstitutionName:X"] == 1
    assert audit.dropped_elements >= 1
    assert "DOE" not in str(audit.to_dict())


def test_pseudonyms_consistent_per_key_and_differ_across_keys():
    a, b = Pseudonymizer(DeidKey(b"key-number-one")), Pseudonymizer(DeidKey(b"key-number-two"))
    assert a.patient("123") == Pseudonymizer(DeidKey(b"key-number-one")).patient("123")
    assert a.patient("123") != b.patient("123") and a.patient("123") != a.patient("124")
    assert a.uid("1.2.3") == a.uid("1.2.3") != a.uid("1.2.4")


def test_dates_shift_consistently_per_patient():
    p = Pseudonymizer(DeidKey(b"key-number-one"))
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
    assert "secret" not in repr(DeidKey(b"secret-key-1"))
