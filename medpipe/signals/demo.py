"""Deterministic demo ECG records: 12-lead ECGs of fake patients in WFDB and EDF, with fake PHI and a rhythm label.

``generate_demo_signals(out_dir, SignalDemoSpec(...))`` writes::

    OUT_DIR/
      labels.csv                          path,label   (normal / irregular; path relative to OUT_DIR)
      <PATIENT_DIR>/ecg01.hea .dat .atr   WFDB record (fmt 16, mV, 1000 adu/mV), beat annotations "N" at R peaks
      <PATIENT_DIR>/ecg02.edf             EDF+ record (mV), patient name/code/birth date and start in the header
      ...

``<PATIENT_DIR>`` is ``SURNAME_GIVEN_PATIENTID`` and the patients are the image demo's (``medpipe.demo``, same seed):
the same fake people, names, IDs and birth dates, so an ECG gets the same pseudonym as the patient's X-rays.
Records alternate WFDB (odd numbers) and EDF (even numbers), so every patient has both formats.

Signal model
------------
The ECGSYN model (McSharry et al. 2003, the one behind ``neurokit2.ecg_simulate``) in closed form: each beat is a
sum of Gaussian waves P, Q, R, S, T placed around its R peak, with per-lead amplitudes. Leads I and II and V1-V6
are synthesised; III, aVR, aVL and aVF follow from I and II by Einthoven's and Goldberger's equations, as in a
real recorder. ``neurokit2.ecg_simulate(method="multileads")`` itself integrates one ODE per lead (about 1.2 s
per 30-s record on one core, 60 s for the default demo) and its RR process is a 1-Hz spectral process that
cannot make beat-to-beat irregularity, hence the closed form; the RR processes below are built beat by beat.

* **Per patient** (the anatomy): each wave amplitude of each lead scaled by exp(N(0, 0.15)), a rotation of the
  frontal axis (I/II mix), PR interval 0.13-0.20 s, QRS width, QTc 0.38-0.44 s, resting rate 58-88 bpm.
* **normal** (sinus rhythm): RR modulated by respiration (0.2-0.33 Hz, 2-5 %) and Mayer waves (0.1 Hz, 1-3 %)
  plus 1 % beat noise; in a quarter of the records one premature atrial beat (RR x 0.7) with its pause.
  RR coefficient of variation ~3-6 %.
* **irregular** (AF-like, irregularly irregular): RR drawn independently per beat, RR0 x exp(N(0, s)) with
  s 0.13-0.25 and RR0 at 62-105 bpm, clipped to 0.33-1.8 s (RR CV ~13-25 %); no P waves; fibrillatory waves
  (4.5-8 Hz, 0.03-0.08 mV, slowly wandering frequency), largest in V1 and the inferior leads.
  The mean rates of the two classes overlap, so the class is not one number away: the RR pattern, the P wave
  and the f-waves carry it.
* **Noise** at a modest level: baseline wander (respiration and a slow drift, 0.03-0.12 mV, shared by the
  electrodes), muscle noise and powerline hum (50 or 60 Hz, per patient's site; only when below 1/4 of the
  rate) through ``neurokit2.signal_distort``.

PHI
---
WFDB header comments carry ``patient: <id>``, ``name: <SURNAME^GIVEN>``, ``birth date: YYYY-MM-DD``, ``sex``,
``age``, ``referred by Dr. <Given Surname>``, ``recorded at <institution>``, plus the start date/time in the record
line; EDF headers the patient name, code (the ID), birth date, sex, start date/time and the institution as admin
code. The values written are returned in :attr:`SignalDemoSummary.phi`.

Determinism: all randomness comes from ``numpy.random.default_rng((seed, tag, indices...))``; no clock is read;
the same spec gives byte-identical files (given the same wfdb/pyedflib versions).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

# The image demo's patient planner: the ECGs belong to the same fake patients (same names, IDs, pseudonyms).
from medpipe.demo import DemoSpec, DemoPatient, plan_patients, DemoStudy

__all__ = ["LEAD_NAMES", "RHYTHMS", "SignalDemoSpec", "SignalDemoSummary", "generate_demo_signals"]

LEAD_NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
RHYTHMS = ("normal", "irregular")
WFDB_ADC_GAIN = 1000.0  # adu per mV (PTB-XL's gain): fmt 16 holds +-32.7 mV at 1 uV resolution
EDF_PHYSICAL_RANGE_MV = 10.0  # EDF physical min/max (+-10 mV, 16 bit: 0.3 uV resolution)
MAX_ABS_MV = 9.5  # synthetic signals are clipped here (never reached at the model's amplitudes)

# Wave amplitudes (mV) of the synthesised leads: P, Q, R, S, T.  III/aVR/aVL/aVF are derived from I and II.
_WAVES = ("P", "Q", "R", "S", "T")
_BASE_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
_AMPLITUDES = np.array(
    [
        [0.08, -0.05, 0.60, -0.10, 0.20],  # I
        [0.12, -0.05, 1.00, -0.15, 0.30],  # II
        [0.06, 0.00, 0.25, -0.90, -0.05],  # V1
        [0.07, 0.00, 0.50, -1.20, 0.40],  # V2
        [0.07, -0.02, 0.90, -0.80, 0.45],  # V3
        [0.07, -0.05, 1.30, -0.50, 0.40],  # V4
        [0.07, -0.07, 1.20, -0.25, 0.30],  # V5
        [0.06, -0.06, 0.90, -0.15, 0.25],  # V6
    ]
)
# Relative size of fibrillatory waves per synthesised lead (largest in V1 and the inferior leads).
_F_WAVE_WEIGHTS = np.array([0.2, 0.6, 1.0, 0.7, 0.4, 0.25, 0.15, 0.1])
_WAVE_SD_S = np.array([0.025, 0.010, 0.011, 0.012, 0.050])  # Gaussian width (s) of P Q R S T before per-patient jitter
_MARGIN_S = 1.5  # beats are laid from this long before the start to after the end, so edges look like the middle

_TAG_MORPH, _TAG_RECORD, _TAG_NOISE, _TAG_LABELS = 11, 12, 13, 14


# patients of `medpipe demo-data` / `make demo` ECG records: a test split of ~6 patients (fraction 0.15), so that
# the evaluation's patient-bootstrap intervals mean something
ECG_DEMO_PATIENTS = 40

@dataclass(frozen=True)
class SignalDemoSpec:
    """Size and seed of the demo ECG set (defaults: 12 patients x 4 records of 30 s, 12 leads at 500 Hz)."""

    patients: int = 12
    records_per_patient: int = 4
    seconds: float = 30.0
    rate_hz: int = 500
    leads: int = 12  # the first `leads` of LEAD_NAMES
    seed: int = 0
    irregular_fraction: float = 0.5  # per patient: round(records_per_patient * fraction) records are irregular

    def __post_init__(self) -> None:
        checks = (
            (1 <= self.patients <= 10_000, "patients must be in 1..10000"),
            (1 <= self.records_per_patient <= 100, "records_per_patient must be in 1..100"),
            (2.0 <= self.seconds <= 3600.0, "seconds must be in 2..3600"),
            (100 <= self.rate_hz <= 2000, "rate_hz must be in 100..2000"),
            (1 <= self.leads <= len(LEAD_NAMES), f"leads must be in 1..{len(LEAD_NAMES)}"),
            (self.seed >= 0, "seed must be >= 0"),
            (0.0 <= self.irregular_fraction <= 1.0, "irregular_fraction must be in 0..1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable), e.g. for provenance attributes."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SignalDemoSummary:
    """What :func:`generate_demo_signals` wrote: counts, the manifest, labels per class and the fake PHI used.

    ``phi`` maps a field (name, patient_id, birth_date, physician, institution) to the distinct values written.
    """

    root: str
    manifest: str
    files: int
    bytes: int
    patients: int
    records: int
    labels: dict[str, int]
    phi: dict[str, list[str]]


@dataclass(frozen=True)
class _Morphology:
    """One patient's ECG: wave amplitudes of the synthesised leads and timings."""

    amplitudes: npt.NDArray[np.float64]  # (8, 5) mV
    wave_sd_s: npt.NDArray[np.float64]  # (5,)
    pr_s: float
    qtc_s: float
    rate_bpm: float
    powerline_hz: float


