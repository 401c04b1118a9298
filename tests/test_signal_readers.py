"""Signal readers on real files written by wfdb, pyedflib, pydicom and pandas; de-identification of their headers."""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import wfdb
from pyedflib import highlevel

from medpipe.deid import DeidKey, Pseudonymizer, deidentify_header
from medpipe.signals import readers
from medpipe.signals.readers import SIGNAL_SUFFIXES, is_signal_file, read_signal
from medpipe.signals.quality import signal_problem
from medpipe.signals.records import SignalReadError
from medpipe.signals.signal_deid import deidentify_record

from tests.conftest import TEST_KEY

FS = 250
SECONDS = 4
PHI = ("John Smith", "MRN4455667", "1950-03-04", "Jane Roe", "04 mar 1950", "Roe^Richard", "19500304",
       "Richard Roe", "JSMITH")
ECG_DCM = pydicom.data.get_testdata_file("waveform_ecg.dcm")


@pytest.fixture()
def pseudonyms() -> Pseudonymizer:
    return Pseudonymizer(DeidKey(TEST_KEY.encode()))


def _sines(leads: int = 2, fs: int = FS, seconds: int = SECONDS, amplitude: float = 1.0) -> np.ndarray:
    """(T, leads) sines of 1.2 Hz at distinct phases, in mV."""
    t = np.arange(fs * seconds) / fs
    return np.stack([amplitude * np.sin(2 * np.pi * 1.2 * t + k) for k in range(leads)], axis=1)


def _write_wfdb(folder: Path, name: str = "rec", signal: np.ndarray | None = None, **extra) -> Path:
    signal = _sines() if signal is None else signal
    options = dict(fs=FS, units=["mV"] * signal.shape[1], sig_name=["I", "II", "V1"][: signal.shape[1]],
                   p_signal=signal, fmt=["16"] * signal.shape[1], write_dir=str(folder))
    options.update(extra)
    wfdb.wrsamp(name, **options)
    return folder / f"{name}.hea"


def _write_edf(path: Path, signals: list[np.ndarray], rates: list[int], annotations=(), **header) -> Path:
    heads = [highlevel.make_signal_header(f"ECG {name}", dimension="uV", sample_frequency=rate,
                                          physical_min=-2000, physical_max=2000)
             for name, rate in zip(["I", "II", "III"], rates)]
    head = highlevel.make_header(**header)
    head["annotations"] = [list(a) for a in annotations]
    highlevel.write_edf(str(path), [np.ascontiguousarray(s) for s in signals], heads, head)
    return path


def _reason(path: Path, **kwargs) -> str:
    with pytest.raises(SignalReadError) as info:
        read_signal(str(path), **kwargs)
    text = str(info.value)
    assert "\n" not in text and str(path.parent) not in text and path.name not in text
    assert not any(value in text for value in PHI)
    return info.value.reason


def test_suffixes_and_companions():
    assert {".hea", ".edf", ".bdf", ".dcm", ".csv", ".parquet"} <= SIGNAL_SUFFIXES
    assert is_signal_file("P1/study/rec.hea") and is_signal_file("a/B.EDF") and is_signal_file("x.parquet")
    assert not is_signal_file("P1/rec.dat") and not is_signal_file("P1/rec.atr") and not is_signal_file("a.png")


def test_wfdb_round_trip_with_annotations_and_gaps(tmp_path):
    signal = _sines(3)
    signal[100:110, 1] = np.nan  # written as WFDB's invalid sample, read back as NaN
    header = _write_wfdb(tmp_path, signal=signal, comments=["patient: MRN4455667", "name: John Smith"],
                         base_date=datetime.date(2020, 1, 2), base_time=datetime.time(10, 11, 12))
    wfdb.wrann("rec", "atr", np.array([50, 300, 600]), symbol=["N", "V", "N"], aux_note=["(N", "", "(AFIB"],
               write_dir=str(tmp_path))
    record = read_signal(str(header))
    assert (record.format, record.fs, record.leads, record.units) == ("wfdb", 250.0, ("I", "II", "V1"),
                                                                     ("mV", "mV", "mV"))
    assert record.signals.shape == (3, FS * SECONDS) and record.signals.dtype == np.float32
    missing = np.isnan(record.signals)
    assert missing[1, 100:110].all() and missing.sum() == 10
    # 16-bit quantisation of a +-1 mV signal: well under 1e-3 mV
    np.testing.assert_allclose(record.signals[~missing], signal.T[~missing], atol=1e-3)
    assert record.patient_id == "MRN4455667"
    assert record.start == datetime.datetime(2020, 1, 2, 10, 11, 12)
    assert [(a.sample, a.symbol, a.note) for a in record.annotations] == [(50, "N", "(N"), (300, "V", ""),
                                                                          (600, "N", "(AFIB")]
    assert "John Smith" not in repr(record)


