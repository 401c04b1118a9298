"""Compare DICOM files that share a SOPInstanceUID by their decoded pixels (run on workers, rarely needed).

Decoded pixels, not file bytes: a lossless copy in another transfer syntax is the same instance (a duplicate),
while a lossy copy or a UID reused by a bad anonymiser for another image is a collision (see medpipe.ingest.units).
"""

from __future__ import annotations

from typing import Sequence

from medpipe.errors import InfrastructureError
from medpipe.ingest.discover import source_fs
from medpipe.ingest.limits import image_byte_limit
from medpipe.readers.base import is_infrastructure_error
from medpipe.readers import read_dicom_file
from medpipe.store import array_checksum


def pixel_digests(source_url: str, items: Sequence[tuple[int, str]], max_image_bytes: int) -> dict[int, str | None]:
    """Digest of the decoded pixels of each `(index, relative path)`; None when the file cannot be decoded."""
    fs, root = source_fs(source_url)
    limit = image_byte_limit(max_image_bytes)
    out: dict[int, str | None] = {}
    for index, relative in items:
        try:
            out[index] = array_checksum(read_dicom_file(f"{root}/{relative}", fs, max_image_bytes=limit).pixels)
        except Exception as exc:  # noqa: BLE001 - an undecodable copy is settled at archive time (quarantined there)
            if is_infrastructure_error(exc):
                raise InfrastructureError(f"{type(exc).__name__} while reading a source file") from None
            out[index] = None
    return out
