"""Archive: decode, de-identify and write each unit of a shard as an OME-Zarr image at native resolution.

Each unit has its own group, so shards never share a chunk. A unit whose group already carries attributes written
for the same inputs is skipped: that is what makes a rerun (or a rerun after a kill) cheap and exact.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

from medpipe.config import StoreConfig
from medpipe.deid import DeidAudit, DeidKey, Pseudonymizer, deidentify_header
from medpipe.fingerprint import intensity_sample
from medpipe.ingest.discover import source_fs
from medpipe.readers import UnreadableFile, read_nifti, read_unit
from medpipe.store import ATTRS_KEY, array_checksum, open_store, write_archive_image


def unit_input_tag(unit: dict[str, Any], sizes: Sequence[int], stamps: Sequence[str], run_tag: str) -> str:
    """Digest of what a unit's archive depends on: its files' sizes/stamps and the run's config/key/code tag."""
    files = [(i, sizes[i], stamps[i]) for i in unit["indices"]]
    if unit["mask_index"] is not None:
        files.append((unit["mask_index"], sizes[unit["mask_index"]], stamps[unit["mask_index"]]))
    payload = json.dumps([unit["id"], files, unit["label"], run_tag], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _spatial(pixels: np.ndarray, spacing: tuple[float, ...]) -> tuple[list[int], list[float]]:
    """Shape as [C, Z, Y, X] and spacing as [dz, dy, dx] (Z = 1, dz = 1.0 for 2D)."""
    if pixels.ndim == 3:
        return [pixels.shape[0], 1, pixels.shape[1], pixels.shape[2]], [1.0, *map(float, spacing)]
    return list(map(int, pixels.shape)), list(map(float, spacing))


def archive_unit(unit: dict[str, Any], source_url: str, root, key: DeidKey, config: StoreConfig,
                 input_tag: str) -> dict[str, Any]:
    """Decode + de-identify + write one unit; returns its record (or a quarantine record on failure)."""
    existing = root.get(f"archive/{unit['id']}") if "archive" in root else None
    if existing is not None:
        attrs = dict(existing.attrs.get(ATTRS_KEY, {}))
        if attrs.get("input_tag") == input_tag:
            attrs["intensity_sample"] = intensity_sample(existing["0"][...], attrs["modality"], _seed(unit))
            return attrs
    fs, base = source_fs(source_url)
    pseudonyms = Pseudonymizer(key)
    try:
        image = read_unit(unit["kind"], [f"{base}/{p}" for p in unit["files"]], fs)
    except UnreadableFile as exc:
        return {"id": unit["id"], "reason": str(exc.reason), "detail": exc.detail, "indices": unit["indices"]}
    except Exception as exc:  # noqa: BLE001 - a decoder crash quarantines the unit, never the run
        return {"id": unit["id"], "reason": "decode_error", "detail": f"{type(exc).__name__} while decoding",
                "indices": unit["indices"]}
    pixels = compact_integers(image.pixels)
    audit = DeidAudit()
    header = deidentify_header(image.header, pseudonyms, audit) if image.header is not None else {}
    mask, mask_reason = _load_mask(unit, base, fs, pixels.shape)
    shape, spacing = _spatial(pixels, image.spacing)
    modality = image.modality if unit["kind"].startswith("dicom") else unit["modality"]
    record = {
        "id": unit["id"], "kind": unit["kind"], "input_tag": input_tag,
        "patient": unit["patient"], "study": unit["study"], "series": unit["series"],
        "modality": modality, "label": unit["label"], "shape": shape, "spacing": spacing,
        "dtype": str(pixels.dtype), "has_mask": mask is not None, "mask_reason": mask_reason,
        "files": len(unit["indices"]), "orientation": image.orientation,
        "dicom": header, "audit": audit.to_compact(),
        "checksum": array_checksum(pixels, *([mask] if mask is not None else [])),
    }
    write_archive_image(root, unit["id"], pixels, image.spacing, config, mask=mask, attrs=record)
    # the intensity sample feeds the fingerprint; recomputed on reruns rather than stored with every image
    return {**record, "intensity_sample": intensity_sample(pixels, modality, _seed(unit))}


def _seed(unit: dict[str, Any]) -> int:
    return int(unit["id"][:8], 16)


def compact_integers(pixels: np.ndarray) -> np.ndarray:
    """Float pixels that are whole numbers within int16 (CT in HU after slope 1 / integer intercept) as int16:
    lossless, and half the archive bytes of float32."""
    if pixels.dtype.kind != "f" or pixels.size == 0:
        return pixels
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo < -32768 or hi > 32767 or not np.array_equal(pixels, np.round(pixels)):
        return pixels
    return pixels.astype(np.int16)


def _load_mask(unit: dict[str, Any], base: str, fs, image_shape: tuple[int, ...]) -> tuple[np.ndarray | None, str | None]:
    """The unit's NIfTI mask as uint8 in the image grid; (None, reason) when unusable."""
    if not unit["mask"]:
        return None, None
    try:
        mask = read_nifti(f"{base}/{unit['mask']}", fs).pixels
    except UnreadableFile as exc:
        return None, str(exc.reason)
    except Exception:  # noqa: BLE001
        return None, "unreadable_nifti"
    if mask.ndim == len(image_shape) + 1 and mask.shape[1] == 1:  # a 2D mask stored as a 1-slice volume
        mask = mask[:, 0]
    if tuple(mask.shape[1:]) != tuple(image_shape[1:]):
        return None, "mask_shape_mismatch"
    return np.rint(mask[:1]).astype(np.uint8), None


def archive_shard(source_url: str, store_url: str, units: list[dict[str, Any]], key: DeidKey, config: StoreConfig,
                  tags: dict[str, str]) -> list[dict[str, Any]]:
    """Archive every unit of a shard; `tags` maps unit id -> input tag. Returns one record per unit."""
    root = open_store(store_url, mode="a")
    return [archive_unit(u, source_url, root, key, config, tags[u["id"]]) for u in units]
