"""The volumes layout's geometry: canonical RAS orientation for DICOM (LPS) and NIfTI (RAS) alike, resampling that
keeps a mask's foreground volume for anisotropic spacing, and the exact way back to the source grid."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from medpipe.config import StoreConfig
from medpipe.ingest.mask_check import foreground_amounts
from medpipe.volumes import (LPS_TO_RAS, nifti_image, open_case, plan_geometry, ras_affine, resample,
                             to_source, to_stored, volume_chunks, write_case)


def _ellipsoid(shape: tuple[int, int, int], spacing: tuple[float, float, float], centre_mm, radii_mm) -> np.ndarray:
    """(1, Z, Y, X) uint8 mask of an ellipsoid given in millimetres (voxel centres inside)."""
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre_mm, radii_mm)) <= 1.0
    return inside.astype(np.uint8)[None]


def _lps_axial_affine(spacing: tuple[float, float, float], origin=(-50.0, -60.0, 10.0)) -> np.ndarray:
    """A plain axial DICOM stack: columns along +x (L), rows along +y (P), slices along +z (S), in LPS."""
    dz, dy, dx = spacing
    affine = np.diag([dx, dy, dz, 1.0])
    affine[:3, 3] = origin
    return affine


ANISOTROPIC = [((5.0, 0.7, 0.7), (1.5, 1.0, 1.0)),  # thick slices resampled finer in z, coarser in-plane
               ((0.8, 2.0, 2.0), (2.0, 1.0, 1.0))]  # the other way round


@pytest.mark.parametrize("spacing,target", ANISOTROPIC)
@pytest.mark.parametrize("world", ["LPS", "RAS"])
def test_mask_volume_survives_resampling(spacing, target, world):
    shape = (24, 40, 36) if spacing[0] > 1 else (60, 24, 22)
    extent = [n * s for n, s in zip(shape, spacing)]
    mask = _ellipsoid(shape, spacing, [e * 0.45 for e in extent], [e * 0.2 for e in extent])
    affine = _lps_axial_affine(spacing)
    if world == "RAS":  # a NIfTI of other voxels order: x flipped (radiological), affine in RAS
        mask = mask[..., ::-1].copy()
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = shape[2] - 1
        affine = LPS_TO_RAS @ affine @ flip
    ras, known = ras_affine(affine, world, spacing)
    geometry = plan_geometry(shape, ras, target)
    stored = to_stored(mask, geometry, "labels")
    assert known and stored.shape[1:] == geometry.shape
    source_ml = foreground_amounts(mask, spacing)["1"]
    stored_ml = foreground_amounts(stored, geometry.spacing)["1"]
    assert source_ml > 1.0
    assert abs(stored_ml - source_ml) / source_ml < 0.03, (source_ml, stored_ml)
    back = to_source(stored, geometry, "labels")
    assert back.shape == mask.shape
    overlap = 2 * np.logical_and(back, mask).sum() / (back.sum() + mask.sum())
    assert overlap > 0.9  # resampled there and back: the same ellipsoid


def test_dicom_and_nifti_of_the_same_voxels_land_on_the_same_canonical_grid():
    rng = np.random.default_rng(0)
    spacing = (2.5, 0.8, 0.6)
    volume = rng.normal(size=(1, 6, 7, 8)).astype(np.float32)
    lps = _lps_axial_affine(spacing)
    # the NIfTI export of the same stack (as dcm2niix writes it): rows flipped so that the affine is RAS-friendly
    nifti_voxels = volume[:, :, ::-1, :].copy()
    flip_rows = np.diag([1.0, -1.0, 1.0, 1.0])
    flip_rows[1, 3] = 7 - 1
    nifti_affine = LPS_TO_RAS @ lps @ flip_rows
    a = plan_geometry(volume.shape[1:], ras_affine(lps, "LPS", spacing)[0], None)
    b = plan_geometry(nifti_voxels.shape[1:], ras_affine(nifti_affine, "RAS", spacing)[0], None)
    canonical_a, canonical_b = to_stored(volume, a, "linear"), to_stored(nifti_voxels, b, "linear")
    np.testing.assert_array_equal(canonical_a, canonical_b)
    # RAS: x increases to the Right, so the LPS stack (x to the Left) is flipped along X and along Y
    np.testing.assert_array_equal(canonical_a, volume[:, :, ::-1, ::-1])


def test_reorientation_is_exact_and_the_nifti_keeps_the_source_grid():
    rng = np.random.default_rng(1)
    spacing = (3.0, 0.9, 0.8)
    labels = rng.integers(0, 3, size=(1, 5, 6, 7)).astype(np.uint8)
    oblique = _lps_axial_affine(spacing)[:, [1, 0, 2, 3]]  # rows and columns swapped: another axis order
    ras, _ = ras_affine(oblique, "LPS", spacing)
    geometry = plan_geometry(labels.shape[1:], ras, None)
    stored = to_stored(labels, geometry, "labels")
    np.testing.assert_array_equal(to_source(stored, geometry, "labels"), labels)
    image = nifti_image(labels[0], geometry)
    assert image.shape == (7, 6, 5)  # NIfTI order (x, y, z)
    np.testing.assert_allclose(image.affine, ras)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), labels[0])


def test_labels_resampling_keeps_thin_structures_nearest_would_drop():
    mask = np.zeros((1, 4, 32, 32), np.uint8)
    mask[0, :, 11:13, 5:25] = 2  # a 2-voxel-thick band of label 2, between the rows nearest neighbour samples
    down = resample(mask, (4, 12, 12), "labels")  # 2.67x coarser in-plane
    assert resample(mask, (4, 12, 12), "nearest").sum() == 0
    assert set(np.unique(down)) == {0, 2} and (down == 2).any(axis=(0, 1, 3)).sum() == 1


def test_without_geometry_the_axes_are_taken_as_canonical():
    affine, known = ras_affine(None, "LPS", (2.0, 1.0, 0.5))
    assert not known
    geometry = plan_geometry((4, 5, 6), affine, None, geometry_known=known)
    assert geometry.canonical_shape == (4, 5, 6) and geometry.canonical_spacing == (2.0, 1.0, 0.5)
    assert geometry.to_dict()["geometry_known"] is False


def test_cases_are_chunked_for_patch_reads(tmp_path):
    assert volume_chunks((1, 300, 512, 512), 64) == ((1, 64, 64, 64), (1, 256, 256, 256))
    assert volume_chunks((1, 20, 70, 40), 64) == ((1, 20, 64, 40), (1, 20, 128, 40))
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    geometry = plan_geometry((20, 70, 40), np.diag([1.0, 1.0, 2.0, 1.0]), None)
    image = np.arange(20 * 70 * 40, dtype=np.float32).reshape(1, 20, 70, 40)
    write_case(root, 3, image, None, geometry, "unit-x", StoreConfig())
    case = open_case(zarr.open_group(str(tmp_path / "s.zarr"), mode="r"), 3)
    assert case.unit == "unit-x" and case.geometry == geometry
    assert case.image.metadata.dimension_names == ("c", "z", "y", "x")
    assert case.image.chunks == (1, 20, 64, 40) and case.mask.shape == (1, 20, 70, 40)
    np.testing.assert_array_equal(case.image[...], image)
    assert int(case.mask[...].sum()) == 0