def test_wfdb_multisegment_record_is_joined(tmp_path):
    first, second = _sines(2, seconds=2), _sines(2, seconds=2, amplitude=0.5)
    _write_wfdb(tmp_path, "seg1", first)
    _write_wfdb(tmp_path, "seg2", second)
    (tmp_path / "multi.hea").write_text(f"multi/2 2 {FS} {2 * len(first)}\nseg1 {len(first)}\nseg2 {len(second)}\n")
    record = read_signal(str(tmp_path / "multi.hea"))
    assert record.signals.shape == (2, 2 * len(first)) and record.leads == ("I", "II")
    np.testing.assert_allclose(record.signals, np.concatenate([first, second]).T, atol=1e-3)


def test_edf_round_trip_header_fields(tmp_path):
    values = _sines(2, amplitude=1000.0).T  # uV
    path = _write_edf(tmp_path / "rec.edf", list(values), [FS, FS], patientname="John Smith",
                      patientcode="MRN4455667", birthdate="04 mar 1950", sex="M",
                      startdate=datetime.datetime(2021, 5, 6, 7, 8, 9))
    record = read_signal(str(path))
    assert (record.format, record.fs, record.leads, record.units) == ("edf", 250.0, ("ECG I", "ECG II"), ("uV", "uV"))
    # 16-bit digital range over 4000 uV of physical range: one step is ~0.06 uV
    np.testing.assert_allclose(record.signals, values, atol=0.1)
    assert record.patient_id == "MRN4455667"
    assert record.start == datetime.datetime(2021, 5, 6, 7, 8, 9)
    assert record.header["patientname"] == "John Smith"


def test_edf_mixed_rates_keep_the_most_common_rate(tmp_path):
    fast, slow = _sines(1, fs=FS)[:, 0] * 1000, _sines(2, fs=100)[:, :].T * 1000
    path = _write_edf(tmp_path / "mixed.edf", [fast, slow[0], slow[1]], [FS, 100, 100], patientcode="X")
    record = read_signal(str(path))
    assert record.fs == 100.0 and record.leads == ("ECG II", "ECG III") and record.signals.shape == (2, 400)
    assert record.header["dropped_signals"] == "1" and record.patient_id is None
    tie = _write_edf(tmp_path / "tie.edf", [fast, slow[0]], [FS, 100])
    assert _reason(tie) == "mixed_sampling_rates"


def test_dicom_twelve_lead_ecg():
    record = read_signal(ECG_DCM)
    assert record.format == "dicom-waveform" and record.fs == 1000.0
    assert record.leads == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    assert record.signals.shape == (12, 10000) and record.units == ("uV",) * 12
    ds = pydicom.dcmread(ECG_DCM)
    raw = np.frombuffer(ds.WaveformSequence[0].WaveformData, dtype="<i2").reshape(10000, 12)
    np.testing.assert_allclose(record.signals, raw.T * 1.25)  # sensitivity 1.25 uV per unit, baseline 0
    assert record.start == datetime.datetime(2013, 1, 25, 10, 59, 19)