def generate_demo_signals(out_dir: str | Path, spec: SignalDemoSpec) -> SignalDemoSummary:
    """Write the demo ECG records described in the module docstring into ``out_dir`` (created when missing).

    Files of the same name are overwritten, other files are left alone.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    patients = plan_patients(DemoSpec(patients=spec.patients, seed=spec.seed, studies_per_patient=1))
    rows: list[tuple[str, str]] = []
    phi: dict[str, list[str]] = {k: [] for k in ("name", "patient_id", "birth_date", "physician", "institution")}
    written: list[Path] = []
    for pat in patients:
        study = pat.studies[0]
        for key, value in (("name", pat.name), ("patient_id", pat.pid), ("birth_date", pat.birth_date.isoformat()),
                           ("physician", _physician_text(study.physician)), ("institution", study.institution)):
            if value not in phi[key]:
                phi[key].append(value)
        morph = _morphology(spec.seed, pat.index)
        rhythms = _record_rhythms(spec, pat.index)
        folder = root / pat.dir
        folder.mkdir(exist_ok=True)
        for r, rhythm in enumerate(rhythms):
            signals, r_peaks = _synthesize(spec, morph, rhythm, pat.index, r)
            start = _dt.datetime.combine(study.date, _dt.time(int(study.time[:2]), int(study.time[2:4]))) \
                + _dt.timedelta(days=7 * r, minutes=13 * r)
            name = f"ecg{r + 1:02d}"
            age = _age(pat.birth_date, start.date())
            if r % 2 == 0:
                paths = _write_wfdb(folder, name, signals, r_peaks, rhythm, spec, pat, study, start, age)
            else:
                paths = [_write_edf(folder / f"{name}.edf", signals, spec, pat, study, start)]
            written.extend(paths)
            rows.append((paths[0].relative_to(root).as_posix(), rhythm))
    manifest = root / "labels.csv"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(rows)
    manifest.write_text(buf.getvalue(), encoding="utf-8")
    written.append(manifest)
    labels = {name: sum(1 for _, label in rows if label == name) for name in RHYTHMS}
    return SignalDemoSummary(root=str(root), manifest=str(manifest), files=len(written),
                             bytes=sum(p.stat().st_size for p in written), patients=len(patients),
                             records=len(rows), labels=labels, phi=phi)


def _record_rhythms(spec: SignalDemoSpec, patient: int) -> list[str]:
    """The rhythm of each record of a patient: round(n * irregular_fraction) irregular ones, in random order."""
    n = spec.records_per_patient
    n_irregular = int(round(n * spec.irregular_fraction))
    rng = np.random.default_rng([spec.seed, _TAG_LABELS, patient])
    irregular = set(rng.permutation(n)[:n_irregular].tolist())
    return [RHYTHMS[1] if r in irregular else RHYTHMS[0] for r in range(n)]


def _morphology(seed: int, patient: int) -> _Morphology:
    rng = np.random.default_rng([seed, _TAG_MORPH, patient])
    amplitudes = _AMPLITUDES * np.exp(rng.normal(0.0, 0.15, _AMPLITUDES.shape))
    angle = rng.uniform(-0.25, 0.25)  # rotate the frontal axis: mix leads I and II
    limb = amplitudes[:2].copy()
    amplitudes[0] = np.cos(angle) * limb[0] - np.sin(angle) * limb[1] * 0.5
    amplitudes[1] = np.cos(angle) * limb[1] + np.sin(angle) * limb[0] * 0.5
    wave_sd = _WAVE_SD_S * rng.uniform(0.85, 1.2, 5)
    return _Morphology(amplitudes=amplitudes, wave_sd_s=wave_sd, pr_s=float(rng.uniform(0.13, 0.20)),
                       qtc_s=float(rng.uniform(0.38, 0.44)), rate_bpm=float(rng.uniform(58, 88)),
                       powerline_hz=50.0 if rng.random() < 0.5 else 60.0)


def _rr_intervals(rng: np.random.Generator, rhythm: str, morph: _Morphology, span_s: float) -> npt.NDArray[np.float64]:
    """RR intervals (s), enough beats to cover ``span_s``."""
    n = int(span_s / 0.33) + 2
    if rhythm == "irregular":
        rr0 = 60.0 / rng.uniform(62, 105)
        spread = rng.uniform(0.13, 0.25)
        return np.clip(rr0 * np.exp(rng.normal(0.0, spread, n)), 0.33, 1.8)
    rr0 = 60.0 / (morph.rate_bpm * rng.uniform(0.95, 1.08))
    t = np.arange(n) * rr0
    resp = rng.uniform(0.02, 0.05) * np.sin(2 * np.pi * rng.uniform(0.2, 0.33) * t + rng.uniform(0, 2 * np.pi))
    mayer = rng.uniform(0.01, 0.03) * np.sin(2 * np.pi * 0.1 * t + rng.uniform(0, 2 * np.pi))
    rr = rr0 * (1.0 + resp + mayer + rng.normal(0.0, 0.01, n))
    if rng.random() < 0.25:  # one premature atrial beat and its compensatory pause
        k = int(rng.integers(3, max(4, n // 3)))
        rr[k] *= 0.7
        rr[k + 1] *= 1.25
    return rr


def _gaussians(t0: float, fs: float, n: int, centres: npt.NDArray[np.float64], sd: float,
               weights: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Sum over ``centres`` (s) of weight * exp(-(t - c)^2 / 2 sd^2) on the grid t = t0 + i / fs, i < n."""
    out = np.zeros(n)
    half = int(np.ceil(5 * sd * fs))
    for centre, weight in zip(centres.tolist(), weights.tolist()):
        mid = int(round((centre - t0) * fs))
        lo, hi = max(mid - half, 0), min(mid + half + 1, n)
        if lo >= hi:
            continue
        t = t0 + np.arange(lo, hi) / fs
        out[lo:hi] += weight * np.exp(-0.5 * ((t - centre) / sd) ** 2)
    return out


