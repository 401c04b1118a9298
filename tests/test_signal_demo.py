"""Demo ECG records, read back with wfdb / pyedflib / neurokit2 directly (not through medpipe's readers)."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import neurokit2 as nk
import numpy as np
import pytest
import wfdb
from pyedflib import highlevel

from medpipe.config import SplitConfig
from medpipe.deid import DEMO_KEY, DeidKey, Pseudonymizer
from medpipe.signals.demo import LEAD_NAMES, SignalDemoSpec, SignalDemoSummary, generate_demo_signals
from medpipe.splits import split_of

SMALL = SignalDemoSpec(patients=4, records_per_patient=4, seconds=20.0, rate_hz=500, seed=3)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> SignalDemoSummary:
    return generate_demo_signals(tmp_path_factory.mktemp("ecg"), SMALL)


def _manifest(root: str | Path) -> list[dict[str, str]]:
    with open(Path(root) / "labels.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read(root: str | Path, rel: str) -> tuple[np.ndarray, float, list[str], list[str], str]:
    """(leads, T) mV, rate, lead names, units, patient id from the header, read by the libraries themselves."""
    path = Path(root) / rel
    if path.suffix == ".hea":
        record = wfdb.rdrecord(str(path.with_suffix("")))
        pid = next(c.split(":", 1)[1].strip() for c in record.comments if c.startswith("patient:"))
        return record.p_signal.T, float(record.fs), list(record.sig_name), list(record.units), pid
    signals, headers, header = highlevel.read_edf(str(path))
    rates = {h["sample_frequency"] for h in headers}
    assert len(rates) == 1
    return (signals, float(rates.pop()), [h["label"] for h in headers], [h["dimension"] for h in headers],
            header["patientcode"])


def _rr_cv(lead_ii: np.ndarray, fs: float) -> float:
    _, info = nk.ecg_peaks(lead_ii, sampling_rate=int(fs))
    rr = np.diff(info["ECG_R_Peaks"]) / fs
    return float(rr.std() / rr.mean())


def test_files_read_back_with_declared_rate_leads_duration_and_labels(small_demo: SignalDemoSummary) -> None:
    rows = _manifest(small_demo.root)
    assert [r.keys() for r in rows][0] == {"path", "label"}
    assert len(rows) == small_demo.records == SMALL.patients * SMALL.records_per_patient
    assert {Path(r["path"]).suffix for r in rows} == {".hea", ".edf"}
    labels_of: dict[str, set[str]] = defaultdict(set)
    formats_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        signals, fs, leads, units, pid = _read(small_demo.root, row["path"])
        assert fs == SMALL.rate_hz
        assert leads == list(LEAD_NAMES) and units == ["mV"] * 12
        assert signals.shape == (12, int(SMALL.seconds * SMALL.rate_hz))
        assert np.isfinite(signals).all() and 0.5 < np.ptp(signals[1]) < 5.0  # an ECG in mV, not volts or noise
        folder = row["path"].split("/")[0]
        assert folder.endswith("_" + pid)  # the folder name carries the identifier too
        labels_of[pid].add(row["label"])
        formats_of[pid].add(Path(row["path"]).suffix)
    assert len(labels_of) == SMALL.patients
    assert all(labels == {"normal", "irregular"} for labels in labels_of.values())
    assert all(formats == {".hea", ".edf"} for formats in formats_of.values())
    assert small_demo.labels == {"normal": 8, "irregular": 8}


def test_summary_counts_every_file(small_demo: SignalDemoSummary) -> None:
    files = [p for p in Path(small_demo.root).rglob("*") if p.is_file()]
    assert small_demo.files == len(files)
    assert small_demo.bytes == sum(p.stat().st_size for p in files)
    assert small_demo.patients == SMALL.patients


def test_headers_carry_the_fake_phi(small_demo: SignalDemoSummary) -> None:
    rows = _manifest(small_demo.root)
    wfdb_row = next(r for r in rows if r["path"].endswith(".hea"))
    record = wfdb.rdrecord(str(Path(small_demo.root) / wfdb_row["path"][:-4]))
    text = "\n".join(record.comments)
    assert any(name in text for name in small_demo.phi["name"])
    assert any(pid in text for pid in small_demo.phi["patient_id"])
    assert any(day in text for day in small_demo.phi["birth_date"])
    assert "referred by Dr. " in text and record.base_date is not None
    edf_row = next(r for r in rows if r["path"].endswith(".edf"))
    _, _, header = highlevel.read_edf(str(Path(small_demo.root) / edf_row["path"]))
    assert header["patientname"] in small_demo.phi["name"]
    assert header["patientcode"] in small_demo.phi["patient_id"]
    assert header["birthdate"] and header["startdate"].year >= 2015


def test_limb_leads_follow_einthoven_and_goldberger(small_demo: SignalDemoSummary) -> None:
    row = _manifest(small_demo.root)[0]
    x, _, leads, _, _ = _read(small_demo.root, row["path"])
    lead = dict(zip(leads, x))
    tol = 0.01  # mV: noise is added per lead after the derivation
    assert np.median(np.abs(lead["III"] - (lead["II"] - lead["I"]))) < tol
    assert np.median(np.abs(lead["aVR"] + (lead["I"] + lead["II"]) / 2)) < tol
    assert np.median(np.abs(lead["aVF"] - (lead["II"] - lead["I"] / 2))) < tol


def test_beat_annotations_sit_on_r_peaks(small_demo: SignalDemoSummary) -> None:
    rows = [r for r in _manifest(small_demo.root) if r["path"].endswith(".hea")]
    for row in rows[:3]:
        base = str(Path(small_demo.root) / row["path"][:-4])
        ann = wfdb.rdann(base, "atr")
        assert ann.symbol[0] == "+" and ann.aux_note[0] == ("(N" if row["label"] == "normal" else "(AFIB")
        beats = np.array([s for s, sym in zip(ann.sample, ann.symbol) if sym == "N"])
        record = wfdb.rdrecord(base)
        _, info = nk.ecg_peaks(record.p_signal[:, 1], sampling_rate=int(record.fs))
        detected = np.asarray(info["ECG_R_Peaks"])
        nearest = np.abs(detected[:, None] - beats[None, :]).min(axis=1)
        assert np.mean(nearest <= 0.03 * record.fs) > 0.95  # detected R peaks are annotated beats
        assert abs(len(beats) - len(detected)) <= 2


def test_irregular_records_have_irregular_rr(small_demo: SignalDemoSummary) -> None:
    cv: dict[str, list[float]] = defaultdict(list)
    for row in _manifest(small_demo.root):
        signals, fs, leads, _, _ = _read(small_demo.root, row["path"])
        cv[row["label"]].append(_rr_cv(signals[leads.index("II")], fs))
    normal, irregular = np.array(cv["normal"]), np.array(cv["irregular"])
    assert irregular.mean() > 2.5 * normal.mean()
    assert irregular.min() > np.median(normal)
    assert normal.max() < 0.12 and irregular.min() > 0.08


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_signals(tmp_path: Path) -> None:
    spec = SignalDemoSpec(patients=2, records_per_patient=2, seconds=6.0, rate_hz=250, seed=5)
    generate_demo_signals(tmp_path / "a", spec)
    generate_demo_signals(tmp_path / "b", spec)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and len(a) == 2 * (3 + 1) + 1
    other = SignalDemoSpec(patients=2, records_per_patient=2, seconds=6.0, rate_hz=250, seed=6)
    generate_demo_signals(tmp_path / "c", other)
    c = _digest(tmp_path / "c")
    dat_a = {k: v for k, v in a.items() if k.endswith(".dat")}
    assert dat_a and not set(dat_a.values()) & set(c.values())


def test_default_demo_gives_every_split_both_classes(tmp_path: Path) -> None:
    summary = generate_demo_signals(tmp_path, SignalDemoSpec())
    pseudonyms = Pseudonymizer(DeidKey(DEMO_KEY.encode()))
    classes_in: dict[int, set[str]] = defaultdict(set)
    for row in _manifest(summary.root):
        _, _, _, _, pid = _read(summary.root, row["path"])
        classes_in[split_of(pseudonyms.patient(pid), SplitConfig())].add(row["label"])
    assert set(classes_in) == {0, 1, 2}
    assert all(classes == {"normal", "irregular"} for classes in classes_in.values())


def test_options_leads_fraction_and_rate(tmp_path: Path) -> None:
    spec = SignalDemoSpec(patients=2, records_per_patient=3, seconds=5.0, rate_hz=360, leads=3,
                          irregular_fraction=0.0)
    summary = generate_demo_signals(tmp_path, spec)
    assert summary.labels == {"normal": 6, "irregular": 0}
    for row in _manifest(tmp_path):
        signals, fs, leads, _, _ = _read(tmp_path, row["path"])
        assert leads == ["I", "II", "III"] and fs == 360 and signals.shape == (3, 1800)


@pytest.mark.parametrize("field,value", [("patients", 0), ("records_per_patient", 0), ("seconds", 1.0),
                                         ("rate_hz", 50), ("leads", 13), ("seed", -1),
                                         ("irregular_fraction", 1.5)])
def test_spec_rejects_bad_values_with_one_line(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SignalDemoSpec(**{field: value})  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