def test_dicom_identifiers_become_the_image_pseudonym_and_shift(tmp_path, pseudonyms):
    ds = pydicom.dcmread(ECG_DCM)
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = "MRN4455667", "Roe^Richard", "19500304"
    path = tmp_path / "ecg.dcm"
    ds.save_as(path)
    record = read_signal(str(path))
    assert record.patient_id == "MRN4455667"
    signal = deidentify_record(record, pseudonyms, record.patient_id)
    image = deidentify_header(pydicom.dcmread(path), pseudonyms)
    assert signal.patient == pseudonyms.patient("MRN4455667") == image["PatientID"]
    assert signal.start is not None and signal.start[:10].replace("-", "") == image["StudyDate"]
    assert signal.header_kept == {"sex": "F", "age": "42"}
    _assert_no_phi(signal)


def test_tables_with_and_without_time_column(tmp_path):
    values = _sines(2)
    frame = pd.DataFrame({"time": np.arange(len(values)) / FS, "II[mV]": values[:, 0], "V1": values[:, 1]})
    frame.to_csv(tmp_path / "timed.csv", index=False)
    record = read_signal(str(tmp_path / "timed.csv"))
    assert (record.format, record.fs, record.leads, record.units) == ("csv", 250.0, ("II", "V1"), ("mV", ""))
    np.testing.assert_allclose(record.signals, values.T, atol=1e-6)

    frame.drop(columns="time").assign(patient="MRN4455667").to_parquet(tmp_path / "plain.parquet")
    record = read_signal(str(tmp_path / "plain.parquet"), table_rate_hz=500)
    assert (record.format, record.fs, record.patient_id) == ("parquet", 500.0, "MRN4455667")
    np.testing.assert_array_equal(record.signals, values.T.astype(np.float32))
    assert _reason(tmp_path / "plain.parquet") == "no_sampling_rate"
    frame.rename(columns={"time": "time[ms]"}).assign(**{"time[ms]": frame["time"] * 1000}).to_csv(
        tmp_path / "ms.csv", index=False)
    assert read_signal(str(tmp_path / "ms.csv")).fs == 250.0


def _bad_wfdb(tmp_path: Path, case: str) -> Path:
    header = _write_wfdb(tmp_path)
    data = tmp_path / "rec.dat"
    if case == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif case == "no_dat":
        data.unlink()
    elif case == "garbage":
        header.write_bytes(b"\x00\xffgarbage header\n\x01")
    else:  # a rate of `case`
        lines = header.read_text().splitlines()
        parts = lines[0].split()
        parts[2] = case
        header.write_text("\n".join([" ".join(parts), *lines[1:]]) + "\n")
    return header


@pytest.mark.parametrize(("case", "reason"), [
    ("truncated", "truncated_data"), ("no_dat", "missing_data_file"), ("garbage", "unreadable_header"),
    ("0", "bad_sampling_rate"), ("-250", "bad_sampling_rate"),
])
def test_bad_wfdb(tmp_path, case, reason):
    assert _reason(_bad_wfdb(tmp_path, case)) == reason


def test_bad_annotations_and_size_limit(tmp_path, monkeypatch):
    header = _write_wfdb(tmp_path)
    (tmp_path / "rec.atr").write_bytes(b"\xff" * 7)
    assert _reason(header) == "unreadable_annotations"
    (tmp_path / "rec.atr").unlink()
    monkeypatch.setattr(readers, "MAX_SIGNAL_VALUES", 100)
    assert _reason(header) == "too_large"


def test_bad_edf(tmp_path):
    (tmp_path / "garbage.edf").write_bytes(b"not an edf at all " * 40)
    assert _reason(tmp_path / "garbage.edf") == "unreadable_header"
    good = _write_edf(tmp_path / "good.edf", list(_sines(2, amplitude=100.0).T), [FS, FS])
    (tmp_path / "cut.edf").write_bytes(good.read_bytes()[:-300])
    assert _reason(tmp_path / "cut.edf") == "truncated_data"
    data = bytearray(good.read_bytes())
    assert data[192:197] == b"EDF+C"
    data[192:197] = b"EDF+D"
    (tmp_path / "gaps.edf").write_bytes(bytes(data))
    assert _reason(tmp_path / "gaps.edf") == "discontinuous_recording"


