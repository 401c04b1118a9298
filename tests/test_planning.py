"""medpipe.planning: nnU-Net-style target spacing, patch size, pooling topology and batch size (pure, fast)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from medpipe.planning import (
    MIN_FEATURE_MAP_EDGE,
    PlanningError,
    SegmentationPlan,
    default_memory_budget,
    estimate_memory_bytes,
    plan_segmentation,
    pooling_topology,
    resampled_shape,
    target_spacing,
)

GiB = 1 << 30
DEMO_ENTRY = {"images": 6, "volumes": 6, "spacing_median": [2.5, 0.8, 0.8], "spacing_min": [2.5, 0.8, 0.8],
              "spacing_max": [2.5, 0.8, 0.8], "shape_median": [1.0, 32.0, 64.0, 64.0]}


def _ct() -> dict:
    """40 near-isotropic CT volumes, ~1 mm."""
    rng = np.random.default_rng(0)
    spacings = [(float(rng.uniform(0.9, 1.1)), float(s), float(s)) for s in rng.uniform(0.8, 1.0, 40)]
    shapes = [(int(rng.integers(180, 260)), 512, 512) for _ in range(40)]
    return {"spacings": spacings, "shapes": shapes}


def _aniso() -> dict:
    """40 MR-like volumes with 3..6 mm slices of 0.8 x 0.8 mm, ~24 slices."""
    z = [5.0] * 24 + [3.0] * 4 + [4.0] * 4 + [6.0] * 8
    return {"spacings": [(s, 0.8, 0.8) for s in z], "shapes": [(24, 320, 320)] * len(z)}


def _assert_valid(plan: SegmentationPlan) -> None:
    assert plan.n_stages == len(plan.strides) and plan.strides[0] == (1, 1, 1)
    assert plan.pool_per_axis == tuple(sum(s[i] == 2 for s in plan.strides) for i in range(3))
    for axis in range(3):
        assert plan.patch_size[axis] % 2 ** plan.pool_per_axis[axis] == 0
        assert plan.patch_size[axis] // 2 ** plan.pool_per_axis[axis] >= MIN_FEATURE_MAP_EDGE or \
            plan.pool_per_axis[axis] == 0
    assert plan.batch_size >= 2


def test_isotropic_ct_gives_isotropic_spacing_and_cubic_patch() -> None:
    ct = _ct()
    spacing = target_spacing(ct["spacings"], ct["shapes"])
    assert spacing == pytest.approx(tuple(np.median(np.array(ct["spacings"]), axis=0)))
    plan = plan_segmentation(**ct, memory_budget_bytes=8 * GiB)
    _assert_valid(plan)
    assert plan.target_spacing == pytest.approx(spacing)
    assert "target spacing: median spacing per axis" in plan.notes
    # cubic-ish in millimetres and pooled alike on every axis
    extent_mm = [n * s for n, s in zip(plan.patch_size, plan.target_spacing)]
    assert max(extent_mm) / min(extent_mm) < 1.5
    assert max(plan.pool_per_axis) - min(plan.pool_per_axis) <= 1
    assert all(n >= 64 for n in plan.patch_size)
    assert plan.estimated_memory_bytes <= 8 * GiB
    assert plan.budget_source == "given" and plan.memory_budget_bytes == 8 * GiB


def test_anisotropic_uses_10th_percentile_and_delays_pooling_z() -> None:
    data = _aniso()
    spacing = target_spacing(data["spacings"], data["shapes"])
    assert spacing[0] == pytest.approx(float(np.percentile([s[0] for s in data["spacings"]], 10)))
    assert spacing[0] < 5.0 and spacing[1:] == pytest.approx((0.8, 0.8))
    plan = plan_segmentation(**data, memory_budget_bytes=4 * GiB)
    _assert_valid(plan)
    assert any("10th percentile" in n for n in plan.notes)
    assert plan.target_spacing == pytest.approx(spacing)
    assert plan.median_shape_after_resampling == resampled_shape((24, 320, 320), (5.0, 0.8, 0.8), spacing)
    # z (3 mm) is not pooled until y/x (0.8 mm -> 1.6 mm) are within 2x of its spacing
    assert plan.strides[1] == (1, 2, 2)
    assert plan.pool_per_axis[0] < plan.pool_per_axis[1] == plan.pool_per_axis[2]


def test_anisotropic_spacing_with_many_slices_keeps_the_median() -> None:
    # nnU-Net's second condition: the coarse axis must also have < 1/3 of the voxels of the others
    spacings = [(5.0, 0.8, 0.8)] * 9 + [(2.0, 0.8, 0.8)]
    shapes = [(200, 256, 256)] * 10
    assert target_spacing(spacings, shapes) == pytest.approx((5.0, 0.8, 0.8))


def test_pooling_rule_respects_min_edge_and_spacing_ratio() -> None:
    pools, strides = pooling_topology((1.0, 1.0, 1.0), (128, 128, 128))
    assert pools == (5, 5, 5) and len(strides) == 6  # 128 / 2**5 = 4
    pools, strides = pooling_topology((4.0, 1.0, 1.0), (16, 128, 128))
    assert strides[1] == (1, 2, 2) and strides[2] == (1, 2, 2)  # 4 mm waits while y/x are < half its spacing
    assert strides[3][0] == 2
    pools, _ = pooling_topology((1.0, 1.0, 1.0), (6, 64, 64))
    assert pools[0] == 0  # 6 < 2 * 4: pooling would leave an edge below 4


def test_small_budget_gives_smaller_patch_and_batch() -> None:
    ct = _ct()
    small = plan_segmentation(**ct, memory_budget_bytes=1 * GiB)
    large = plan_segmentation(**ct, memory_budget_bytes=40 * GiB)
    _assert_valid(small)
    _assert_valid(large)
    assert math.prod(small.patch_size) < math.prod(large.patch_size)
    assert all(s <= g for s, g in zip(small.patch_size, large.patch_size))
    assert small.batch_size <= large.batch_size
    assert small.estimated_memory_bytes <= 1 * GiB
    assert large.estimated_memory_bytes <= 40 * GiB
    # same patch, more memory: a larger batch
    more = plan_segmentation(**ct, memory_budget_bytes=80 * GiB, overrides={"patch_size": small.patch_size})
    assert more.batch_size > small.batch_size


def test_tiny_budget_still_plans_with_a_note() -> None:
    plan = plan_segmentation(**_ct(), memory_budget_bytes=1 << 20)
    _assert_valid(plan)
    assert any("exceeds the budget" in n or "does not fit" in n for n in plan.notes)
    # with fixed strides the patch cannot go below 2**pools: the loop still ends
    strides = [(1, 1, 1)] + [(2, 2, 2)] * 4
    plan = plan_segmentation(**_ct(), memory_budget_bytes=1 << 20, overrides={"strides": strides})
    assert plan.patch_size == (16, 16, 16) and any("does not fit" in n for n in plan.notes)


def test_batch_is_capped_at_5_percent_of_the_dataset() -> None:
    plan = plan_segmentation(spacings=[(1.0, 1.0, 1.0)] * 10, shapes=[(64, 64, 64)] * 10,
                             memory_budget_bytes=100 * GiB)
    assert plan.patch_size == (64, 64, 64)
    assert plan.batch_size == 2  # 5% of 10 volumes is half a patch; never below 2
    assert any("5%" in n for n in plan.notes)


def test_overrides_win_and_are_noted() -> None:
    ct = _ct()
    plan = plan_segmentation(**ct, memory_budget_bytes=2 * GiB,
                             overrides={"patch_size": [96, 160, 160], "batch_size": 7, "base_features": 16,
                                        "target_spacing": (1.5, 1.5, 1.5)})
    _assert_valid(plan)
    assert plan.patch_size == (96, 160, 160) and plan.batch_size == 7 and plan.base_features == 16
    assert plan.target_spacing == (1.5, 1.5, 1.5)
    assert plan.median_shape_after_resampling[1] == pytest.approx(512 * 0.9 / 1.5, abs=30)
    assert {"override batch_size=7", "override base_features=16"} <= set(plan.notes)
    assert any(n.startswith("override patch_size") for n in plan.notes)
    # strides win, and the patch planned around them is divisible by them
    strides = [(1, 1, 1), (1, 2, 2), (2, 2, 2)]
    plan = plan_segmentation(**ct, memory_budget_bytes=2 * GiB, overrides={"strides": strides})
    assert plan.strides == tuple(strides) and plan.pool_per_axis == (1, 2, 2) and plan.n_stages == 3
    _assert_valid(plan)
    plan = plan_segmentation(**ct, memory_budget_bytes=2 * GiB, overrides={"n_stages": 4})
    assert plan.n_stages == 4
    _assert_valid(plan)


@pytest.mark.parametrize("overrides, match", [
    ({"patch_size": (100, 100, 100)}, "not divisible"),
    ({"patch_size": (0, 64, 64)}, "patch_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"target_spacing": (1.0, -1.0, 1.0)}, "target_spacing"),
    ({"strides": [(1, 1, 1), (3, 2, 2)]}, "strides"),
    ({"notes": ("x",)}, "cannot override"),
    ({"colour": "red"}, "cannot override"),
    ({"patch_size": (64, 64, 64), "pool_per_axis": (6, 6, 6)}, "pool_per_axis"),
])
def test_bad_overrides_are_refused(overrides: dict, match: str) -> None:
    with pytest.raises(PlanningError, match=match):
        plan_segmentation(**_ct(), memory_budget_bytes=2 * GiB, overrides=overrides)


def test_to_dict_from_dict_round_trip_is_json_safe() -> None:
    plan = plan_segmentation(**_aniso(), memory_budget_bytes=3 * GiB)
    data = json.loads(json.dumps(plan.to_dict()))
    assert isinstance(data["strides"][0], list)
    again = SegmentationPlan.from_dict(data)
    assert again == plan
    with pytest.raises(PlanningError, match="unknown plan fields"):
        SegmentationPlan.from_dict({**data, "extra": 1})


def test_demo_fingerprint_patch_fits_the_resampled_shape() -> None:
    plan = plan_segmentation(DEMO_ENTRY, memory_budget_bytes=2 * GiB)
    _assert_valid(plan)
    assert plan.target_spacing == pytest.approx((2.5, 0.8, 0.8))
    assert plan.median_shape_after_resampling == (32, 64, 64)
    assert all(p <= m for p, m in zip(plan.patch_size, plan.median_shape_after_resampling))
    assert plan.strides[1] == (1, 2, 2)  # 2.5 mm z is > 2x the 0.8 mm in-plane spacing: not pooled first
    # a whole fingerprint with one modality is accepted too
    assert plan_segmentation({"images": 6, "modalities": {"CT": DEMO_ENTRY}}, memory_budget_bytes=2 * GiB) == plan


def test_fingerprint_with_several_modalities_needs_one_entry() -> None:
    with pytest.raises(PlanningError, match="modalities"):
        plan_segmentation({"modalities": {"CT": DEMO_ENTRY, "MR": DEMO_ENTRY}})
    with pytest.raises(PlanningError, match="spacing"):
        plan_segmentation({"images": 2, "spacing_median": [0.8, 0.8], "shape_median": [1, 64, 64]})


def test_default_budget_records_its_source() -> None:
    budget, source = default_memory_budget()
    assert budget > 0
    assert source == "cpu" or source.startswith("cuda:")
    plan = plan_segmentation(DEMO_ENTRY)
    assert plan.budget_source == source


def test_planning_module_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, medpipe.planning; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_memory_estimate_grows_with_batch_patch_and_features() -> None:
    _, strides = pooling_topology((1.0, 1.0, 1.0), (64, 64, 64))
    one = estimate_memory_bytes((64, 64, 64), strides, 32, 1)
    assert estimate_memory_bytes((64, 64, 64), strides, 32, 2) > one
    assert estimate_memory_bytes((64, 64, 64), strides, 64, 1) > one
    _, big = pooling_topology((1.0, 1.0, 1.0), (128, 128, 128))
    # nnU-Net's reference point: 128^3, batch 2, 32..320 features ~ 8 GB
    assert 6 * GiB < estimate_memory_bytes((128, 128, 128), big, 32, 2) < 9 * GiB
