"""Synthetic samples in the store: `synthetic/` beside `training/`, never mixed into it.

    synthetic/images        float32 (M, C, H, W): same dtype, shape and normalisation as training/images
    synthetic/labels        int64 (M,): class index (as training/labels)
    synthetic/sample_seed   int64 (M,): the seed that regenerates sample k (with the generator below)
    synthetic attrs["medpipe"]: provenance — generator checkpoint sha256 and epoch, the store content hash it was
        trained on (must equal the store's), seed, samples per class, classes, code version, quality and
        memorisation summaries, created_at.

The real data (`training/`, `samples/`, `archive/`) is never written here, so the store's content hash and its
verification are unchanged by augmentation. Only training reads `synthetic/`, and only into the train split
(medpipe.training: `synthetic_ratio`); validation and test never see it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import zarr

from medpipe import __version__
from medpipe.gan import GanError
from medpipe.store import ATTRS_KEY, attrs_of, get_array, get_group, open_store, samples_per_chunk, store_attrs

SYNTHETIC = "synthetic"


class SyntheticSetError(GanError):
    """A synthetic set that is missing, or was made for other data than the store now holds."""


@dataclass(frozen=True)
class Provenance:
    """Where a synthetic set comes from (the group's attributes)."""

    generator_sha256: str
    generator_epoch: int
    trained_on_content_hash: str
    seed: int
    n_per_class: int
    classes: list[str]
    sample_shape: list[int]
    code_version: str = __version__
    created_at: str = ""
    quality: dict[str, Any] = field(default_factory=dict)
    memorisation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_synthetic(store_url: str, images: np.ndarray, labels: np.ndarray, sample_seeds: np.ndarray,
                    provenance: Provenance, chunk_bytes: int = 4 << 20) -> None:
    """Replace `synthetic/` with these samples: images (M, C, H, W) float32, labels (M,), per-sample seeds (M,).

    Refuses samples whose shape is not the store's sample shape, and a provenance trained on another content."""
    attrs = store_attrs(store_url)
    shape = list(attrs.get("sample_shape") or [])
    if list(images.shape[1:]) != shape:
        raise SyntheticSetError(f"synthetic samples have shape {list(images.shape[1:])}, the store's are {shape}")
    if provenance.trained_on_content_hash != attrs.get("content_hash"):
        raise SyntheticSetError("the generator was trained on other data than the store now holds; retrain it")
    if not (len(images) == len(labels) == len(sample_seeds)):
        raise ValueError("images, labels and sample_seeds must have one entry per sample")
    root = open_store(store_url, mode="a")
    group = root.create_group(SYNTHETIC, overwrite=True)
    m = len(images)
    per_chunk = samples_per_chunk(tuple(shape), 4, chunk_bytes)
    group.create_array("images", shape=images.shape, dtype="float32", chunks=(min(per_chunk, max(m, 1)), *shape),
                       dimension_names=("n", "c", "y", "x")[: images.ndim])
    group.create_array("labels", shape=(m,), dtype="int64", chunks=(max(m, 1),), dimension_names=("n",))
    group.create_array("sample_seed", shape=(m,), dtype="int64", chunks=(max(m, 1),), dimension_names=("n",))
    if m:
        get_array(group, "images")[...] = images.astype(np.float32, copy=False)
        get_array(group, "labels")[...] = labels.astype(np.int64, copy=False)
        get_array(group, "sample_seed")[...] = sample_seeds.astype(np.int64, copy=False)
    stamped = provenance if provenance.created_at else _stamped(provenance)
    group.attrs[ATTRS_KEY] = stamped.to_dict()


def _stamped(provenance: Provenance) -> Provenance:
    data = provenance.to_dict()
    data["created_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return Provenance(**data)


def synthetic_provenance(store_url_or_root: str | zarr.Group) -> dict[str, Any] | None:
    """The synthetic set's provenance, or None when the store has none."""
    root = open_store(store_url_or_root) if isinstance(store_url_or_root, str) else store_url_or_root
    if SYNTHETIC not in root:
        return None
    return attrs_of(get_group(root, SYNTHETIC)) or None


def check_synthetic_current(store_url: str) -> dict[str, Any]:
    """The provenance of a synthetic set made for the store's current content; SyntheticSetError otherwise."""
    provenance = synthetic_provenance(store_url)
    if provenance is None:
        raise SyntheticSetError(f"{store_url} has no synthetic samples: run `medpipe augment` first")
    if provenance.get("trained_on_content_hash") != store_attrs(store_url).get("content_hash"):
        raise SyntheticSetError(f"the synthetic samples of {store_url} were made from other data than the store now "
                                "holds (re-ingested?): run `medpipe augment` again")
    return provenance


def read_synthetic(store_url: str) -> tuple[np.ndarray, np.ndarray, Mapping[str, Any]]:
    """(images (M, C, H, W), labels (M,), provenance) of a current synthetic set."""
    provenance = check_synthetic_current(store_url)
    group = get_group(open_store(store_url), SYNTHETIC)
    return (np.asarray(get_array(group, "images")[...]), np.asarray(get_array(group, "labels")[...]), provenance)


__all__ = ["Provenance", "SYNTHETIC", "SyntheticSetError", "check_synthetic_current",
           "read_synthetic", "synthetic_provenance", "write_synthetic"]