def test_bad_dicom(tmp_path):
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), tmp_path / "image.dcm")
    assert _reason(tmp_path / "image.dcm") == "not_a_waveform"
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 64 + b"junk" * 50)
    assert _reason(tmp_path / "junk.dcm") == "unreadable_file"
    ds = pydicom.dcmread(ECG_DCM)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.9.4.1"  # basic voice audio waveform
    ds.save_as(tmp_path / "audio.dcm")
    assert _reason(tmp_path / "audio.dcm") == "unsupported_waveform"
    ds = pydicom.dcmread(ECG_DCM)
    for item in ds.WaveformSequence:
        item.WaveformData = item.WaveformData[:1000]
    ds.save_as(tmp_path / "short.dcm")
    assert _reason(tmp_path / "short.dcm") == "truncated_data"
    ds = pydicom.dcmread(ECG_DCM)
    for item in ds.WaveformSequence:
        item.SamplingFrequency = 0
    ds.save_as(tmp_path / "rate.dcm")
    assert _reason(tmp_path / "rate.dcm") == "bad_sampling_rate"


def test_bad_tables(tmp_path):
    pd.DataFrame({"name": ["a", "b"], "note": ["x", "y"]}).to_csv(tmp_path / "text.csv", index=False)
    assert _reason(tmp_path / "text.csv", table_rate_hz=100) == "no_signal_columns"
    pd.DataFrame({"II": [1.0, 2.0, 3.0]}).to_csv(tmp_path / "rate.csv", index=False)
    assert _reason(tmp_path / "rate.csv", table_rate_hz=0) == "bad_sampling_rate"
    pd.DataFrame({"time": [0.0, 0.0, 0.0], "II": [1.0, 2.0, 3.0]}).to_csv(tmp_path / "flat.csv", index=False)
    assert _reason(tmp_path / "flat.csv") == "bad_sampling_rate"
    pd.DataFrame({"time": [0.0, 0.1, 0.5, 0.6], "II": [1.0] * 4}).to_csv(tmp_path / "jumps.csv", index=False)
    assert _reason(tmp_path / "jumps.csv") == "irregular_sampling"
    pd.DataFrame({"subject": ["A", "B"], "II": [1.0, 2.0]}).to_csv(tmp_path / "two.csv", index=False)
    assert _reason(tmp_path / "two.csv", table_rate_hz=100) == "mixed_patients"
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    assert _reason(tmp_path / "junk.parquet") == "unreadable_file"
    (tmp_path / "empty.csv").write_bytes(b"")
    assert _reason(tmp_path / "empty.csv") == "unreadable_file"
    (tmp_path / "x.xyz").write_bytes(b"1")
    assert _reason(tmp_path / "x.xyz") == "unsupported_format"
    assert _reason(tmp_path / "gone.hea") == "missing_file"


def _kept(signal) -> dict:
    """Every field of a DeidentifiedSignal the store may keep, as JSON-ready values."""
    kept = {k: v for k, v in asdict(signal).items() if k not in ("signals", "audit")}
    kept["audit"] = signal.audit.to_dict()
    return kept


def _assert_no_phi(signal) -> None:
    text = repr(signal) + json.dumps(_kept(signal), default=str)
    for value in PHI:
        assert value not in text


def test_wfdb_header_deidentified(tmp_path, pseudonyms):
    comments = ["patient: MRN4455667", "name: John Smith", "birth date: 1950-03-04", "age: 93", "sex: Male",
                "Dx: 164889003,59118001", "Rx: John Smith", "rhythm: atrial fibrillation",
                "referred by Dr. Jane Roe", "John Smith: JSMITH"]
    header = _write_wfdb(tmp_path, signal=_sines(2), comments=comments, base_date=datetime.date(2020, 1, 2),
                         base_time=datetime.time(10, 11, 12), sig_name=["II", "Richard Roe"])
    wfdb.wrann("rec", "atr", np.array([10, 20]), symbol=["N", "N"], aux_note=["(AFIB", "Jane Roe"],
               write_dir=str(tmp_path))
    record = read_signal(str(header))
    signal = deidentify_record(record, pseudonyms, record.patient_id or "")
    assert signal.patient == pseudonyms.patient("MRN4455667")
    shift = pseudonyms.date_shift_days("MRN4455667")
    assert signal.start == (datetime.datetime(2020, 1, 2, 10, 11, 12) - datetime.timedelta(days=shift)).isoformat()
    assert signal.header_kept == {"age": "90+", "sex": "M", "Dx": "164889003,59118001",
                                  "rhythm": "atrial fibrillation"}
    assert signal.leads == ("II", "lead2") and signal.units == ("mV", "mV")
    assert [(a.sample, a.symbol, a.note) for a in signal.annotations] == [(10, "N", "(AFIB"), (20, "N", "")]
    np.testing.assert_array_equal(signal.signals, record.signals)
    assert signal.audit.counts[("Rx", "X*")] == 1 and signal.audit.counts[("header_field", "X")] == 3
    assert signal.audit.counts[("patient_id", "X")] == 1
    _assert_no_phi(signal)


