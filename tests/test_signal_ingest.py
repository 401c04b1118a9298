"""Signal ingest end to end (serial steps, as the flow runs them): demo ECG records in WFDB and EDF, pydicom's own
12-lead DICOM ECG, CSV/Parquet tables, and one record of every bad kind -> a windowed store with per-patient
splits, every record accounted for, no identifying text anywhere in the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from medpipe.deid import Pseudonymizer, resolve_key
from medpipe.ingest.lock import acquire_lock, new_run_id, release_lock
from medpipe.ingest.pipeline import direct_driver, prepare_ingest, serial_mapper
from medpipe.config import IngestConfig
from medpipe.signals.config import SignalIngestConfig
from medpipe.signals.demo import SignalDemoSpec, generate_demo_signals
from medpipe.signals.ingest import prepare_signal_ingest, run_signal_ingest_steps
from medpipe.signals.store import read_window_table, signal_attrs, signal_content_hash
from medpipe.splits import split_of
from medpipe.store import read_json

RATE = 100.0


def _wfdb(folder: Path, name: str, signals: np.ndarray, fs: float, comments: list[str]) -> str:
    import wfdb

    folder.mkdir(parents=True, exist_ok=True)
    leads = ["I", "II", "III"][: signals.shape[1]]
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=leads, p_signal=signals, fmt=["16"] * len(leads),
                comments=comments, write_dir=str(folder))
    return f"{folder.name}/{name}.hea"


def _ecg_like(seconds: float, fs: float, leads: int, seed: int) -> np.ndarray:
    """(T, leads) spiky periodic signal in mV (beats every 0.8 s) plus a little noise."""
    t = np.arange(int(seconds * fs)) / fs
    beat = np.exp(-(((t % 0.8) - 0.3) ** 2) / (2 * 0.01**2))
    rng = np.random.default_rng(seed)
    return np.stack([beat * (0.5 + 0.3 * k) + 0.02 * rng.standard_normal(t.size) for k in range(leads)], axis=1)


@pytest.fixture(scope="module")
def signal_source(tmp_path_factory):
    """Demo records (WFDB + EDF with fake PHI), pydicom's DICOM ECG, a CSV and a Parquet table of one more patient,
    and bad records; returns (root, {relative path: expected quarantine reason})."""
    import pandas as pd
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("signals") / "src"
    demo = generate_demo_signals(root, SignalDemoSpec(patients=4, records_per_patient=2, seconds=12.0, seed=3))
    dicom = root / "PT-DICOM-77" / "ecg.dcm"
    dicom.parent.mkdir()
    shutil.copy(get_testdata_file("waveform_ecg.dcm"), dicom)
    tables = root / "PT-TABLE-5"
    tables.mkdir()
    good = _ecg_like(11.0, 250.0, 3, 1)
    frame = pd.DataFrame({f"{lead}[mV]": good[:, k] for k, lead in enumerate(("I", "II", "III"))})
    frame.insert(0, "time", np.arange(len(frame)) / 250.0)
    frame.to_csv(tables / "rest.csv", index=False)
    frame.to_parquet(tables / "rest2.parquet")
    bad = root / "PT-BAD-9"
    expected = {}
    flat = _ecg_like(12.0, 360.0, 3, 2)
    flat[:, 1] = 0.25
    expected[_wfdb(bad, "flat", flat, 360.0, ["electrode off"])] = "flat_lead"
    holes = _ecg_like(12.0, 360.0, 3, 3)
    holes[720:1800, 0] = np.nan  # 3 s missing
    nan_frame = pd.DataFrame({f"{lead}[mV]": holes[:, k] for k, lead in enumerate(("I", "II", "III"))})
    nan_frame.insert(0, "time", np.arange(len(nan_frame)) / 360.0)
    nan_frame.to_csv(bad / "holes.csv", index=False)
    expected["PT-BAD-9/holes.csv"] = "nan_run"
    expected[_wfdb(bad, "short", _ecg_like(2.0, 360.0, 3, 4), 360.0, [])] = "too_short"
    (bad / "garbage.edf").write_bytes(b"not an EDF file at all" * 50)
    expected["PT-BAD-9/garbage.edf"] = None  # a reader's reason (checked: quarantined)
    _wfdb(bad, "nodat", _ecg_like(12.0, 360.0, 3, 5), 360.0, [])
    (bad / "nodat.dat").unlink()
    expected["PT-BAD-9/nodat.hea"] = None
    planted = [v for values in demo.phi.values() for v in values]  # names, IDs, birth dates, physicians, ...
    assert planted
    return root, expected, planted


def _ingest(source: Path | str, store: Path | str, config: SignalIngestConfig) -> dict:
    key = resolve_key()
    run_id = new_run_id()
    acquire_lock(str(store), run_id)
    try:
        run = prepare_signal_ingest(str(source), str(store), config, key, run_id)
        if run.up_to_date:
            return {"noop": True}
        return run_signal_ingest_steps(run, key, serial_mapper, direct_driver)
    finally:
        release_lock(str(store), run_id)


@pytest.fixture(scope="module")
def ingested(signal_source, deid_key_module, tmp_path_factory):
    root, expected, _ = signal_source
    store = tmp_path_factory.mktemp("store") / "signals.zarr"
    config = SignalIngestConfig(rate_hz=RATE, window_s=4.0, overlap_s=1.0, files_per_shard=3,
                                leads=["I", "II", "III"])
    return root, expected, store, config, _ingest(root, store, config)


def test_every_record_is_accounted_for(ingested):
    root, expected, store, config, summary = ingested
    counts = summary["counts"]
    assert counts["discovered"] == counts["ingested"] + counts["quarantined"]
    quarantine = read_json(str(store), "reports/quarantine.json")
    pseudonyms = Pseudonymizer(resolve_key())
    by_hash = {q["source_hash"]: q["reason"] for q in quarantine}
    for path, reason in expected.items():
        assert pseudonyms.path(path) in by_hash, path
        if reason is not None:
            assert by_hash[pseudonyms.path(path)] == reason, path
    assert counts["quarantined"] == len(expected)
    assert summary["leads"] == ["I", "II", "III"] and summary["units"] == ["mV"] * 3


def test_windows_follow_the_config_and_splits_are_per_patient(ingested):
    root, _, store, config, summary = ingested
    table = read_window_table(str(store))
    attrs = signal_attrs(str(store))
    assert attrs["window"] == 400 and attrs["stride"] == 300 and attrs["rate_hz"] == RATE
    signals = zarr.open_group(str(store), mode="r")["signals"]
    assert signals.shape == (len(table["record"]), 3, 400)
    for record in np.unique(table["record"]):
        rows = table["record"] == record
        windows = table["window"][rows]
        assert list(windows) == list(range(rows.sum()))
        assert np.allclose(np.diff(table["start_s"][rows]), 3.0)  # stride 300 samples at 100 Hz
    # every good record here lasts 10-12 s: 1000-1200 samples at 100 Hz -> windows at 0, 3 and 6 s (one at 9 s
    # would run past the end and is dropped)
    assert set(np.bincount(np.unique(table["record"], return_inverse=True)[1]).tolist()) == {3}
    for patient in np.unique(table["patient"]):
        codes = set(table["split"][table["patient"] == patient].tolist())
        assert codes == {split_of(patient, config.split)}
    assert set(table["patient"]) == {Pseudonymizer(resolve_key()).patient(p) for p in _patients(root)}


def _patients(root: Path) -> set[str]:
    """Patient identifiers the ingest should have used: demo records carry theirs in the headers."""
    import pydicom
    import pyedflib
    import wfdb

    found = set()
    for path in root.rglob("*"):
        if path.parent.name == "PT-BAD-9" or path.name == "labels.csv":
            continue
        if path.suffix == ".hea":
            comments = wfdb.rdheader(str(path.with_suffix(""))).comments
            found |= {c.split(":", 1)[1].strip() for c in comments if c.lower().startswith("patient")}
        elif path.suffix == ".edf":
            with pyedflib.EdfReader(str(path)) as reader:
                found.add(reader.getPatientCode())
        elif path.suffix == ".dcm":
            found.add(str(pydicom.dcmread(path).PatientID))
        elif path.suffix in (".csv", ".parquet"):
            found.add(path.parent.name)
    return found


def test_dicom_waveform_is_resampled_and_in_millivolts(ingested, signal_source):
    import pydicom

    root, _, store, _, _ = ingested
    ds = pydicom.dcmread(root / "PT-DICOM-77" / "ecg.dcm")
    pseudonym = Pseudonymizer(resolve_key()).patient(str(ds.PatientID))
    table = read_window_table(str(store))
    rows = np.flatnonzero(table["patient"] == pseudonym)
    assert rows.size == 3  # 10 s at 1000 Hz -> 1000 samples at 100 Hz: windows at 0, 3 and 6 s
    first = np.asarray(zarr.open_group(str(store), mode="r")["signals"][rows[0]])
    raw = ds.waveform_array(0)[:4000:10, :3].T  # uV, I/II/III, every 10th sample (no filtering: a coarse check)
    assert np.abs(first).max() < 10  # mV, not uV
    assert np.corrcoef(first[1], raw[1] / 1000)[0, 1] > 0.9


def test_no_identifying_text_in_the_store(ingested, signal_source):
    from tests.phi_scan import store_text

    root, _, store, _, _ = ingested
    planted = signal_source[2]
    text = store_text(store)  # decoded: string arrays are compressed on disk
    assert "P-" in text  # the scan sees the pseudonyms, so it would see identifiers too
    for phi in (*planted, "PT-BAD-9", "PT-DICOM-77", "PT-TABLE-5", "642341"):
        assert phi not in text, phi
    for folder in (p.name for p in root.iterdir() if p.is_dir()):
        assert folder not in text, folder
        for part in folder.split("_"):
            assert part not in text, part


def test_content_hash_verifies_and_a_rerun_is_a_noop(ingested):
    root, _, store, config, summary = ingested
    assert signal_content_hash(zarr.open_group(str(store), mode="r")) == summary["content_hash"]
    assert _ingest(root, store, config) == {"noop": True}


def test_image_ingest_skips_signal_records(signal_source, deid_key, tmp_path):
    root = signal_source[0]
    store, run_id = str(tmp_path / "images.zarr"), new_run_id()
    acquire_lock(store, run_id)
    try:
        run = prepare_ingest(str(root), store, IngestConfig(), resolve_key(), run_id)
    finally:
        release_lock(store, run_id)
    assert not [p for p in run.listing.paths if p.endswith((".hea", ".dat", ".edf", ".csv", ".parquet"))]
    assert any(p.endswith(".dcm") for p in run.listing.paths)  # a DICOM may be an image: image ingest decides


def test_sharding_does_not_change_the_store(ingested, tmp_path):
    root, _, store, config, summary = ingested
    other = _ingest(root, tmp_path / "one-shard.zarr", config.model_copy(update={"files_per_shard": 1000}))
    assert other["content_hash"] == summary["content_hash"]
    assert json.dumps(read_json(str(tmp_path / "one-shard.zarr"), "reports/quarantine.json")) == \
        json.dumps(read_json(str(store), "reports/quarantine.json"))


def test_a_record_that_breaks_processing_is_quarantined(signal_source, deid_key, tmp_path, monkeypatch):
    """An unexpected error while processing one record quarantines that record (its type only: the message could
    quote a header) and the run goes on."""
    from medpipe.signals import ingest as signal_ingest

    monkeypatch.setenv("MEDPIPE_LOG_DIR", str(tmp_path / "errors"))
    real = signal_ingest.deidentify_record

    def breaks_on_the_dicom(record, pseudonyms, patient_id):
        if record.format == "dicom-waveform":
            raise RuntimeError("secret header value 642341")
        return real(record, pseudonyms, patient_id)

    monkeypatch.setattr(signal_ingest, "deidentify_record", breaks_on_the_dicom)
    root = signal_source[0]
    summary = _ingest(root, tmp_path / "s.zarr", SignalIngestConfig(rate_hz=RATE, window_s=4.0, leads=["I", "II", "III"]))
    quarantine = read_json(str(tmp_path / "s.zarr"), "reports/quarantine.json")
    broken = [q for q in quarantine if q["source_hash"] == Pseudonymizer(resolve_key()).path("PT-DICOM-77/ecg.dcm")]
    assert [q["reason"] for q in broken] == ["processing_error"]
    assert "RuntimeError" in broken[0]["detail"] and "642341" not in json.dumps(quarantine)
    assert summary["counts"]["ingested"] > 0 and list((tmp_path / "errors").iterdir())


def test_ptbxl_layout_with_patients_from_the_manifest(deid_key, tmp_path):
    """PTB-XL's layout: records100/00000/00001_lr.hea (no patient in the header, 100 Hz, 10 s), patients and
    labels in a table: the manifest's patient_id decides, so two records of one patient share pseudonym and split."""
    root = tmp_path / "ptbxl"
    folder = root / "records100" / "00000"
    rows = ["path,label,patient_id"]
    for i, (patient, label) in enumerate((("15709", "NORM"), ("15709", "AFIB"), ("13243", "NORM"), ("20372", "AFIB")),
                                         start=1):
        _wfdb(folder, f"{i:05d}_lr", _ecg_like(10.0, 100.0, 3, i), 100.0, [])
        rows.append(f"records100/00000/{i:05d}_lr.hea,{label},{patient}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    _wfdb(root / "records500" / "00000", "00001_hr", _ecg_like(10.0, 500.0, 3, 9), 500.0, [])  # not in the manifest
    store = tmp_path / "ptbxl.zarr"
    summary = _ingest(root, store, SignalIngestConfig(window_s=5.0, manifest_only=True))
    assert summary["counts"] == {"discovered": 4, "ingested": 4, "quarantined": 0, "windows": 8, "patients": 3,
                                 "skipped_files": 2}  # the 500 Hz copy: its .hea and .dat
    table = read_window_table(str(store))
    pseudonyms = Pseudonymizer(resolve_key())
    assert set(table["patient"]) == {pseudonyms.patient(p) for p in ("15709", "13243", "20372")}
    assert summary["classes"] == ["AFIB", "NORM"]
    one = table["patient"] == pseudonyms.patient("15709")
    assert one.sum() == 4 and len(set(table["split"][one].tolist())) == 1
    assert sorted(table["label"][one].tolist()) == [0, 0, 1, 1]


def test_s3_source_and_store_give_the_local_store(ingested, moto_s3):
    """Records read from s3:// (each with its companion files, copied next to it for the readers) into an s3://
    store: the same windows, table and content hash as the local run."""
    import s3fs

    root, _, _, config, summary = ingested
    fs = s3fs.S3FileSystem()
    fs.mkdir("medpipe-signals")
    fs.put(str(root), "medpipe-signals/src", recursive=True)
    s3_summary = _ingest("s3://medpipe-signals/src", "s3://medpipe-signals/signals.zarr", config)
    assert s3_summary["counts"] == summary["counts"]
    assert s3_summary["content_hash"] == summary["content_hash"]
    assert signal_attrs("s3://medpipe-signals/signals.zarr")["content_hash"] == summary["content_hash"]
    assert not fs.exists("medpipe-signals/signals.zarr/work/signal-staging")


def test_a_multi_segment_wfdb_record_is_one_record(deid_key, tmp_path):
    """MIMIC-style multi-segment records (written by wfdb itself): the master header lists `rec1_0001`, `rec1_0002`;
    the ingest reads them once, joined, not again as records of their own. A record that merely shares the stem
    (`rec1_other`, not listed) stays a record; a variable-layout record with an 8 s gap is one `nan_run`."""
    import wfdb

    folder = tmp_path / "src" / "PT-MS-1"
    folder.mkdir(parents=True)
    parts = [_ecg_like(20.0, RATE, 2, seed) for seed in (11, 12)]
    segments = []
    for i, part in enumerate(parts, start=1):
        _wfdb(folder, f"rec1_{i:04d}", part, RATE, ["patient: MS-1"])
        segments.append(wfdb.rdrecord(str(folder / f"rec1_{i:04d}")))
    wfdb.MultiRecord(segments=segments, layout="fixed", record_name="rec1", n_sig=2, fs=RATE,
                     sig_len=sum(s.sig_len for s in segments), seg_name=[s.record_name for s in segments],
                     seg_len=[s.sig_len for s in segments], comments=["patient: MS-1"]).wrheader(write_dir=str(folder))
    _wfdb(folder, "rec1_other", _ecg_like(10.0, RATE, 2, 13), RATE, ["patient: MS-1"])
    gap = tmp_path / "src" / "PT-MS-2"  # MIMIC's variable layout, written by hand as MIMIC's files read: 8 s missing
    gap.mkdir()
    for name in ("rec2_0001", "rec2_0002"):
        _wfdb(gap, name, _ecg_like(20.0, RATE, 2, 14), RATE, [])
    (gap / "rec2_layout.hea").write_text("rec2_layout 2 100 0\n~ 16 200/mV 16 0 0 0 0 I\n~ 16 200/mV 16 0 0 0 0 II\n")
    (gap / "rec2.hea").write_text("rec2/4 2 100 4800\nrec2_layout 0\nrec2_0001 2000\n~ 800\nrec2_0002 2000\n"
                                  "# patient: MS-2\n")
    store = tmp_path / "ms.zarr"
    summary = _ingest(tmp_path / "src", store, SignalIngestConfig(rate_hz=RATE, window_s=5.0, leads=["I", "II"]))
    assert summary["counts"]["discovered"] == 3 and summary["counts"]["ingested"] == 2
    assert summary["counts"]["windows"] == 8 + 2 and summary["counts"]["skipped_files"] == 0
    quarantine = read_json(str(store), "reports/quarantine.json")
    assert [(q["source_hash"], q["reason"]) for q in quarantine] == [
        (Pseudonymizer(resolve_key()).path("PT-MS-2/rec2.hea"), "nan_run")]
    table = read_window_table(str(store))
    master = table["record"] == Pseudonymizer(resolve_key()).path("PT-MS-1/rec1.hea")
    signals = zarr.open_group(str(store), mode="r")["signals"][...][master]
    joined = np.concatenate(parts)[: 8 * 500].T.reshape(2, 8, 500).transpose(1, 0, 2)  # (windows, leads, T)
    np.testing.assert_allclose(signals, joined, atol=0.01)  # 16-bit WFDB quantisation


def test_wfdb_segment_names_from_a_header():
    from medpipe.signals.readers import wfdb_segment_names

    assert wfdb_segment_names("rec1/3 2 125 9000\nrec1_layout 0\n~ 500\nrec1_0001 8500\n# patient: x\n") == (
        "rec1_layout", "rec1_0001")
    assert wfdb_segment_names("100 2 360 650000\n100.dat 212 200 11 1024 995 -22131 0 MLII\n") is None
    assert wfdb_segment_names("") is None and wfdb_segment_names("rec/x 2 125\n") is None
