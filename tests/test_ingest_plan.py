"""Planning and accounting as pure functions: duplicates vs UID collisions, series splits, masks, patients,
resume tags, lineage. No Prefect, no Dask: the records are built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from medpipe.config import IngestConfig, StoreConfig
from medpipe.deid import DeidKey, Pseudonymizer
from medpipe.ingest.archive import run_tag, unit_input_tag
from medpipe.ingest.finalize import account
from medpipe.ingest.records import (ArchiveFailure, ArchiveRecord, DicomFacts, FileKind, PatientSource,
                                    QuarantineRecord, ScanRecord, Unit, UnitKind)
from medpipe.ingest.units import patient_folder, plan_units, sop_groups
from medpipe.manifest import parse_manifest
from medpipe.readers.acquisitions import SliceInfo

KEY = DeidKey(b"plan-test-key-4f8a2c9e1b7d3f6a0c5e8b2d9f1a7c4e")
PS = Pseudonymizer(KEY)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _slice(z: float | None = None, orientation=AXIAL, echo: int | None = None, rows: int = 64) -> SliceInfo:
    return SliceInfo(rows=rows, columns=64, samples_per_pixel=1, frames=1,
                     position=None if z is None else (0.0, 0.0, z), orientation=orientation,
                     instance_number=None, echo_number=echo, echo_time=None, temporal_index=None,
                     acquisition_number=None, trigger_time=None, image_type=("ORIGINAL", "PRIMARY"),
                     pixel_spacing=(1.0, 1.0))


def _dicom(index: int, sop: str, series: str = "S1", patient: str | None = "PAT1", modality: str = "CT",
           sl: SliceInfo | None = None, study: str = "ST1") -> ScanRecord:
    facts = DicomFacts(sop=PS.uid(sop), series=PS.uid(series), study=PS.uid(study),
                       patient=PS.patient(patient) if patient else None, modality=modality,
                       slice=sl or _slice(float(index)))
    return ScanRecord(index, kind=FileKind.dicom, dicom=facts)


def _manifest(text: str = "path,label,mask,patient_id\n"):
    return parse_manifest(text, None, PS.path)


def test_same_uid_same_pixels_is_a_duplicate_other_pixels_a_collision():
    paths = ("a/1.dcm", "a/2.dcm", "b/1.dcm", "c/1.dcm")
    records = [_dicom(0, "X", "S1", sl=_slice(None)), _dicom(1, "X", "S2", sl=_slice(None)),
               _dicom(2, "Y", "S3", sl=_slice(None)), _dicom(3, "Y", "S4", sl=_slice(None))]
    assert sop_groups(records) == [(0, 1), (2, 3)]
    digests = {0: "d0", 1: "d0", 2: "d2", 3: "d3"}
    plan = plan_units(records, paths, _manifest(), PS, digests)
    assert [(q.index, q.reason) for q in plan.quarantine] == [(1, "duplicate_instance")]
    assert sorted(i for u in plan.units for i in u.indices) == [0, 2, 3]  # both colliding copies kept
    assert len(plan.collisions) == 1 and len(plan.collisions[0].source_hashes) == 2
    assert all(any("collision" in n for n in u.notes) for u in plan.units if u.indices[0] in (2, 3))


def test_series_is_split_into_acquisitions_and_lone_scouts_become_2d_units():
    paths = tuple(f"s/{i}.dcm" for i in range(9))
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    records = [_dicom(i, f"I{i}", sl=_slice(float(i // 2), echo=1 + i % 2)) for i in range(8)]  # 2 echoes x 4
    records.append(_dicom(8, "I8", sl=_slice(0.0, orientation=sagittal)))  # a scout in the same series
    plan = plan_units(records, paths, _manifest(), PS, {})
    volumes = [u for u in plan.units if u.kind is UnitKind.dicom_series]
    assert len(volumes) == 2 and all(len(u.indices) == 4 for u in volumes)
    assert {u.acquisition for u in volumes} == {"echo1", "echo2"} or len({u.acquisition for u in volumes}) == 2
    scouts = [u for u in plan.units if u.kind is UnitKind.dicom_file]
    assert [u.indices for u in scouts] == [(8,)] and not plan.quarantine
    assert len({u.id for u in plan.units}) == len(plan.units)  # visible, distinct unit names
    assert all(u.id.endswith(u.acquisition) for u in plan.units if u.acquisition)


def test_patient_identity_rules():
    assert patient_folder("PAT/study/img.png", None) == "PAT"
    assert patient_folder("png/PAT/study/img.png", None) == "png/PAT"
    assert patient_folder("png/PAT/study/img.png", 2) == "png/PAT"
    assert patient_folder("PAT/img.png", None) == "PAT"
    assert patient_folder("img.png", None) is None
    paths = ("PAT/s1/a.png", "PAT/s2/b.png", "OTHER/s1/c.png", "flat.png", "d/1.dcm", "d/2.dcm", "e/1.dcm")
    records = [ScanRecord(i, kind=FileKind.raster) for i in range(4)]
    records += [_dicom(4, "A", "S1", patient=None, study="ST-A", sl=_slice(None)),
                _dicom(5, "B", "S2", patient=None, study="ST-B", sl=_slice(None)),
                _dicom(6, "C", "S3", patient="P9", sl=_slice(None))]
    manifest = _manifest("path,label,mask,patient_id\nd/2.dcm,,,P9\n")
    plan = plan_units(records, paths, manifest, PS, {})
    by_index = {u.indices[0]: u for u in plan.units}
    assert by_index[0].patient == by_index[1].patient != by_index[2].patient  # studies of one patient folder join
    assert by_index[0].patient_source is PatientSource.folder and by_index[3].patient_source is PatientSource.file
    assert by_index[4].patient_source is PatientSource.study  # no PatientID: its own study, not a shared "unknown"
    assert by_index[4].patient != by_index[5].patient
    assert by_index[5].patient_source is PatientSource.manifest and by_index[5].patient == by_index[6].patient


def _record(unit: Unit, has_mask: bool = False, mask_reason: str | None = None) -> ArchiveRecord:
    return ArchiveRecord(id=unit.id, kind=unit.kind, input_tag="t", patient=unit.patient,
                         patient_source=unit.patient_source, study=unit.study, series=unit.series,
                         acquisition=unit.acquisition, modality=unit.modality, label=unit.label,
                         shape=(1, 1, 8, 8), spacing=(1.0, 1.0, 1.0), dtype="uint8", has_mask=has_mask,
                         mask_reason=mask_reason, indices=unit.indices, mask_index=unit.mask_index,
                         orientation=None, notes=(), dicom={}, audit=(), checksum="c")


def test_masks_count_once_and_accounting_holds_by_construction():
    paths = ("img1.nii", "img2.nii", "img3.nii", "shared_mask.nii", "bad_mask.nii", "orphan_mask.nii")
    manifest = _manifest("path,label,mask,patient_id\nimg1.nii,,shared_mask.nii,A\nimg2.nii,,shared_mask.nii,B\n"
                         "img3.nii,,bad_mask.nii,C\nmissing.nii,,orphan_mask.nii,D\n")
    records = [ScanRecord(i, kind=FileKind.nifti) for i in range(4)]
    records.append(ScanRecord(4, reason="unreadable_nifti", detail="bad gzip"))  # the mask fails its scan
    records.append(ScanRecord(5, kind=FileKind.nifti))
    plan = plan_units(records, paths, manifest, PS, {})
    unit = {u.indices[0]: u for u in plan.units}
    assert unit[0].mask_index == unit[1].mask_index == 3 and unit[2].mask is None  # failed mask not attached
    results = [_record(unit[0], has_mask=True), _record(unit[1], has_mask=False, mask_reason="mask_shape_mismatch"),
               _record(unit[2])]
    acc = account(len(paths), plan.units, results, plan.quarantine, lambda i: PS.path(paths[i]))
    assert acc.counts == {"discovered": 6, "ingested": 4, "quarantined": 2}
    assert {(q.index, q.reason) for q in acc.quarantine} == {(4, "unreadable_nifti"), (5, "mask_without_image")}
    # the image of a mask fails to decode: the mask is quarantined with it, still once
    failed = [ArchiveFailure(unit[0].id, "decode_error", "x"), ArchiveFailure(unit[1].id, "decode_error", "x"),
              _record(unit[2])]
    acc = account(len(paths), plan.units, failed, plan.quarantine, lambda i: PS.path(paths[i]))
    assert acc.counts == {"discovered": 6, "ingested": 1, "quarantined": 5}
    assert sorted(q.index for q in acc.quarantine) == [0, 1, 3, 4, 5]
    # a file no step took is quarantined as a bug, never a failed run
    acc = account(7, plan.units, results, plan.quarantine, lambda i: f"h{i}")
    assert acc.counts["discovered"] == acc.counts["ingested"] + acc.counts["quarantined"] == 7
    assert QuarantineRecord(6, "h6", "not_ingested", acc.quarantine[-1].detail) in acc.quarantine


def _unit(**changes) -> Unit:
    base = dict(id="u1", kind=UnitKind.dicom_series, files=("a/1.dcm", "a/2.dcm"), indices=(3, 4),
                hashes=("h1", "h2"), patient="P-1", patient_source=PatientSource.patient_id, study="s", series="r",
                modality="CT", label="lesion")
    base.update(changes)
    return Unit(**base)  # type: ignore[arg-type]


def test_resume_tag_follows_content_manifest_and_rules_not_listing_indices():
    sizes, stamps = [0, 0, 0, 10, 20, 0], ["", "", "", "t1", "t2", ""]
    shifted_sizes, shifted_stamps = [0, 0, 0, 0, 10, 20], ["", "", "", "", "t1", "t2"]
    tag = run_tag(StoreConfig(), "key1")
    base = unit_input_tag(_unit(), sizes, stamps, tag)
    assert unit_input_tag(_unit(indices=(4, 5)), shifted_sizes, shifted_stamps, tag) == base  # a file added before
    assert unit_input_tag(_unit(patient="P-2"), sizes, stamps, tag) != base  # corrected manifest / patient
    assert unit_input_tag(_unit(label="none"), sizes, stamps, tag) != base
    assert unit_input_tag(_unit(), [0, 0, 0, 11, 20, 0], stamps, tag) != base  # content changed
    assert unit_input_tag(_unit(), sizes, stamps, run_tag(StoreConfig(), "key2")) != base


def test_rule_versions_and_runtime_settings(monkeypatch):
    import medpipe.ingest.archive as archive

    before = run_tag(StoreConfig(), "k")
    monkeypatch.setattr(archive, "DEID_RULES_VERSION", archive.DEID_RULES_VERSION + 1)
    assert run_tag(StoreConfig(), "k") != before  # a de-identification fix re-archives everything
    a = IngestConfig(workers=2, files_per_shard=256).lineage_dict()
    b = IngestConfig(workers=4, files_per_shard=7, scheduler="tcp://x:8786").lineage_dict()
    assert a == b and "workers" not in a and "preprocess" in a
    assert IngestConfig(order_seed=1).lineage_dict() != a


@pytest.mark.parametrize("n", [0, 1])
def test_account_of_empty_inputs(n):
    acc = account(n, [], [], [], lambda i: f"h{i}")
    assert acc.counts["discovered"] == n == acc.counts["quarantined"]
    assert np.all([q.reason == "not_ingested" for q in acc.quarantine])


def test_mask_check_measures_foreground_and_flags_losses():
    from medpipe.ingest.training import foreground_amounts, mask_check

    mask = np.zeros((1, 4, 10, 10), dtype=np.uint8)
    mask[0, 1:3, 2:6, 2:6] = 1  # 32 voxels of label 1
    mask[0, 0, 0, 0] = 2  # 1 voxel of label 2
    amounts = foreground_amounts(mask, (2.0, 0.5, 0.5))  # 0.5 mm³ per voxel
    assert amounts == {"1": 0.016, "2": 0.0005}
    assert foreground_amounts(mask[:, 1], (0.5, 0.5)) == {"1": 4.0}  # 2D: mm²
    kept = mask_check("u", {"1": 10.0}, {"1": 9.7}, "ml")
    assert not kept["flagged"] and kept["lost_fraction"] == {"1": 0.03}
    cropped = mask_check("u", {"1": 10.0, "2": 1.0}, {"1": 10.0}, "ml")  # label 2 cut away by a crop
    assert cropped["flagged"] and cropped["lost_fraction"]["2"] == 1.0


def test_grids_match_within_half_a_voxel():
    from medpipe.ingest.archive import grids_match

    image = np.diag([0.8, 0.8, 2.5, 1.0])
    image[:3, 3] = (-25.0, -25.0, -40.0)
    assert grids_match(image, image.copy(), (32, 64, 64))
    jitter = image.copy()
    jitter[:3, 3] += 0.1  # rounding in a writer: still the same grid
    assert grids_match(image, jitter, (32, 64, 64))
    shifted = image.copy()
    shifted[2, 3] += 2.5  # one slice off
    assert not grids_match(image, shifted, (32, 64, 64))
    flipped = image.copy()
    flipped[1, 1] = -0.8  # rows in the other direction
    assert not grids_match(image, flipped, (32, 64, 64))
