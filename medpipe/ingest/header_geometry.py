"""Geometry of a unit from its headers alone, before any pixel is decoded: what planning the 3D target spacing
needs, so that the task that decodes a case can also make its training volume (one decode per file).

DICOM series: the slices' orientation, positions and pixel spacing (the reader's own `stack_geometry`); NIfTI: the
header's affine. Other units (enhanced multi-frame, files without geometry) have none and do not vote."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from medpipe.config import PreprocessConfig
from medpipe.ingest.records import ScanRecord, Unit, UnitKind
from medpipe.planning import plan_segmentation
from medpipe.readers import UnreadableFile
from medpipe.readers.dicom import stack_geometry
from medpipe.volumes import CaseGeometry, plan_geometry, ras_affine


@dataclass(frozen=True)
class HeaderGeometry:
    """A unit's modality, shape (C, Z, Y, X), spacing (dz, dy, dx) mm and RAS affine of index (x, y, z)."""

    modality: str
    shape: tuple[int, int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray

    def case(self) -> CaseGeometry:
        """The case's canonical geometry (as the volumes layout stores it, before resampling)."""
        return plan_geometry(self.shape[1:], self.affine, None)


def unit_geometry(unit: Unit, scans: Mapping[int, ScanRecord]) -> HeaderGeometry | None:
    """The geometry the headers of `unit` promise, or None when they do not say."""
    records = [scans.get(i) for i in unit.indices]
    if any(r is None for r in records):
        return None
    if unit.kind == UnitKind.dicom_series and len(records) > 1:
        return _series_geometry(unit.modality, [r for r in records if r is not None])
    first = records[0]
    if unit.kind == UnitKind.nifti and first is not None and first.affine is not None and first.rows and first.columns:
        affine = np.asarray(first.affine, dtype=np.float64)
        norms = np.linalg.norm(affine[:3, :3], axis=0)
        shape = (first.channels, first.depth or 1, first.rows, first.columns)
        return HeaderGeometry(unit.modality, shape, (float(norms[2]), float(norms[1]), float(norms[0])), affine)
    return None


def _series_geometry(modality: str, records: Sequence[ScanRecord]) -> HeaderGeometry | None:
    infos = [r.dicom.slice for r in records if r.dicom is not None]
    if len(infos) != len(records) or any(i.orientation is None or i.position is None or i.pixel_spacing is None
                                         or not i.rows or not i.columns for i in infos):
        return None
    cosines = []
    for info in infos:
        cos = np.asarray(info.orientation, dtype=np.float64).reshape(2, 3)
        norms = np.linalg.norm(cos, axis=1)
        if np.any(norms < 1e-6):
            return None
        cosines.append(cos / norms[:, None])
    dy, dx = (float(v) for v in infos[0].pixel_spacing)  # type: ignore[union-attr]
    try:
        _, dz, affine_lps, _ = stack_geometry(cosines, [i.position for i in infos],  # type: ignore[misc]
                                              dy, dx, 1.0)
    except UnreadableFile:
        return None
    spacing = (float(dz), dy, dx)
    affine, known = ras_affine(affine_lps, "LPS", spacing)
    if not known:
        return None
    shape = (infos[0].samples_per_pixel, len(infos), int(infos[0].rows), int(infos[0].columns))  # type: ignore[arg-type]
    return HeaderGeometry(modality, shape, spacing, affine)


def median_of_modality_medians(spacings: Mapping[str, Sequence[Sequence[float]]]) -> tuple[float, float, float] | None:
    """The fixed layout's 3D target spacing: the median over modalities of each modality's median (dz, dy, dx)."""
    medians = [np.median(np.asarray(values, dtype=np.float64), axis=0) for _, values in sorted(spacings.items())
               if len(values)]
    if not medians:
        return None
    dz, dy, dx = (float(v) for v in np.median(np.array(medians), axis=0))
    return dz, dy, dx


def planned_target_spacing(geometries: Sequence[HeaderGeometry], config: PreprocessConfig
                           ) -> tuple[float, float, float] | None:
    """The target spacing of a 3D store from header geometry (None when no unit has any): the segmentation plan's
    (volumes layout) or the median of modality medians (fixed layout), as the archive-based planning computes."""
    if not geometries:
        return None
    if config.effective_layout() == "volumes":
        cases = [g.case() for g in geometries]
        plan = plan_segmentation(spacings=[c.canonical_spacing for c in cases],
                                 shapes=[c.canonical_shape for c in cases], overrides=dict(config.plan),
                                 in_channels=config.channels)
        dz, dy, dx = (float(v) for v in plan.target_spacing)
        return dz, dy, dx
    by_modality: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for g in geometries:
        by_modality[g.modality].append(g.spacing)
    return median_of_modality_medians(by_modality)
