"""Dataset fingerprint (as nnU-Net computes one): spacings, shapes and foreground intensities per modality."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

if TYPE_CHECKING:
    from medpipe.ingest.records import ArchiveRecord

CT_FOREGROUND_HU = -500.0  # body voxels: lesions are rare, so the body (not the mask) defines the CT foreground
SAMPLES_PER_IMAGE = 256


def intensity_sample(pixels: np.ndarray, modality: str, seed: int) -> list[float]:
    """Up to SAMPLES_PER_IMAGE foreground intensities of one image, drawn reproducibly (uniformly, with
    replacement). CT draws candidate voxels first and keeps the foreground ones: no whole-volume copy."""
    if modality == "CT" and pixels.size:
        flat = pixels.reshape(-1)
        candidates = flat[np.random.default_rng(seed).integers(0, flat.size, size=16 * SAMPLES_PER_IMAGE)]
        foreground = candidates[candidates > CT_FOREGROUND_HU]
        if foreground.size >= SAMPLES_PER_IMAGE:  # else (little body in view) the exact path below
            return [round(float(v), 4) for v in foreground[:SAMPLES_PER_IMAGE].astype(np.float32)]
    values = pixels.astype(np.float32, copy=False).ravel()
    if modality == "CT":
        values = values[values > CT_FOREGROUND_HU]
    elif values.size and values.max() > values.min():
        values = values[values > values.min()]
    if values.size == 0:
        return []
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.size, size=min(SAMPLES_PER_IMAGE, values.size))  # with replacement: O(k)
    return [round(float(v), 4) for v in values[picks]]


def compute_fingerprint(records: Iterable[ArchiveRecord]) -> dict[str, Any]:
    """Aggregate per-image records (modality, shape [C,Z,Y,X], spacing [dz,dy,dx], intensity_sample)."""
    groups: dict[str, list[ArchiveRecord]] = defaultdict(list)
    for rec in records:
        groups[rec.modality].append(rec)
    out: dict[str, Any] = {"images": sum(len(v) for v in groups.values()), "modalities": {}}
    for modality, recs in sorted(groups.items()):
        spacing = np.array([r.spacing for r in recs], dtype=float)
        shape = np.array([r.shape for r in recs], dtype=float)
        values = np.array([v for r in recs for v in r.intensity_sample], dtype=np.float64)
        entry: dict[str, Any] = {
            "images": len(recs),
            "volumes": int(sum(1 for r in recs if r.is_volume)),
            "spacing_median": np.median(spacing, axis=0).round(4).tolist(),
            "spacing_min": spacing.min(axis=0).round(4).tolist(),
            "spacing_max": spacing.max(axis=0).round(4).tolist(),
            "shape_median": np.median(shape, axis=0).tolist(),
            "shape_min": shape.min(axis=0).astype(int).tolist(),
            "shape_max": shape.max(axis=0).astype(int).tolist(),
        }
        if values.size:
            p005, p50, p995 = np.percentile(values, [0.5, 50, 99.5])
            clipped = np.clip(values, p005, p995)
            entry["intensity"] = {
                "p00_5": round(float(p005), 4), "p50": round(float(p50), 4), "p99_5": round(float(p995), 4),
                "mean": round(float(clipped.mean()), 4), "std": round(float(clipped.std()), 4),
                "min": round(float(values.min()), 4), "max": round(float(values.max()), 4),
            }
        out["modalities"][modality] = entry
    return out
