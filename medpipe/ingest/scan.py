"""Scan: header-level probe of every file of a shard, pseudonymised on the worker (no PHI leaves it)."""

from __future__ import annotations

from typing import Sequence

from medpipe.deid import DeidKey, Pseudonymizer, defined_term
from medpipe.errors import InfrastructureError
from medpipe.ingest.discover import source_fs
from medpipe.ingest.limits import image_byte_limit
from medpipe.ingest.records import DicomFacts, FileKind, ScanRecord
from medpipe.readers import FileProbe, UnreadableFile, probe_file
from medpipe.readers.acquisitions import SliceInfo
from medpipe.readers.base import is_infrastructure_error


def scan_shard(source_url: str, items: Sequence[tuple[int, str]], key: DeidKey,
               max_image_bytes: int) -> list[ScanRecord]:
    """Probe files `(index, relative path)`; one record per file, with a quarantine reason when unreadable
    (`too_large` when its header promises more than `max_image_bytes` of pixels)."""
    fs, root = source_fs(source_url)
    pseudonyms = Pseudonymizer(key)
    limit = image_byte_limit(max_image_bytes)
    records = []
    for index, relative in items:
        try:
            probe = probe_file(f"{root}/{relative}", fs, max_image_bytes=limit)
        except UnreadableFile as exc:
            records.append(ScanRecord(index, reason=str(exc.reason), detail=exc.detail))
            continue
        except Exception as exc:  # noqa: BLE001 - any reader failure quarantines the file, never the run
            if is_infrastructure_error(exc):  # storage trouble is retried, never a bad file
                raise InfrastructureError(f"{type(exc).__name__} while probing a source file") from None
            records.append(ScanRecord(index, reason="decode_error", detail=f"{type(exc).__name__} while probing"))
            continue
        facts = dicom_facts(probe, relative, pseudonyms) if probe.kind == "dicom" else None
        records.append(ScanRecord(index, kind=FileKind(probe.kind), dicom=facts, depth=probe.frames,
                                  channels=probe.samples_per_pixel, rows=probe.rows, columns=probe.columns,
                                  affine=probe.affine))
    return records


def dicom_facts(probe: FileProbe, relative: str, pseudonyms: Pseudonymizer) -> DicomFacts:
    """Pseudonymise a DICOM probe. A missing UID makes the file its own instance/series/study (keyed on its path)."""
    return DicomFacts(
        sop=pseudonyms.uid(probe.sop_instance_uid or f"missing:{relative}"),
        series=pseudonyms.uid(probe.series_instance_uid or f"missing:{relative}"),
        study=pseudonyms.uid(probe.study_instance_uid or f"missing:{relative}"),
        patient=pseudonyms.patient(probe.patient_id) if probe.patient_id else None,
        modality=defined_term("Modality", probe.modality) or "OT",  # free text never becomes a modality
        slice=SliceInfo.from_probe(probe),
        frame_groups=tuple(probe.frame_groups),
    )