def test_edf_header_deidentified_with_derived_age(tmp_path, pseudonyms):
    path = _write_edf(tmp_path / "rec.edf", list(_sines(2, amplitude=100.0).T), [FS, FS], patientname="John Smith",
                      patientcode="MRN4455667", birthdate="04 mar 1950", sex="F",
                      startdate=datetime.datetime(2021, 5, 6, 7, 8, 9),
                      annotations=[(0.5, 0, "(AFIB"), (1.0, 0, "Called John Smith")])
    record = read_signal(str(path))
    assert [(a.sample, a.note) for a in record.annotations] == [(125, "(AFIB"), (250, "Called John Smith")]
    # the ingest may decide on another identifier (e.g. the manifest's): pseudonym and shift follow it
    signal = deidentify_record(record, pseudonyms, "manifest-id-7")
    assert signal.patient == pseudonyms.patient("manifest-id-7")
    shifted = datetime.datetime(2021, 5, 6, 7, 8, 9) - datetime.timedelta(
        days=pseudonyms.date_shift_days("manifest-id-7"))
    assert signal.start == shifted.isoformat()
    assert signal.header_kept == {"sex": "F", "age": "71"}
    assert [(a.sample, a.symbol, a.note) for a in signal.annotations] == [(125, "", "(AFIB")]
    _assert_no_phi(signal)


def test_same_pseudonym_for_every_format(tmp_path, pseudonyms):
    wfdb_record = read_signal(str(_write_wfdb(tmp_path, comments=["subject: MRN4455667"])))
    table = tmp_path / "t.csv"
    pd.DataFrame({"patient_id": ["MRN4455667"] * 10, "II": np.arange(10.0)}).to_csv(table, index=False)
    table_record = read_signal(str(table), table_rate_hz=FS)
    assert wfdb_record.patient_id == table_record.patient_id == "MRN4455667"
    patients = {deidentify_record(r, pseudonyms, "MRN4455667").patient for r in (wfdb_record, table_record)}
    assert patients == {pseudonyms.patient("MRN4455667")}


def test_demo_records_read_check_and_deidentify(tmp_path, pseudonyms):
    from medpipe.signals.demo import SignalDemoSpec, generate_demo_signals

    summary = generate_demo_signals(tmp_path, SignalDemoSpec(patients=2, records_per_patient=2, seconds=6.0,
                                                             rate_hz=250))
    paths = sorted(p for p in tmp_path.rglob("*") if is_signal_file(str(p)) and p.name != "labels.csv")
    records = [read_signal(str(p)) for p in paths]
    assert sorted(r.format for r in records) == ["edf", "edf", "wfdb", "wfdb"]
    phi = [value for values in summary.phi.values() for value in values]
    by_patient: dict[str, set[str]] = {}
    for record in records:
        assert record.fs == 250.0 and len(record.leads) == 12 and record.signals.shape == (12, 1500)
        assert record.patient_id in summary.phi["patient_id"]
        assert signal_problem(record.signals, record.fs, min_seconds=5.0) is None
        signal = deidentify_record(record, pseudonyms, record.patient_id)
        by_patient.setdefault(record.patient_id, set()).add(signal.patient)
        text = repr(signal) + json.dumps(_kept(signal), default=str)
        assert not [value for value in phi if value in text]
    assert by_patient == {pid: {pseudonyms.patient(pid)} for pid in summary.phi["patient_id"]}
