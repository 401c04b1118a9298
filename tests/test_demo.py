"""Tests for the deterministic demo dataset generator (medpipe.demo)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from medpipe import demo
from medpipe.demo import DemoSpec, generate_demo_dataset, write_defective_files

SPEC = DemoSpec(
    patients=3, studies_per_patient=2, xray_per_study=3, png_per_study=2, ct_series_per_study=1,
    image_size=64, ct_size=32, ct_slices=12, seed=7,
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, demo.DemoSummary]:
    root = tmp_path_factory.mktemp("demo") / "out"
    return root, generate_demo_dataset(root, SPEC)


def test_deterministic_bytes(dataset, tmp_path):
    root, summary = dataset
    again = generate_demo_dataset(tmp_path / "again", SPEC)
    assert _hashes(root) == _hashes(tmp_path / "again")
    assert (again.files, again.bytes, again.phi) == (summary.files, summary.bytes, summary.phi)
    other = generate_demo_dataset(tmp_path / "other", DemoSpec(**{**SPEC.to_dict(), "seed": 8}))
    assert other.phi["PatientID"] != summary.phi["PatientID"]


def test_file_counts_and_summary(dataset):
    root, summary = dataset
    n_st = SPEC.patients * SPEC.studies_per_patient
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(list(root.glob("xray/*/*/*.dcm"))) == n_st * SPEC.xray_per_study
    assert len(list(root.glob("png/*/*/*.png"))) == n_st * SPEC.png_per_study
    assert len(list(root.glob("ct/*/*/*/*.dcm"))) == n_st * SPEC.ct_series_per_study * SPEC.ct_slices
    assert len(list(root.glob("masks/*.nii.gz"))) == n_st * SPEC.ct_series_per_study
    assert summary.files == len(files)
    assert summary.bytes == sum(p.stat().st_size for p in files)
    assert summary.patients == SPEC.patients
    assert Path(summary.manifest) == root / "labels.csv"
    assert Path(summary.multiclass_manifest) == root / "labels_multiclass.csv"
    assert DemoSpec(**SPEC.to_dict()) == SPEC


def test_xray_dicoms_decode_losslessly(dataset):
    root, _ = dataset
    syntaxes: dict[str, list[np.ndarray]] = {}
    for path in sorted(root.glob("xray/*/*/*.dcm")):
        ds = pydicom.dcmread(path)
        assert ds.preamble == b"\0" * 128
        assert ds.Modality == "DX" and ds.SOPClassUID == demo.DX_PRESENTATION_SOP
        assert (ds.BitsStored, ds.PhotometricInterpretation) == (12, "MONOCHROME2")
        arr = ds.pixel_array
        assert arr.dtype == np.uint16 and arr.shape == (SPEC.image_size,) * 2 and arr.max() <= 4095
        assert len(np.unique(arr)) > 200  # a real image, not a constant or a few levels
        syntaxes.setdefault(ds.file_meta.TransferSyntaxUID, []).append(arr)
    # lossless: compressed files keep the pixel noise of the uncompressed ones (a lossy codec would smooth it)
    fine = {ts: np.median([np.std(np.diff(a.astype(float), axis=1)) for a in arrs]) for ts, arrs in syntaxes.items()}
    for ts in (RLELossless, JPEG2000Lossless):
        assert fine[ts] == pytest.approx(fine[ExplicitVRLittleEndian], rel=0.5)
    assert set(syntaxes) == {ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless}


def test_fast_writer_matches_pydicom():
    pat = demo.plan_patients(SPEC)[0]
    st = pat.studies[0]
    px = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    common = demo._encode_elements(demo._xray_common(pat, st, 64, 64))
    for ts in (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless):
        own = demo._xray_own(st, "1.2.3.4", "1.2.3.5", 1, "PA", px, ts)
        fast = demo._part10_bytes(demo.DX_PRESENTATION_SOP, "1.2.3.4", ts, common, own)
        ref = demo._dicom_bytes(demo._xray_dataset(pat, st, "1.2.3.4", "1.2.3.5", 1, "PA", px, ts))
        assert fast == ref
    ct = (np.arange(32 * 32, dtype=np.int16).reshape(32, 32) - 100).astype(np.int16)
    common = demo._encode_elements(demo._ct_common(pat, st, "1.2.9", "1.2.8", 101, "AXIAL", 32, 32))
    own = demo._ct_own(st, 101, "1.2.7", 3, (-12.8, -12.8, 5.0), ct)
    ref = demo._ct_dataset(pat, st, "1.2.9", "1.2.7", "1.2.8", 101, "AXIAL", 3, (-12.8, -12.8, 5.0), ct)
    assert demo._part10_bytes(demo.CT_IMAGE_SOP, "1.2.7", ExplicitVRLittleEndian, common, own) == demo._dicom_bytes(ref)


def test_phi_consistent_and_reported(dataset):
    root, summary = dataset
    seen: dict[str, set] = {k: set() for k in summary.phi}
    by_patient: dict[str, set] = {}
    accession_by_study: dict[str, set] = {}
    for path in list(root.glob("xray/*/*/*.dcm")) + list(root.glob("ct/*/*/*/*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        patient_dir = path.relative_to(root).parts[1]
        for key in seen:
            seen[key].add(str(ds[key].value))
        by_patient.setdefault(patient_dir, set()).add((str(ds.PatientName), ds.PatientID, ds.PatientBirthDate))
        accession_by_study.setdefault(ds.StudyInstanceUID, set()).add(ds.AccessionNumber)
        assert patient_dir == f"{str(ds.PatientName).replace('^', '_')}_{ds.PatientID}"
        for key in ("StudyDate", "StudyTime", "SeriesDate", "ContentDate", "StudyDescription",
                    "SeriesDescription", "StudyID", "PatientSex", "SeriesInstanceUID"):
            assert str(ds[key].value)
    assert all(len(v) == 1 for v in by_patient.values()) and len(by_patient) == SPEC.patients
    assert all(len(v) == 1 for v in accession_by_study.values())
    assert len(accession_by_study) == SPEC.patients * SPEC.studies_per_patient
    assert {k: sorted(v) for k, v in seen.items()} == {k: sorted(v) for k, v in summary.phi.items()}
    assert len(set(summary.phi["PatientName"])) == SPEC.patients


def test_ct_geometry_matches_mask(dataset):
    root, _ = dataset
    rows = [r for r in _rows(root / "labels.csv") if r["path"].startswith("ct/")]
    mc = {r["path"]: r["label"] for r in _rows(root / "labels_multiclass.csv")}
    assert len(rows) == SPEC.patients * SPEC.studies_per_patient * SPEC.ct_series_per_study
    assert {r["label"] for r in rows} == {"none", "lesion"}
    for row in rows:
        files = sorted((root / row["path"]).glob("*.dcm"))
        slices = [pydicom.dcmread(f) for f in files]
        z = [float(s.ImagePositionPatient[2]) for s in slices]
        order = np.argsort(z)
        assert list(order) != list(range(len(files)))  # file names not in geometric order
        np.testing.assert_allclose(np.diff(np.sort(z)), demo.CT_SLICE_THICKNESS)
        s0 = slices[order[0]]
        assert s0.Modality == "CT" and s0.SOPClassUID == demo.CT_IMAGE_SOP
        assert float(s0.RescaleIntercept) == -1024 and s0.pixel_array.dtype == np.int16
        assert len({s.SeriesInstanceUID for s in slices}) == 1
        hu = np.stack([slices[k].pixel_array for k in order]).astype(np.float32) - 1024
        img = nib.load(root / row["mask"])
        mask = np.asarray(img.dataobj).transpose(2, 1, 0)
        assert mask.shape == hu.shape == (SPEC.ct_slices, SPEC.ct_size, SPEC.ct_size)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        # the affine maps voxel (i=col, j=row, k=sorted slice) to RAS = (-x, -y, z) of the DICOM position
        ipp = np.array([float(v) for v in slices[order[3]].ImagePositionPatient])
        ras = img.affine @ np.array([2, 1, 3, 1.0])
        np.testing.assert_allclose(ras[:3], [-(ipp[0] + 2 * 0.8), -(ipp[1] + 1 * 0.8), ipp[2]], atol=1e-4)
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        corners = np.concatenate([hu[:, :3, :3].ravel(), hu[:, :3, -3:].ravel(), hu[:, -3:, :3].ravel(),
                                  hu[:, -3:, -3:].ravel()])
        assert abs(corners.mean() + 1000) < 5  # air around the body
        if row["label"] == "lesion":
            assert mask.sum() > 0 and mc[row["path"]] in {"small", "large"}
            cnr = _ct_lesion_cnr(hu, mask)
            assert 1.5 < cnr < 5.0, cnr  # documented: contrast 3-4.5 noise sd, less after partial volume and blur
        else:
            assert mask.sum() == 0 and mc[row["path"]] == "none"


def _ct_lesion_cnr(hu: np.ndarray, mask: np.ndarray) -> float:
    """(mean HU inside the mask - median HU of a soft-tissue shell 2-4 voxels around it) / noise sd of the air."""
    from scipy.ndimage import binary_dilation

    inside = mask.astype(bool)
    ball = np.zeros((1, 3, 3), bool)
    ball[0] = True
    near = binary_dilation(inside, ball, iterations=2)
    shell = binary_dilation(inside, ball, iterations=4) & ~near & (hu > -300)
    air_sd = float(np.concatenate([hu[:, :3, :3].ravel(), hu[:, -3:, -3:].ravel()]).std())
    return float((hu[inside].mean() - np.median(hu[shell])) / air_sd)


def test_manifests(dataset):
    root, summary = dataset
    rows, rows_mc = _rows(summary.manifest), _rows(summary.multiclass_manifest)
    assert list(rows[0]) == ["path", "label", "mask", "patient_id"]
    assert [r["path"] for r in rows] == [r["path"] for r in rows_mc]
    n_st = SPEC.patients * SPEC.studies_per_patient
    assert len(rows) == n_st * (SPEC.xray_per_study + SPEC.png_per_study + SPEC.ct_series_per_study)
    for r, m in zip(rows, rows_mc):
        assert (root / r["path"]).exists() and "\\" not in r["path"]
        assert r["label"] in {"none", "lesion"} and m["label"] in {"none", "small", "large"}
        assert (r["label"] == "none") == (m["label"] == "none")
        if r["path"].startswith("png/"):
            assert r["patient_id"] == r["path"].split("/")[1].rsplit("_", 1)[1]
            assert r["patient_id"] in summary.phi["PatientID"]
        else:
            assert r["patient_id"] == ""
        if r["path"].startswith("ct/"):
            assert (root / r["mask"]).is_file()
        else:
            assert r["mask"] == ""
    two_d = [r for r in rows if not r["path"].startswith("ct/")]
    assert abs(sum(r["label"] == "lesion" for r in two_d) - len(two_d) / 2) <= n_st
    assert {m["label"] for m in rows_mc if not m["path"].startswith("ct/")} == {"none", "small", "large"}


HARD = DemoSpec(patients=8, studies_per_patient=1, xray_per_study=0, png_per_study=16, ct_series_per_study=2,
                image_size=128, ct_size=32, ct_slices=12, seed=3)


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """128 PNGs of 8 patients (pixels float, labels, patient index) and the CT rows, read from the files."""
    root = tmp_path_factory.mktemp("hard") / "out"
    generate_demo_dataset(root, HARD)
    rows = _rows(root / "labels.csv")
    png = [r for r in rows if r["path"].startswith("png/")]
    pixels = np.stack([np.asarray(Image.open(root / r["path"]), dtype=np.float64) for r in png])
    labels = np.array([r["label"] == "lesion" for r in png])
    patients = sorted({r["patient_id"] for r in png})
    patient = np.array([patients.index(r["patient_id"]) for r in png])
    return pixels, labels, patient, [(root, r) for r in rows if r["path"].startswith("ct/")]


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _noise_sd(img: np.ndarray) -> float:
    """Pixel-noise sd from horizontal neighbour differences (robust MAD), independent of the renderer."""
    d = np.diff(img, axis=1).ravel()
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def _blob_score(img: np.ndarray, radius: float) -> float:
    """Best disk-vs-surround contrast in noise sd: a matched filter for round blobs of ``radius`` px."""
    from scipy.ndimage import uniform_filter

    inner = uniform_filter(img, size=int(2 * radius) | 1)
    outer = uniform_filter(img, size=int(5 * radius) | 1)
    return float((inner - outer)[8:-8, 8:-8].max() / _noise_sd(img))


def test_2d_lesions_are_present_but_not_trivial(hard):
    """A blob detector finds lesions better than chance but not perfectly; intensity alone does not separate."""
    pixels, labels, patient, _ = hard
    assert 0.4 < labels.mean() < 0.6
    # the patient's median image estimates its anatomy; what a lesion adds is a round blob in the residual
    residual = _residuals(pixels, patient)
    blob = np.array([_blob_score(r, 8.0) * _noise_sd(r) / _noise_sd(img) for r, img in zip(residual, pixels)])
    assert 0.6 < _auroc(blob, labels) < 0.995
    for stat in (pixels.mean(axis=(1, 2)), pixels.std(axis=(1, 2)), np.percentile(pixels, 99, axis=(1, 2))):
        assert 0.2 < _auroc(stat, labels) < 0.8
    noise = np.array([_noise_sd(img) for img in pixels]) / 255
    assert 0.015 < np.median(noise) < 0.05  # documented XRAY_NOISE range (0.02-0.04 of full scale)


def test_2d_patients_differ(hard):
    """Per-patient gain/offset/anatomy: image means vary far more between patients than within one."""
    pixels, _, patient, _ = hard
    means = pixels.mean(axis=(1, 2))
    per_patient = np.array([means[patient == p].mean() for p in np.unique(patient)])
    within = np.mean([means[patient == p].std() for p in np.unique(patient)])
    assert per_patient.std() > 3 * within
    noise = np.array([_noise_sd(img) for img in pixels])
    per_patient_noise = np.array([np.median(noise[patient == p]) for p in np.unique(patient)])
    assert per_patient_noise.max() > 1.3 * per_patient_noise.min()


def _residuals(pixels: np.ndarray, patient: np.ndarray) -> np.ndarray:
    """Each image minus its patient's median image (an estimate of that patient's anatomy)."""
    anatomy = {p: np.median(pixels[patient == p], axis=0) for p in np.unique(patient)}
    return np.stack([img - anatomy[p] for img, p in zip(pixels, patient)])


def test_2d_hard_negatives_in_none_images(hard):
    """Images without a lesion still hold small bright round structures (vessels end-on) well above the noise:
    without them (pure noise and smooth clutter) fewer than 10 % of images reach this score."""
    pixels, labels, patient, _ = hard
    residual = _residuals(pixels, patient)
    spots = np.array([_blob_score(r, 2.0) * _noise_sd(r) / _noise_sd(img)
                      for r, img in zip(residual[~labels], pixels[~labels])])
    assert np.mean(spots > 2.0) > 0.5, spots


def test_ct_patients_and_hard_negatives(hard):
    """Per-patient HU offsets exist; CT series without a lesion contain vessels brighter than the soft tissue."""
    soft_median: dict[str, list[float]] = {}
    vessel_contrast = []
    for root, row in hard[3]:
        files = list((root / row["path"]).glob("*.dcm"))
        slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
        hu = np.stack([d.pixel_array for d in slices]).astype(np.float64) + float(slices[0].RescaleIntercept)
        soft = (hu > -60) & (hu < 160)
        soft_median.setdefault(row["path"].split("/")[1], []).append(float(np.median(hu[soft])))
        if row["label"] == "none":
            air_sd = float(hu[:, :3, :3].std())
            zmean = hu.mean(axis=0)  # vessels run along z: averaging slices keeps them, halves the noise ~3x
            tissue = soft.mean(axis=0) > 0.9
            vessel_contrast.append((zmean[tissue].max() - np.median(zmean[tissue])) / air_sd)
    medians = [np.mean(v) for v in soft_median.values()]
    assert max(medians) - min(medians) > 10  # HU offsets of +-25 between patients
    assert vessel_contrast and min(vessel_contrast) > 1.0, vessel_contrast


def test_defective_files(tmp_path):
    reasons = write_defective_files(tmp_path)
    again = write_defective_files(tmp_path / "again")
    assert again == reasons
    expected = {
        "not_dicom", "truncated", "no_pixel_data", "non_image_dicom", "unreadable_nifti",
        "duplicate_instance", "unreadable_image", "",
    }
    assert set(reasons.values()) == expected
    for rel in reasons:
        assert (tmp_path / rel).is_file()
        assert (tmp_path / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes()
    by_reason = {v: k for k, v in reasons.items() if v}

    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(tmp_path / by_reason["not_dicom"])
    with pytest.raises(Exception):
        pydicom.dcmread(tmp_path / by_reason["truncated"]).pixel_array
    ds = pydicom.dcmread(tmp_path / by_reason["no_pixel_data"])
    assert "PixelData" not in ds and ds.PatientName
    sr = pydicom.dcmread(tmp_path / by_reason["non_image_dicom"])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11" and "PixelData" not in sr
    with pytest.raises(Exception):
        np.asarray(nib.load(tmp_path / by_reason["unreadable_nifti"]).dataobj)
    with pytest.raises(Exception):
        Image.open(tmp_path / by_reason["unreadable_image"]).load()

    mixed = [k for k in reasons if k.startswith("mixed/")]
    assert len(mixed) > 1 and all(k.startswith("mixed/") for k in mixed)
    mixed_ds = [pydicom.dcmread(tmp_path / k) for k in mixed]
    assert len({d.SeriesInstanceUID for d in mixed_ds}) == 1
    assert len({d.pixel_array.shape for d in mixed_ds}) == 2

    copy = by_reason["duplicate_instance"]
    assert reasons["valid_dx.dcm"] == "" and sorted(["valid_dx.dcm", copy])[0] == "valid_dx.dcm"
    assert (tmp_path / copy).read_bytes() == (tmp_path / "valid_dx.dcm").read_bytes()
    assert pydicom.dcmread(tmp_path / "valid_dx.dcm").pixel_array.shape == (96, 96)
    original, collision = (pydicom.dcmread(tmp_path / n) for n in ("valid_dx.dcm", "valid_dx_collision.dcm"))
    assert original.SOPInstanceUID == collision.SOPInstanceUID and reasons["valid_dx_collision.dcm"] == ""
    assert not np.array_equal(original.pixel_array, collision.pixel_array)

    us = pydicom.dcmread(tmp_path / "us_rgb.dcm")
    assert (us.Modality, us.SamplesPerPixel, us.PhotometricInterpretation) == ("US", 3, "RGB")
    assert us.pixel_array.shape == (96, 128, 3)
    mf = pydicom.dcmread(tmp_path / "multiframe_xa.dcm")
    assert mf.NumberOfFrames == 8 and mf.pixel_array.shape == (8, 64, 64)
    import tifffile

    tif = tifffile.imread(tmp_path / "tiff16.tif")
    assert tif.dtype == np.uint16 and tif.ndim == 2
    accepted = {"valid_dx.dcm", "valid_dx_collision.dcm", "us_rgb.dcm", "multiframe_xa.dcm", "tiff16.tif", *mixed}
    assert {k for k, v in reasons.items() if v == ""} == accepted


def test_spec_validation_and_scaling(tmp_path):
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path, DemoSpec(patients=0))
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path, DemoSpec(image_size=8))
    # counts of zero are fine; unique names/IDs hold for larger cohorts
    summary = generate_demo_dataset(
        tmp_path / "x", DemoSpec(patients=40, studies_per_patient=1, xray_per_study=0, png_per_study=1,
                                 ct_series_per_study=0, image_size=32)
    )
    assert len(summary.phi["PatientName"]) == len(summary.phi["PatientID"]) == 40
    assert all(len(p) == 8 and p.isdigit() for p in summary.phi["PatientID"])
    assert all(a.startswith("ACC") and len(a) == 10 for a in summary.phi["AccessionNumber"])
    assert not list((tmp_path / "x").glob("xray"))