def _synthesize(spec: SignalDemoSpec, morph: _Morphology, rhythm: str, patient: int, record: int
                ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """One record: (leads, T) signals in mV and the sample index of each R peak inside the record."""
    rng = np.random.default_rng([spec.seed, _TAG_RECORD, patient, record])
    fs, n = float(spec.rate_hz), int(round(spec.seconds * spec.rate_hz))
    rr = _rr_intervals(rng, rhythm, morph, spec.seconds + 2 * _MARGIN_S)
    r_times = -_MARGIN_S + rng.uniform(0, rr[0]) + np.concatenate([[0.0], np.cumsum(rr[1:])])
    r_times = r_times[r_times < spec.seconds + _MARGIN_S]
    rr_before = rr[: len(r_times)]
    breath = 1.0 + 0.05 * np.sin(2 * np.pi * 0.25 * r_times + rng.uniform(0, 2 * np.pi))
    gain = breath * np.exp(rng.normal(0.0, 0.03, len(r_times)))
    qt = morph.qtc_s * np.sqrt(rr_before)
    offsets = [-morph.pr_s + 0.04, -0.035, 0.0, 0.035, qt - 0.12]  # P Q R S T peak times relative to R
    basis = np.zeros((5, n))
    for w in range(5):
        if w == 0 and rhythm == "irregular":
            continue  # no P wave in atrial fibrillation
        basis[w] = _gaussians(0.0, fs, n, r_times + offsets[w], float(morph.wave_sd_s[w]), gain)
    base = morph.amplitudes @ basis  # (8, T): I, II, V1..V6
    t = np.arange(n) / fs
    if rhythm == "irregular":
        base += np.outer(_F_WAVE_WEIGHTS, _f_waves(rng, t))
    base += _baseline_wander(rng, t)
    leads = _derive_leads(base)[: spec.leads]
    leads = _add_noise(leads, fs, morph, spec.seed, patient, record)
    inside = (r_times >= 0) & (r_times < spec.seconds)
    r_peaks = np.round(r_times[inside] * fs).astype(np.int64)
    return np.clip(leads, -MAX_ABS_MV, MAX_ABS_MV), r_peaks[r_peaks < n]


def _f_waves(rng: np.random.Generator, t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Fibrillatory waves: 4.5-8 Hz, slowly wandering frequency and amplitude."""
    f0 = rng.uniform(4.5, 8.0)
    drift = np.cumsum(rng.normal(0.0, 1.0, t.size)) / np.sqrt(t.size) * 0.6  # slow frequency wander (Hz)
    phase = 2 * np.pi * np.cumsum(f0 + drift) * (t[1] - t[0]) + rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(0.03, 0.08) * (1.0 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t))
    return amplitude * (np.sin(phase) + 0.3 * np.sin(2 * phase + 1.0))


def _baseline_wander(rng: np.random.Generator, t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Respiration and slow drift shared by the electrodes (with per-lead weights), (8, T) mV."""
    resp = np.sin(2 * np.pi * rng.uniform(0.15, 0.35) * t + rng.uniform(0, 2 * np.pi))
    drift = np.sin(2 * np.pi * rng.uniform(0.03, 0.08) * t + rng.uniform(0, 2 * np.pi))
    size = rng.uniform(0.03, 0.12)
    return size * (np.outer(rng.uniform(-1, 1, 8), resp) + np.outer(rng.uniform(-1, 1, 8), drift))


def _derive_leads(base: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """12 leads in LEAD_NAMES order from I, II, V1..V6 (Einthoven: III = II - I; Goldberger: aVR, aVL, aVF)."""
    lead_i, lead_ii = base[0], base[1]
    limb = np.stack([lead_i, lead_ii, lead_ii - lead_i, -(lead_i + lead_ii) / 2, lead_i - lead_ii / 2,
                     lead_ii - lead_i / 2])
    return np.concatenate([limb, base[2:]])


def _add_noise(leads: npt.NDArray[np.float64], fs: float, morph: _Morphology, seed: int, patient: int,
               record: int) -> npt.NDArray[np.float64]:
    """Muscle noise and powerline hum per lead (neurokit2.signal_distort, amplitudes relative to the lead's sd)."""
    import neurokit2 as nk  # heavy import: only when generating

    rng = np.random.default_rng([seed, _TAG_NOISE, patient, record])
    muscle = float(rng.uniform(0.01, 0.03))
    hum = float(rng.uniform(0.005, 0.02)) if morph.powerline_hz * 4 <= fs else 0.0
    out = np.empty_like(leads)
    for k in range(leads.shape[0]):
        out[k] = nk.signal_distort(leads[k], sampling_rate=fs, noise_shape="gaussian", noise_amplitude=muscle,
                                   noise_frequency=min(40.0, 0.1 * fs), powerline_amplitude=hum,
                                   powerline_frequency=morph.powerline_hz, random_state=rng, silent=True)
    return out


def _physician_text(dicom_name: str) -> str:
    """'HOUSE^GREGORY' -> 'Gregory House'."""
    family, _, given = dicom_name.partition("^")
    return f"{given.title()} {family.title()}".strip()


def _age(birth: _dt.date, day: _dt.date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _write_wfdb(folder: Path, name: str, signals: npt.NDArray[np.float64], r_peaks: npt.NDArray[np.int64],
                rhythm: str, spec: SignalDemoSpec, pat: DemoPatient, study: DemoStudy, start: _dt.datetime,
                age: int) -> list[Path]:
    """WFDB record (fmt 16, mV) with fake PHI in the comments, and an annotation file (.atr) of the beats."""
    import wfdb

    n_leads = signals.shape[0]
    comments = [f"patient: {pat.pid}", f"name: {pat.name}", f"birth date: {pat.birth_date.isoformat()}",
                f"sex: {pat.sex}", f"age: {age}", f"referred by Dr. {_physician_text(study.physician)}",
                f"recorded at {study.institution}"]
    wfdb.wrsamp(name, fs=spec.rate_hz, units=["mV"] * n_leads, sig_name=list(LEAD_NAMES[:n_leads]),
                p_signal=np.ascontiguousarray(signals.T), fmt=["16"] * n_leads, adc_gain=[WFDB_ADC_GAIN] * n_leads,
                baseline=[0] * n_leads, comments=comments, base_datetime=start, write_dir=str(folder))
    # MIT-BIH style: a rhythm annotation ("+" with "(N" / "(AFIB") at the start, then one "N" per beat.
    samples = np.concatenate([[0], r_peaks]).astype(np.int64)
    symbols = ["+"] + ["N"] * len(r_peaks)
    notes = ["(N" if rhythm == "normal" else "(AFIB"] + [""] * len(r_peaks)
    order = np.argsort(samples, kind="stable")
    wfdb.wrann(name, "atr", sample=samples[order], symbol=[symbols[i] for i in order],
               aux_note=[notes[i] for i in order], fs=spec.rate_hz, write_dir=str(folder))
    return [folder / f"{name}.hea", folder / f"{name}.dat", folder / f"{name}.atr"]


def _write_edf(path: Path, signals: npt.NDArray[np.float64], spec: SignalDemoSpec, pat: DemoPatient, study: DemoStudy,
               start: _dt.datetime) -> Path:
    """EDF+ record (mV) with the patient's name, code, birth date and sex and the start in the header."""
    from pyedflib import highlevel

    n_leads = signals.shape[0]
    signal_headers = highlevel.make_signal_headers(
        list(LEAD_NAMES[:n_leads]), dimension="mV", sample_frequency=spec.rate_hz,
        physical_min=-EDF_PHYSICAL_RANGE_MV, physical_max=EDF_PHYSICAL_RANGE_MV)
    header = highlevel.make_header(patientname=pat.name, patientcode=pat.pid, sex=pat.sex,
                                   birthdate=_dt.datetime.combine(pat.birth_date, _dt.time()), startdate=start,
                                   admincode=study.institution.replace(" ", "_"), equipment="medpipe-demo")
    highlevel.write_edf(str(path), np.ascontiguousarray(signals), signal_headers, header)
    return path
