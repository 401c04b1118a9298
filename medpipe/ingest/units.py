"""Plan: turn scan records into archive units, and settle duplicates before anything is decoded.

* DICOM files that share a SOPInstanceUID are compared by their decoded pixels (`sop_groups` names the groups, a
  mapped step computes `pixel_digests`): identical pixels are a `duplicate_instance` (the first file by path is
  kept), different pixels are a UID *collision*: every copy is ingested (as its own instance) and reported.
* A series of a volume modality is split into acquisitions the way dcm2niix does
  (`medpipe.readers.acquisitions.split_series`): orientation, size, echo, phase/temporal position, localizers,
  repeats, slice gaps. A volume acquisition becomes one `dicom-series` unit, other acquisitions one `dicom-file`
  unit per file; an enhanced multi-frame file whose frames form several stacks becomes one unit per stack.
* Each unit gets its manifest row (label, mask) and a patient identity (see `patient_of`).

Every listed file ends in a unit, as a unit's mask, or in the quarantine list; `finalize.account` settles the rest.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from posixpath import dirname

from medpipe.deid import Pseudonymizer
from medpipe.ingest.records import (Collision, FileKind, PatientSource, QuarantineRecord, ScanRecord, Unit,
                                    UnitKind)
from medpipe.manifest import Manifest, ManifestRow
from medpipe.readers.acquisitions import Acquisition, split_series

VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}


@dataclass
class UnitPlan:
    """Units to archive, files quarantined before decoding, and UID collisions found."""

    units: list[Unit] = field(default_factory=list)
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    collisions: list[Collision] = field(default_factory=list)


def sop_groups(records: list[ScanRecord]) -> list[tuple[int, ...]]:
    """Listing indices of DICOM files that share a SOPInstanceUID (groups of two or more), sorted."""
    by_sop: dict[str, list[int]] = defaultdict(list)
    for rec in records:
        if rec.dicom is not None and rec.reason is None:
            by_sop[rec.dicom.sop].append(rec.index)
    return sorted(tuple(sorted(v)) for v in by_sop.values() if len(v) > 1)


def patient_folder(path: str, depth: int | None) -> str | None:
    """The folder that names the patient of a non-DICOM file at relative `path`, or None (a flat file).

    `depth` = how many leading folders name the patient (1 for `PATIENT/study/file`, 2 for `png/PATIENT/study/file`).
    None = auto: the grandparent folder of a file three or more levels deep (`…/PATIENT/study/file`), else its
    parent folder (`PATIENT/file`)."""
    parts = path.split("/")[:-1]
    if not parts:
        return None
    if depth is not None:
        return "/".join(parts[:depth]) if len(parts) >= depth else None
    return "/".join(parts[:-1]) if len(parts) >= 2 else parts[0]


def _row_for(manifest: Manifest, paths: list[str]) -> ManifestRow | None:
    for path in paths:
        if path in manifest.rows:
            return manifest.rows[path]
    folder = dirname(paths[0])
    while folder:  # a row may name the series folder or any folder above it
        if folder in manifest.rows:
            return manifest.rows[folder]
        folder = dirname(folder)
    return None


@dataclass(frozen=True)
class _Candidate:
    """A unit before patient/manifest attachment."""

    kind: UnitKind
    records: tuple[ScanRecord, ...]
    acquisition: str = ""
    frames: tuple[int, ...] | None = None
    notes: tuple[str, ...] = ()

    @property
    def volume(self) -> bool:
        return self.kind is UnitKind.dicom_series


def _file_candidates(rec: ScanRecord, acquisition: str, notes: tuple[str, ...]) -> list[_Candidate]:
    """One DICOM file as a unit, or one unit per frame group of an enhanced multi-frame file."""
    groups = rec.dicom.frame_groups if rec.dicom is not None else ()
    if len(groups) <= 1:
        return [_Candidate(UnitKind.dicom_file, (rec,), acquisition, None, notes)]
    return [_Candidate(UnitKind.dicom_file, (rec,), "-".join(p for p in (acquisition, g.name or f"stack{k + 1}") if p),
                       tuple(g.members), notes + tuple(g.notes)) for k, g in enumerate(groups)]


def _series_candidates(recs: list[ScanRecord]) -> list[_Candidate]:
    modality = recs[0].dicom.modality if recs[0].dicom else "OT"
    if len(recs) == 1 or modality not in VOLUME_MODALITIES:
        return [c for r in recs for c in _file_candidates(r, "", ())]
    acquisitions: list[Acquisition] = split_series([r.dicom.slice for r in recs if r.dicom is not None])
    out: list[_Candidate] = []
    for acq in acquisitions:
        members = [recs[i] for i in acq.members]
        if acq.volume:
            out.append(_Candidate(UnitKind.dicom_series, tuple(members), acq.name, None, tuple(acq.notes)))
        else:
            for rec in members:
                out.extend(_file_candidates(rec, acq.name, tuple(acq.notes)))
    return out


def plan_units(records: list[ScanRecord], paths: tuple[str, ...], manifest: Manifest, pseudonyms: Pseudonymizer,
               digests: dict[int, str | None] | None = None, patient_depth: int | None = None,
               nifti_modality: str = "MR") -> UnitPlan:
    """Group scan records into units; attach manifest labels/masks and patients; settle duplicate instances.

    `digests` maps the listing index of every file in a `sop_groups` group to a digest of its decoded pixels
    (None when it could not be decoded)."""
    plan = UnitPlan()
    digests = digests or {}
    mask_paths = manifest.mask_paths
    index_of = {p: i for i, p in enumerate(paths)}

    def quarantine(index: int, reason: str, detail: str) -> None:
        plan.quarantine.append(QuarantineRecord(index, pseudonyms.path(paths[index]), reason, detail))

    by_series: dict[str, list[ScanRecord]] = defaultdict(list)
    singles: list[_Candidate] = []
    failed: set[int] = set()
    seen: dict[str, dict[str | None, int]] = defaultdict(dict)  # sop -> digest -> first index
    collided: dict[str, list[int]] = defaultdict(list)
    for rec in sorted(records, key=lambda r: r.index):
        if rec.reason is not None or rec.kind is None:
            quarantine(rec.index, rec.reason or "decode_error", rec.detail)
            failed.add(rec.index)
        elif paths[rec.index] in mask_paths:
            continue  # attached to its image below
        elif rec.kind is FileKind.dicom and rec.dicom is not None:
            copies = seen[rec.dicom.sop]
            digest = digests.get(rec.index)
            if copies and digest is not None and digest in copies:
                quarantine(rec.index, "duplicate_instance", "same SOPInstanceUID and pixels as an earlier file")
                continue
            if copies:  # same UID, other pixels: a collision; both are ingested
                collided[rec.dicom.sop].append(rec.index)
            else:
                collided[rec.dicom.sop] = [rec.index]
            copies[digest] = rec.index
            by_series[rec.dicom.series].append(rec)
        else:
            kind = UnitKind.nifti if rec.kind is FileKind.nifti else UnitKind.raster
            singles.append(_Candidate(kind, (rec,)))
    for sop, indices in sorted(collided.items()):
        if len(indices) > 1:
            plan.collisions.append(Collision(sop, tuple(pseudonyms.path(paths[i]) for i in indices)))
    collision_notes = {i: ("SOPInstanceUID collision: another file has this UID with other pixels",)
                       for c in collided.values() if len(c) > 1 for i in c}

    candidates: list[_Candidate] = []
    for _, recs in sorted(by_series.items()):
        try:
            candidates.extend(_series_candidates(recs))
        except Exception as exc:  # noqa: BLE001 - one series that cannot be assembled never stops the plan
            for rec in recs:
                quarantine(rec.index, "decode_error", f"series assembly failed ({type(exc).__name__})")
    candidates += singles
    rows = {id(c): _row_for(manifest, [paths[r.index] for r in c.records]) for c in candidates}
    volumes_of_row: dict[int, int] = defaultdict(int)
    for c in candidates:
        row = rows[id(c)]
        if row is not None and c.volume:
            volumes_of_row[row.line] += 1
    for cand in candidates:
        files = [paths[r.index] for r in cand.records]
        row = rows[id(cand)]
        mask = None
        # A mask given for a series folder belongs to its volume(s), not to the scouts split off the same series.
        if row is not None and row.mask and row.mask in index_of and index_of[row.mask] not in failed:
            if cand.volume or volumes_of_row[row.line] == 0 or row.path in files:
                mask = row.mask
        patient, source = patient_of(cand, files, row, pseudonyms, patient_depth)
        first = cand.records[0]
        if first.dicom is not None:
            study, series, modality = first.dicom.study, first.dicom.series, first.dicom.modality
        else:
            study = series = pseudonyms.uid(f"folder:{dirname(files[0])}")
            modality = "OT" if cand.kind is UnitKind.raster else nifti_modality
        frames_tag = "" if cand.frames is None else "#frames:" + ",".join(map(str, cand.frames))
        unit_id = pseudonyms.path("\n".join(files) + frames_tag) + (f"-{cand.acquisition}" if cand.acquisition else "")
        notes = cand.notes + tuple(n for r in cand.records for n in collision_notes.get(r.index, ()))
        plan.units.append(Unit(
            id=unit_id, kind=cand.kind, files=tuple(files), indices=tuple(r.index for r in cand.records),
            hashes=tuple(pseudonyms.path(f) for f in files), patient=patient, patient_source=source,
            study=study, series=series, modality=modality, label=row.label if row else None,
            mask=mask, mask_index=index_of[mask] if mask else None,
            mask_hash=pseudonyms.path(mask) if mask else None, acquisition=cand.acquisition, frames=cand.frames,
            notes=tuple(dict.fromkeys(notes)), manifest_line=row.line if row else None,
        ))
    taken = {u.mask_index for u in plan.units if u.mask_index is not None}
    for rec in records:
        if rec.index not in failed and paths[rec.index] in mask_paths and rec.index not in taken:
            quarantine(rec.index, "mask_without_image", "a manifest mask whose image is missing or quarantined")
    plan.units.sort(key=lambda u: u.id)
    return plan


def patient_of(cand: _Candidate, files: list[str], row: ManifestRow | None, pseudonyms: Pseudonymizer,
               depth: int | None) -> tuple[str, PatientSource]:
    """The patient pseudonym of a unit and where it came from.

    DICOM: PatientID; without one, the manifest's patient_id; without that, the StudyInstanceUID (each such study
    counts as its own patient: two studies of one person may then land in different splits — add patient_id to
    the manifest to join them). Other files: the manifest's patient_id, else the patient folder of the path
    (`patient_folder`), else the file itself."""
    facts = cand.records[0].dicom
    if facts is not None and facts.patient is not None:
        return facts.patient, PatientSource.patient_id
    if row is not None and row.patient_id:
        return pseudonyms.patient(row.patient_id), PatientSource.manifest
    if facts is not None:
        return pseudonyms.patient(f"study:{facts.study}"), PatientSource.study
    folder = patient_folder(files[0], depth)
    if folder is not None:
        return pseudonyms.patient(f"folder:{folder}"), PatientSource.folder
    return pseudonyms.patient(f"file:{files[0]}"), PatientSource.file
