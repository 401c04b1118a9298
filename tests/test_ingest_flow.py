"""End-to-end ingestion through the Prefect flow on a Dask LocalCluster: local store, 3D store, s3://, rerun
no-op, kill-and-rerun, every bad-input kind, and a PHI scan of store, logs and artifacts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from medpipe.config import IngestConfig, PreprocessConfig
from medpipe.store import read_json, read_sample_table, store_attrs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CLASSES = ["none", "lesion"]


def _run(source, store, **cfg):
    from flows.ingest import run_ingest

    config = IngestConfig(classes=CLASSES, files_per_shard=64, **cfg)
    return run_ingest(str(source), str(store), config)


def _phi_strings(summary) -> list[str]:
    values = [v for vs in summary.phi.values() for v in vs]
    names = [v.replace("^", "_") for v in summary.phi.get("PatientName", [])]
    return [v for v in values + names if len(v) >= 5]


@pytest.fixture(scope="module")
def local_store(prefect_api, demo_source, tmp_path_factory, deid_key_module):
    source, summary, expected = demo_source
    store = tmp_path_factory.mktemp("stores") / "local.zarr"
    result = _run(source, store)
    return source, store, result


def test_accounting_and_every_bad_input_kind(local_store, demo_source):
    _, store, result = local_store
    _, summary, expected = demo_source
    counts = result["counts"]
    assert counts["discovered"] == counts["ingested"] + counts["quarantined"]
    assert counts["discovered"] == summary.files - 2 + len(expected)  # the two manifests are not images
    want = {}
    for reason in expected.values():
        if reason:
            want[reason] = want.get(reason, 0) + 1
    assert result["quarantine_reasons"] == want
    quarantine = read_json(str(store), "reports/quarantine.json")
    assert len(quarantine) == counts["quarantined"]
    assert result["assembly"]["uid_collisions"] == 1  # valid_dx_collision.dcm: same UID, other pixels
    assert len(read_json(str(store), "reports/collisions.json")[0]["source_hashes"]) == 2
    assert result["assembly"]["series_split"] == 1  # only the mixed-size CT series is split (into two volumes)
    assert result["assembly"]["acquisitions"] == {"size": 2}
    assert all(set(q) == {"source_hash", "reason", "detail"} for q in quarantine)


def test_store_layout_readable_with_zarr_and_ome_zarr(local_store):
    _, store, result = local_store
    root = zarr.open_group(str(store), mode="r")
    images, labels = root["training/images"], root["training/labels"]
    n = result["samples"]
    assert images.shape == (n, 1, 64, 64) and labels.shape == (n,)
    assert images.chunks[0] > 1 and images.shards is not None  # blocks of samples, sharded
    x = images[:]
    assert np.isfinite(x).all() and 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.01
    table = read_sample_table(str(store))
    assert set(table) >= {"patient", "study", "series", "split", "label", "spacing", "shape", "source_hash"}
    assert (table["label"] == labels[:]).all() and set(np.unique(labels[:])) <= {-1, 0, 1}
    # no patient in two splits
    by_patient = {}
    for p, s in zip(table["patient"], table["split"]):
        by_patient.setdefault(str(p), set()).add(int(s))
    assert all(len(s) == 1 for s in by_patient.values())
    # seeded random order: the first chunk mixes patients
    first_chunk = table["patient"][: images.chunks[0]]
    assert len(set(map(str, first_chunk))) > 1
    attrs = store_attrs(str(store))
    assert attrs["complete"] and attrs["schema_version"] == 1 and len(attrs["content_hash"]) == 64
    assert attrs["config"]["preprocess"]["kind"] == "2d" and "modalities" in attrs["fingerprint"]
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    unit = str(table["unit"][0])
    nodes = list(Reader(parse_url(str(store / "archive" / unit)))())
    assert nodes and any(isinstance(spec, Multiscales) for spec in nodes[0].specs)
    assert nodes[0].metadata["axes"][-1]["name"] == "x"


def test_rerun_is_noop(local_store):
    source, store, result = local_store
    again = _run(source, store)
    assert again.get("noop") is True and again["content_hash"] == result["content_hash"]


def test_3d_store_with_masks(prefect_api, local_store, demo_source, tmp_path, deid_key):
    from medpipe.volumes import open_case

    source, _, _ = demo_source
    result = _run(source, tmp_path / "ct.zarr", preprocess=PreprocessConfig(kind="3d", shape=(32, 64, 64)))
    root = zarr.open_group(str(tmp_path / "ct.zarr"), mode="r")
    assert result["layout"] == "volumes" and "images" not in root["training"]
    plan = result["plan"]
    assert result["training_spacing"] == plan["target_spacing"] and result["sample_shape"] == [1, *plan["patch_size"]]
    table = read_sample_table(str(tmp_path / "ct.zarr"))
    n = result["samples"]
    assert n >= 6 and result["counts"]["training_samples"] == n
    brighter = 0
    for i in range(n):
        case = open_case(root, i)
        assert case.unit == table["unit"][i] and list(case.geometry.shape) == list(table["volume_shape"][i])
        assert case.image.shape == (1, *case.geometry.shape) and case.mask.shape == (1, *case.geometry.shape)
        assert case.image.metadata.dimension_names == ("c", "z", "y", "x")
        assert max(case.image.chunks[1:]) <= 64
        image, mask = case.image[...], case.mask[...].astype(bool)
        brighter += bool(mask.any() and image[mask].mean() > image.mean())  # lesions are brighter
    assert brighter >= n // 2
    # The store mixes CT (2.5 x 0.8 x 0.8 mm) with an XA cine: whole cases are stored, so no mask loses foreground
    # to a crop whatever the target spacing (a fixed-shape crop lost lesions here before the volumes layout).
    checks = read_json(str(tmp_path / "ct.zarr"), "reports/mask_check.json")
    lesions = [c for c in checks if c["source"]]
    assert len(checks) == result["masks_checked"] and lesions
    assert result["masks_flagged"] == 0 and not any(c["flagged"] for c in checks)
    for c in lesions:
        assert abs(c["stored"]["1"] - c["source"]["1"]) <= 0.05 * c["source"]["1"]
    archive = root["archive"][table["unit"][0]]
    assert archive["0"].metadata.dimension_names == ("c", "z", "y", "x")
    # the 2D and the 3D store of the same patients, made with the same key, put each patient in the same split
    split_2d = _patient_splits(read_sample_table(str(local_store[1])))
    split_3d = _patient_splits(table)
    assert set(split_3d) <= set(split_2d) and all(split_2d[p] == s for p, s in split_3d.items())


def test_3d_fixed_layout_stays_an_option(prefect_api, demo_source, tmp_path, deid_key):
    source, _, _ = demo_source
    result = _run(source, tmp_path / "fixed.zarr",
                  preprocess=PreprocessConfig(kind="3d", shape=(16, 32, 32), layout="fixed"))
    root = zarr.open_group(str(tmp_path / "fixed.zarr"), mode="r")
    assert result["layout"] == "fixed" and root["training/images"].shape[1:] == (1, 16, 32, 32)
    assert root["training/images"].metadata.dimension_names == ("n", "c", "z", "y", "x")
    assert result["masks_flagged"] == sum(c["flagged"] for c in read_json(str(tmp_path / "fixed.zarr"),
                                                                          "reports/mask_check.json"))


def _patient_splits(table) -> dict[str, int]:
    return {str(p): int(s) for p, s in zip(table["patient"], table["split"])}


def test_removing_a_patient_moves_nobody_else(local_store, tmp_path, deid_key):
    import shutil

    source, store, _ = local_store
    before = _patient_splits(read_sample_table(str(store)))
    copy = tmp_path / "fewer"
    shutil.copytree(source, copy)
    gone = sorted(p for p in (copy / "xray").iterdir())[0].name  # one patient's folder name
    for path in sorted(set(copy.rglob(f"{gone}*"))):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    _run(copy, tmp_path / "fewer.zarr")
    after = _patient_splits(read_sample_table(str(tmp_path / "fewer.zarr")))
    assert len(after) == len(before) - 1
    assert all(before[p] == s for p, s in after.items())


def test_kill_and_rerun_gives_same_store(local_store, tmp_path, deid_key):
    source, _, result = local_store
    store = tmp_path / "killed.zarr"
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "MEDPIPE_DEID_KEY": deid_key, "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, "-m", "medpipe.cli", "ingest", str(source), str(store), "--classes", "none,lesion",
           "--files-per-shard", "8", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (store / "archive").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store_attrs(str(store)).get("complete"), "the run should have been killed midway"
    rerun = _run(source, store)
    assert rerun["content_hash"] == result["content_hash"]


def test_no_phi_in_store_logs_or_artifacts(local_store, demo_source):
    from tests.phi_scan import prefect_text, store_text

    _, store, _ = local_store
    _, summary, _ = demo_source
    phi = _phi_strings(summary)
    assert phi, "the demo must write PHI for this test to mean anything"
    text = store_text(store)
    assert "P-" in text and "lesion" in text  # the scan sees decoded pseudonyms and labels
    for value in phi:
        assert value not in text, "PHI found in the store"
    prefect = prefect_text()
    assert "discovered" in prefect and "scan-shard" in prefect
    for value in phi:
        assert value not in prefect, "PHI found in Prefect logs, artifacts or runs"


def test_mask_defects_are_counted_once_and_never_fail_the_run(prefect_api, tmp_path, deid_key):
    import nibabel as nib

    source = tmp_path / "masks_src"
    source.mkdir()
    rng = np.random.default_rng(0)

    def nifti(name: str, shape=(16, 16, 8), mask: bool = False, affine=None) -> None:
        data = (rng.random(shape) > 0.7).astype(np.uint8) if mask else rng.normal(100, 20, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(source / name))

    for name in ("ok", "shape", "nomask", "a", "b", "c", "shifted"):
        nifti(f"img_{name}.nii.gz")
    shifted = np.eye(4)
    shifted[:3, 3] = (0.0, 0.0, 5.0)  # same shape, 5 mm off along z: a misaligned mask
    nifti("mask_shifted.nii.gz", mask=True, affine=shifted)
    nifti("mask_ok.nii.gz", mask=True)
    nifti("mask_small.nii.gz", shape=(8, 8, 8), mask=True)
    nifti("mask_shared.nii.gz", mask=True)
    nifti("orphan_mask.nii.gz", mask=True)
    nifti("mask_corrupt.nii.gz", mask=True)
    corrupt = (source / "mask_corrupt.nii.gz").read_bytes()
    (source / "mask_corrupt.nii.gz").write_bytes(corrupt[: len(corrupt) // 2])
    (source / "labels.csv").write_text(
        "path,label,mask,patient_id\n"
        "img_ok.nii.gz,lesion,mask_ok.nii.gz,A\n"
        "img_shape.nii.gz,lesion,mask_small.nii.gz,B\n"
        "img_nomask.nii.gz,none,missing_mask.nii.gz,C\n"
        "gone.nii.gz,none,orphan_mask.nii.gz,D\n"
        "img_a.nii.gz,lesion,mask_shared.nii.gz,E\n"
        "img_b.nii.gz,lesion,mask_shared.nii.gz,F\n"
        "img_c.nii.gz,lesion,mask_corrupt.nii.gz,G\n"
        "img_shifted.nii.gz,lesion,mask_shifted.nii.gz,H\n")
    result = _run(source, tmp_path / "masks.zarr", preprocess=PreprocessConfig(kind="3d", shape=(8, 16, 16)))
    assert result["counts"]["discovered"] == 13
    assert result["counts"]["ingested"] == 9 and result["counts"]["quarantined"] == 4
    assert result["quarantine_reasons"] == {"mask_grid_mismatch": 1, "mask_shape_mismatch": 1,
                                            "mask_without_image": 1, "unreadable_nifti": 1}
    issues = read_json(str(tmp_path / "masks.zarr"), "reports/manifest_issues.json")
    assert {i["problem"] for i in issues} == {"file or folder not found", "mask file not found"}
    table = read_sample_table(str(tmp_path / "masks.zarr"))
    assert int(table["has_mask"].sum()) == 3  # ok, a, b
    checks = read_json(str(tmp_path / "masks.zarr"), "reports/mask_check.json")
    assert len(checks) == 3 and all(c["source"] == c["stored"] and not c["flagged"] for c in checks)


def test_a_second_writer_is_refused_in_one_line(local_store, tmp_path, deid_key):
    import datetime as dt
    import json as _json

    from medpipe.ingest.lock import LOCK_NAME, StoreLockedError

    source, store, _ = local_store
    target = tmp_path / "locked.zarr"
    target.mkdir()
    expires = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=9)).isoformat(timespec="seconds")
    other = {"run_id": "0" * 32, "host": "another-host", "pid": 1, "acquired": "2026-11-29T08:00:00+00:00",
             "expires": expires}
    (target / LOCK_NAME).write_text(_json.dumps(other))
    with pytest.raises(StoreLockedError) as refused:
        _run(source, target)
    message = str(refused.value)
    assert "\n" not in message and expires in message and "another ingest" in message
    assert not (target / "zarr.json").exists()  # refused before touching the store
    other["expires"] = "2026-11-29T08:10:00+00:00"  # an expired lease is taken over
    (target / LOCK_NAME).write_text(_json.dumps(other))
    assert _run(source, target)["complete"] and not (target / LOCK_NAME).exists()


def test_up_to_date_means_verified(local_store, tmp_path, deid_key):
    import shutil

    source, store, result = local_store
    copy = tmp_path / "tampered.zarr"
    shutil.copytree(store, copy)
    images = zarr.open_group(str(copy), mode="r+")["training/images"]
    first = images[0]
    images[0] = first + 1.0  # silently changed data in a store marked complete
    again = _run(source, copy)
    assert not again.get("noop") and again["content_hash"] == result["content_hash"]
    assert _run(source, copy).get("noop") is True


def test_masks_in_another_axis_order_are_reoriented_onto_the_image(prefect_api, tmp_path, deid_key):
    """A NIfTI mask of the same voxels stored with flipped/permuted axes (as a NIfTI export of a DICOM series
    is) lands on the image grid; DICOM (LPS) and NIfTI (RAS) geometry are compared in one world frame."""
    import nibabel as nib
    from pydicom.uid import generate_uid

    from dicom_factory import ct_slice, save
    from medpipe.store import read_archive_image
    from medpipe.volumes import LPS_TO_RAS
    from medpipe.deid import DeidKey, Pseudonymizer

    source = tmp_path / "src"
    (source / "ct").mkdir(parents=True)
    rng = np.random.default_rng(3)
    hu = rng.normal(40, 10, size=(12, 32, 24)).astype(np.float32)  # (Z, Y, X) as the reader stacks it
    truth = np.zeros((12, 32, 24), np.uint8)
    truth[2:10, 6:26, 4:20] = 1
    uid = generate_uid()
    for k in range(12):
        save(ct_slice(hu[k], 2.5 * k, series_uid=uid, instance=k + 1, PatientID="PAT-A"), source / "ct" / f"{k}.dcm")
    # the DICOM stack's LPS affine (columns 0.6 mm along x, rows 0.7 mm along y, slices 2.5 mm along z)
    lps = np.diag([0.6, 0.7, 2.5, 1.0])
    lps[:3, 3] = (-50.0, -60.0, 0.0)
    # exported as dcm2niix does: rows flipped, affine in RAS
    flip_rows = np.diag([1.0, -1.0, 1.0, 1.0])
    flip_rows[1, 3] = 32 - 1
    nib.save(nib.Nifti1Image(truth[:, ::-1, :].transpose(2, 1, 0).copy(), LPS_TO_RAS @ lps @ flip_rows),
             str(source / "ct_mask.nii.gz"))
    # a NIfTI image with its mask saved in another axis order (x and y swapped) of the same voxels
    vol = rng.normal(100, 20, size=(24, 20, 16)).astype(np.float32)  # nibabel order (x, y, z)
    vmask = np.zeros_like(vol, dtype=np.uint8)
    vmask[4:20, 4:16, 2:12] = 1
    affine = np.diag([0.9, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), str(source / "mr.nii.gz"))
    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    nib.save(nib.Nifti1Image(vmask.transpose(1, 0, 2).copy(), affine @ swap), str(source / "mr_mask.nii.gz"))
    (source / "labels.csv").write_text("path,label,mask,patient_id\nct,lesion,ct_mask.nii.gz,A\n"
                                       "mr.nii.gz,lesion,mr_mask.nii.gz,B\n")
    store = tmp_path / "oriented.zarr"
    result = _run(source, store, preprocess=PreprocessConfig(kind="3d", shape=(8, 16, 16)))
    assert result["quarantine_reasons"] == {} and result["masks_checked"] == 2
    root = zarr.open_group(str(store), mode="r")
    pseudonyms = Pseudonymizer(DeidKey(deid_key.encode()))
    table = read_sample_table(str(store))
    units = {str(u) for u in table["unit"]}
    ct_unit = next(u for u in units if read_archive_image(root, u)[2]["modality"] == "CT")
    mr_unit = pseudonyms.path("mr.nii.gz")
    _, ct_mask, _ = read_archive_image(root, ct_unit)
    np.testing.assert_array_equal(ct_mask[0], truth)
    _, mr_mask, _ = read_archive_image(root, mr_unit)
    np.testing.assert_array_equal(mr_mask[0], vmask.transpose(2, 1, 0))
