"""Scan: header-level probe of every file of a shard, pseudonymised on the worker (no PHI leaves it)."""

from __future__ import annotations

from typing import Any, Sequence

from medpipe.deid import DeidKey, Pseudonymizer
from medpipe.ingest.discover import source_fs
from medpipe.readers import UnreadableFile, probe_file


def scan_shard(source_url: str, items: Sequence[tuple[int, str]], key: DeidKey) -> list[dict[str, Any]]:
    """Probe files `(index, relative path)`; one record per file, with a quarantine reason when unreadable."""
    fs, root = source_fs(source_url)
    pseudonyms = Pseudonymizer(key)
    records = []
    for index, relative in items:
        record: dict[str, Any] = {"index": index}
        try:
            probe = probe_file(f"{root}/{relative}", fs)
        except UnreadableFile as exc:
            record.update(reason=str(exc.reason), detail=exc.detail)
            records.append(record)
            continue
        except Exception as exc:  # noqa: BLE001 - any reader failure quarantines the file, never the run
            record.update(reason="decode_error", detail=f"{type(exc).__name__} while probing")
            records.append(record)
            continue
        record["kind"] = probe.kind
        if probe.kind == "dicom":
            record.update(
                sop=pseudonyms.uid(probe.sop_instance_uid or f"missing:{relative}"),
                series=pseudonyms.uid(probe.series_instance_uid or f"missing:{relative}"),
                study=pseudonyms.uid(probe.study_instance_uid or f"missing:{relative}"),
                patient=pseudonyms.patient(probe.patient_id or ""),
                modality=probe.modality or "OT",
                rows=probe.rows, columns=probe.columns, frames=probe.frames,
                samples_per_pixel=probe.samples_per_pixel, has_position=probe.position is not None,
            )
        records.append(record)
    return records
