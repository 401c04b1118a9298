"""The records that pass between the steps of an ingest run, defined once.

    scan_shard -> ScanRecord -> plan -> Unit / QuarantineRecord -> ingest_shard -> ArchiveRecord | ArchiveFailure
    -> layout -> TrainingLayout (medpipe.ingest.training) -> finalize

Every field a later step reads is a named, typed field here; no step reads a dict key that another step might
not have written. Records carry pseudonyms, hashes and technical facts only (no header text, no paths), except
`Unit.files`, the relative source paths an archiving worker must open.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from medpipe.readers.acquisitions import Acquisition, SliceInfo


class UnitKind(StrEnum):
    """How a unit is decoded (see medpipe.readers.read_unit)."""

    dicom_series = "dicom-series"
    dicom_file = "dicom-file"
    nifti = "nifti"
    raster = "raster"


class FileKind(StrEnum):
    """What a file is, from its header (medpipe.readers.probe)."""

    dicom = "dicom"
    nifti = "nifti"
    raster = "raster"


class PatientSource(StrEnum):
    """Where a unit's patient identity came from (reported per store in `medpipe info`)."""

    patient_id = "PatientID"  # DICOM header
    manifest = "manifest"  # the manifest's patient_id column
    study = "StudyInstanceUID"  # DICOM without PatientID: each study counts as its own patient
    folder = "folder"  # non-DICOM without a manifest patient_id: the patient folder of its path
    file = "file"  # nothing better: the file is its own patient


@dataclass(frozen=True)
class QuarantineRecord:
    """One file set aside, with a reason and a technical detail (never a path or header value)."""

    index: int
    source_hash: str
    reason: str
    detail: str = ""

    def to_public(self) -> dict[str, str]:
        """What reports/quarantine.json holds (no listing index)."""
        return {"source_hash": self.source_hash, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class DicomFacts:
    """Pseudonymised identifiers and technical facts of one DICOM file, from its header probe."""

    sop: str
    series: str
    study: str
    patient: str | None  # None when the header has no PatientID
    modality: str
    slice: SliceInfo
    frame_groups: tuple[Acquisition, ...] = ()


@dataclass(frozen=True)
class ScanRecord:
    """The result of probing one listed file: its kind (and DICOM facts), or why it is quarantined."""

    index: int
    kind: FileKind | None = None
    reason: str | None = None
    detail: str = ""
    dicom: DicomFacts | None = None
    depth: int | None = None  # slices/frames from the header (NIfTI, raster; DICOM: dicom.slice.frames)
    channels: int = 1  # samples per voxel from the header
    rows: int | None = None  # Y from the header (NIfTI, raster)
    columns: int | None = None  # X from the header
    affine: tuple[tuple[float, ...], ...] | None = None  # NIfTI: RAS mm of index (x, y, z) from the header


@dataclass(frozen=True)
class Unit:
    """One image to archive: a DICOM acquisition (series part), a DICOM file (or frames of one), a NIfTI or raster."""

    id: str
    kind: UnitKind
    files: tuple[str, ...]  # relative source paths (opened by the archiving worker only)
    indices: tuple[int, ...]  # listing indices of `files`
    hashes: tuple[str, ...]  # keyed hashes of `files`
    patient: str
    patient_source: PatientSource
    study: str
    series: str
    modality: str
    label: str | None = None
    mask: str | None = None
    mask_index: int | None = None
    mask_hash: str | None = None
    acquisition: str = ""  # "" or the name of a series split (echo2, localizer, part2, ...)
    frames: tuple[int, ...] | None = None  # frames of a multi-frame file that form this unit; None = all
    notes: tuple[str, ...] = ()  # technical notes from planning (gaps, tilt, collisions)
    manifest_line: int | None = None


@dataclass(frozen=True)
class ArchiveRecord:
    """What archiving one unit produced (also the unit's archive attributes, see `to_attrs`)."""

    id: str
    kind: UnitKind
    input_tag: str
    patient: str
    patient_source: PatientSource
    study: str
    series: str
    acquisition: str
    modality: str
    label: str | None
    shape: tuple[int, int, int, int]  # [C, Z, Y, X], Z = 1 for 2D
    spacing: tuple[float, float, float]  # [dz, dy, dx] mm, dz = 1 for 2D
    dtype: str
    has_mask: bool
    mask_reason: str | None
    indices: tuple[int, ...]
    mask_index: int | None
    orientation: str | None
    notes: tuple[str, ...]
    dicom: dict[str, Any]
    audit: tuple[int, ...]
    checksum: str
    affine: tuple[tuple[float, ...], ...] | None = None  # 4x4 RAS mm of index (x, y, z); None: no geometry
    intensity_sample: tuple[float, ...] = field(default=(), compare=False)

    @property
    def files(self) -> int:
        """Number of image files in this unit (a mask is counted separately)."""
        return len(self.indices)

    @property
    def is_volume(self) -> bool:
        return self.shape[1] > 1

    def to_attrs(self) -> dict[str, Any]:
        """JSON attributes of the unit's archive group (the intensity sample is recomputed on reruns, not stored)."""
        # shallow: asdict would deep-copy every de-identified header (a third of a small image's archive time)
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "intensity_sample"}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], intensity_sample: tuple[float, ...] = ()) -> ArchiveRecord:
        """Rebuild a record from archive attributes written by `to_attrs`."""
        data = dict(attrs)
        return cls(
            id=data["id"], kind=UnitKind(data["kind"]), input_tag=data["input_tag"], patient=data["patient"],
            patient_source=PatientSource(data["patient_source"]), study=data["study"], series=data["series"],
            acquisition=data["acquisition"], modality=data["modality"], label=data["label"],
            shape=tuple(int(v) for v in data["shape"]),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in data["spacing"]),  # type: ignore[arg-type]
            dtype=data["dtype"], has_mask=bool(data["has_mask"]), mask_reason=data["mask_reason"],
            indices=tuple(data["indices"]), mask_index=data["mask_index"], orientation=data["orientation"],
            notes=tuple(data["notes"]), dicom=dict(data["dicom"]), audit=tuple(data["audit"]),
            checksum=data["checksum"], intensity_sample=intensity_sample,
            affine=None if data.get("affine") is None else tuple(tuple(float(v) for v in r) for r in data["affine"]),
        )


@dataclass(frozen=True)
class ArchiveFailure:
    """A unit that could not be decoded: every file of it is quarantined with this reason."""

    id: str
    reason: str
    detail: str


ArchiveResult = ArchiveRecord | ArchiveFailure


@dataclass(frozen=True)
class Collision:
    """Files that share one SOPInstanceUID but hold different pixels (reported, all ingested)."""

    sop_hash: str
    source_hashes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"sop": self.sop_hash, "source_hashes": list(self.source_hashes)}
