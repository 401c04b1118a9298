"""A real CT series through the ingest: the GE head CT of dcm_qa_ct (tests/data/dcm_qa_ct, BSD-2), with a gantry tilt
of 18.5 deg and two slice spacings in one series (4.22 mm, then 7.38 mm).

Oracles that are not medpipe: pydicom's decode of each file (pixels), the DICOM standard's pixel-position equation
(PS3.3 C.7.6.2.1.1) from each file's own ImagePositionPatient / ImageOrientationPatient / PixelSpacing (geometry),
the source's intensity distribution (training volumes), and the normalised reads of a store that kept the
air's full HU range (the floor below the CT foreground).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import zarr
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.config import IngestConfig, PreprocessConfig
from medpipe.deid import resolve_key
from medpipe.ingest.pipeline import ingest_in_process
from medpipe.ingest import volume_cases
from medpipe.ingest.finalize import verify_store
from medpipe.store import attrs_of, open_store, read_json
from medpipe.volumes import open_case
from tests.dicom_corpus import unpack_ge_ct
from tests.phi_scan import store_text

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
CONFIG = IngestConfig(files_per_shard=28, preprocess=PreprocessConfig(kind="3d", shape=(16, 64, 64)))


@pytest.fixture(scope="module")
def real_ct(deid_key_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-ct")
    source = unpack_ge_ct(root)
    store = root / "ct.zarr"
    summary = ingest_in_process(str(source), str(store), CONFIG, resolve_key())
    files = sorted(source.iterdir())
    headers = [pydicom.dcmread(f) for f in files]
    order = np.argsort([float(h.ImagePositionPatient[2]) for h in headers])  # the table moves along z
    return store, summary, [headers[i] for i in order]


def _units(store: Path) -> list[dict]:
    archive = open_store(str(store))["archive"]
    return sorted((dict(group.attrs)["medpipe"] for _, group in archive.groups()), key=lambda u: u["affine"][2][3])


def _world(header: pydicom.Dataset, row: int, col: int) -> np.ndarray:
    """RAS position (mm) of pixel (row, col) of a slice: PS3.3 C.7.6.2.1.1, then LPS -> RAS."""
    ipp = np.array(header.ImagePositionPatient, float)
    iop = np.array(header.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in header.PixelSpacing)  # row spacing (between rows), column spacing
    return LPS_TO_RAS @ (ipp + iop[:3] * dc * col + iop[3:] * dr * row)


def test_every_file_is_ingested_and_the_series_splits_at_its_spacing_change(real_ct):
    store, summary, headers = real_ct
    counts = summary["counts"]
    assert counts["discovered"] == 28 == counts["ingested"] and counts["quarantined"] == 0
    assert read_json(str(store), "reports/quarantine.json") == []
    units = _units(store)
    assert [u["shape"] for u in units] == [[1, 14, 512, 512], [1, 14, 512, 512]]
    assert all(any("gantry tilt 18.5 deg" in n for n in u["notes"]) for u in units)
    thickness = [float(h.SliceThickness) for h in headers]
    assert thickness == [4.0] * 14 + [7.0] * 14


def test_archive_pixels_are_pydicoms_and_the_affine_is_each_files_own_geometry(real_ct):
    store, _, headers = real_ct
    archive = open_store(str(store))["archive"]
    for part, unit in enumerate(_units(store)):
        pixels = np.asarray(archive[unit["id"]]["0"][...])[0]
        affine = np.array(unit["affine"])
        for k, header in enumerate(headers[14 * part:14 * (part + 1)]):
            np.testing.assert_array_equal(pixels[k], header.pixel_array)
            for row, col in ((0, 0), (0, 511), (511, 0), (511, 511)):  # voxel index order in the affine: x, y, z
                np.testing.assert_allclose(affine @ [col, row, k, 1.0], [*_world(header, row, col), 1.0], atol=1e-3)


def test_training_volumes_keep_the_sources_hounsfield_distribution_above_the_ct_foreground(real_ct):
    store, _, headers = real_ct
    source = np.stack([h.pixel_array * float(h.RescaleSlope) + float(h.RescaleIntercept) for h in headers])
    volumes = zarr.open_group(str(store / "training" / "volumes"), mode="r")
    cases = sorted(volumes.group_keys())
    training = np.concatenate([np.asarray(volumes[case]["image"][...]).ravel() for case in cases])
    assert training.dtype == np.int16 and len(cases) == 2
    # below -500 HU (air, the scanner's -1500 outside its field of view) every value is -500: see the next test
    assert training.min() == -500 and (source < -500).mean() > 0.4
    floored = np.maximum(source, -500)
    assert abs(np.median(training) - np.median(floored)) <= 5  # HU, after resampling to the planned spacing
    assert abs((training == -500).mean() - (floored == -500).mean()) < 0.02  # air
    assert abs((training > 300).mean() - (source > 300).mean()) < 0.01  # bone


def test_flooring_the_air_leaves_every_normalised_training_read_unchanged(real_ct, tmp_path, monkeypatch):
    store, _, _ = real_ct
    monkeypatch.setattr(volume_cases, "floor_below_ct_foreground", lambda hu, in_place=False: hu)  # full HU range
    unfloored = tmp_path / "unfloored.zarr"
    ingest_in_process(str(store.parent / "GE"), str(unfloored), CONFIG, resolve_key())
    for path in (store, unfloored):
        assert attrs_of(open_store(str(path)))["normalization"]["CT"]["p00_5"] > -500
    raw = [np.asarray(open_store(str(unfloored))[f"training/volumes/{i}/image"][...]) for i in (0, 1)]
    assert min(int(r.min()) for r in raw) == -1500  # that store really kept the air's HU
    for i in (0, 1):
        floored, full = (open_case(open_store(str(path)), i).image for path in (store, unfloored))
        np.testing.assert_array_equal(floored[...], full[...])


def test_the_store_says_where_the_air_was_floored(real_ct):
    store, summary, _ = real_ct
    root = open_store(str(store))
    assert summary["ct_raw_floor_hu"] == attrs_of(root)["ct_raw_floor_hu"] == -500
    for i in (0, 1):
        case = root[f"training/volumes/{i}"]
        assert attrs_of(case)["raw_floor"] == -500
        assert int(np.asarray(case["image"][...]).min()) == -500
    shown = CliRunner().invoke(app, ["info", str(store)])
    assert shown.exit_code == 0, shown.output
    assert "CT (HU; below -500 stored as -500)" in " ".join(shown.output.split())  # any terminal width


def test_no_identifier_of_the_source_reaches_the_store(real_ct):
    store, _, headers = real_ct
    text = store_text(store)
    identifiers = {str(headers[0].PatientID), str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID),
                   str(headers[0].FrameOfReferenceUID), *(str(h.SOPInstanceUID) for h in headers)}
    assert identifiers and not [value for value in identifiers if value in text]


def test_the_floor_never_reaches_the_archive_of_a_case_stored_as_decoded(deid_key_module, tmp_path):
    """A RAS NIfTI CT at the planned spacing is stored without reorienting or resampling, i.e. as the very array that
    was decoded, which the archive writer encodes later in the same task: the floor must not change it there."""
    import nibabel as nib

    rng = np.random.default_rng(3)
    hu = rng.normal(-1000, 20, size=(24, 20, 16))  # air, (X, Y, Z) as NIfTI stores it
    hu[6:18, 5:15, 3:13] = rng.normal(40, 30, size=(12, 10, 10))  # a body
    hu = np.round(hu).astype(np.int16)
    source = tmp_path / "src"
    source.mkdir()
    nib.save(nib.Nifti1Image(hu, np.diag([1.0, 1.0, 2.0, 1.0])), str(source / "ct.nii.gz"))
    store = tmp_path / "ras.zarr"
    config = IngestConfig(files_per_shard=1, nifti_modality="CT",
                          preprocess=PreprocessConfig(kind="3d", shape=(8, 16, 16)))
    summary = ingest_in_process(str(source), str(store), config, resolve_key())
    assert summary["counts"]["ingested"] == 1
    root = open_store(str(store))
    (unit,) = [dict(group.attrs)["medpipe"] for _, group in root["archive"].groups()]
    archived = np.asarray(root["archive"][unit["id"]]["0"][...])[0]  # (Z, Y, X)
    np.testing.assert_array_equal(archived, hu.transpose(2, 1, 0))  # every HU, the air's included
    case = np.asarray(root["training/volumes/0/image"][...])[0]
    assert case.shape == archived.shape and case.min() == -500  # stored as decoded, then floored
    np.testing.assert_array_equal(case, np.maximum(archived, -500))
    assert verify_store(str(store)) == []
