"""The physical size of one element of a store's training arrays, for distances such as HD95.

Training arrays are not at native resolution: 3D volumes are resampled to a target spacing and cropped/padded,
2D images are resized to a fixed shape. Distances must therefore be measured in the spacing of the training
arrays, never in a sample's native spacing (``samples/spacing``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainingSpacing", "training_spacing"]


@dataclass(frozen=True)
class TrainingSpacing:
    """Spacing of the training arrays: ``spacing`` in mm per spatial axis (array order), or None = element units.

    ``units`` is "mm", "pixels" (2D) or "voxels" (3D); ``source`` says where the spacing came from (for reports).
    """

    spacing: tuple[float, ...] | None
    units: str
    source: str


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if all(v > 0 for v in out) else None


def training_spacing(attrs: Mapping[str, Any], n_spatial: int) -> TrainingSpacing:
    """Spacing of ``n_spatial``-D training arrays (2 or 3) from the store attributes ``attrs["medpipe"]``.

    Order of preference: ``attrs["training_spacing"]`` (the effective spacing ingestion used, [dz, dy, dx] for 3D,
    [dy, dx] for 2D) when it has ``n_spatial`` values; for 3D, ``config.preprocess.target_spacing``; otherwise
    no spacing (HD95 in voxels/pixels) and ``source`` explains why.
    """
    element = "voxels" if n_spatial == 3 else "pixels"
    stored = _floats(attrs.get("training_spacing"), n_spatial)
    if stored is not None:
        return TrainingSpacing(stored, "mm", "the store's training_spacing attribute")
    if n_spatial == 3:
        pre = ((attrs.get("config") or {}).get("preprocess") or {})
        target = _floats(pre.get("target_spacing"), 3)
        if target is not None:
            return TrainingSpacing(target, "mm", "the store config's preprocess.target_spacing")
        return TrainingSpacing(None, element, "the store records no training spacing (target_spacing unset and no "
                               "training_spacing attribute), so distances are in voxels of the training arrays")
    return TrainingSpacing(None, element, "2D images are resized to a fixed shape and the store records no 2-value "
                           "training spacing, so distances are in pixels of the training arrays")
