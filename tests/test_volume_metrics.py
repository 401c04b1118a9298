"""Per-case 3D metrics in the source grid (case_metrics, summarize_cases) and the 3-plane overlay figure.

Expected values are derived by hand from a box lesion, not from the implementation. The reference box is 4 (z) x 6
(y) x 6 (x) voxels: 144 voxels, of which 2 x 4 x 4 = 32 are interior, so 112 are boundary voxels. MONAI's boundary =
mask minus its erosion; HD95 = the larger of the two directed 95th percentiles of boundary-to-boundary distances.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medpipe.evaluation import plots
from medpipe.evaluation.plots import plot_case_overlays
from medpipe.evaluation.volume_metrics import case_metrics, summarize_cases

SHAPE = (10, 12, 12)
ANISO = (5.0, 1.0, 1.0)  # (dz, dy, dx) mm
BOX = (slice(3, 7), slice(3, 9), slice(3, 9))


def box(shift: tuple[int, int, int] = (0, 0, 0), label: int = 1) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=np.int64)
    out[tuple(slice(s.start + d, s.stop + d) for s, d in zip(BOX, shift))] = label
    return out


def test_perfect_prediction():
    m = case_metrics(box(), box(), ANISO, num_classes=2)
    assert m["dice"] == 1.0 and m["hd95_mm"] == 0.0 and m["surface_dice"] == 1.0
    assert m["per_label"]["1"]["dice"] == 1.0


def test_empty_conventions():
    empty = np.zeros(SHAPE, dtype=np.int64)
    both = case_metrics(empty, empty, ANISO, num_classes=2)["per_label"]["1"]
    assert both["dice"] == 1.0 and math.isnan(both["hd95_mm"]) and both["surface_dice"] == 1.0
    for pred, true in ((empty, box()), (box(), empty)):
        one = case_metrics(pred, true, ANISO, num_classes=2)
        assert one["dice"] == 0.0 and math.isnan(one["hd95_mm"]) and one["surface_dice"] == 0.0


def test_hd95_uses_anisotropic_spacing():
    # Shifting the box by one voxel along an axis: every boundary voxel of one box lies on, or within one step of,
    # the other's boundary, and the whole trailing face (6 x 6 = 36 of 112 boundary voxels, > 5%) is exactly one
    # step away. So both directed 95th percentiles equal one step: dz = 5 mm along z, dx = 1 mm along x.
    assert case_metrics(box((1, 0, 0)), box(), ANISO, num_classes=2)["hd95_mm"] == pytest.approx(5.0)
    assert case_metrics(box((0, 0, 1)), box(), ANISO, num_classes=2)["hd95_mm"] == pytest.approx(1.0)
    # the same z shift with isotropic 1 mm voxels is 1 mm: the spacing, not the voxel count, sets the distance
    assert case_metrics(box((1, 0, 0)), box(), (1.0, 1.0, 1.0), num_classes=2)["hd95_mm"] == pytest.approx(1.0)


def test_surface_dice_tolerance():
    # x shift of 1 mm <= 2 mm tolerance: every boundary voxel is within tolerance.
    assert case_metrics(box((0, 0, 1)), box(), ANISO, 2, tolerance_mm=2.0)["surface_dice"] == pytest.approx(1.0)
    # z shift of 5 mm: the trailing face (36 of 112 boundary voxels, in each direction) is 5 mm > 2 mm away; the
    # rest lie on the other boundary, except the 4 x 4 inner top-face voxels, 1-2 mm from its side faces.
    nsd = case_metrics(box((1, 0, 0)), box(), ANISO, 2, tolerance_mm=2.0)["surface_dice"]
    assert nsd == pytest.approx((112 - 36) / 112)
    # with a 5 mm tolerance the same shift is fully within tolerance
    assert case_metrics(box((1, 0, 0)), box(), ANISO, 2, tolerance_mm=5.0)["surface_dice"] == pytest.approx(1.0)


def test_dice_and_volumes():
    m = case_metrics(box((0, 0, 1)), box(), ANISO, num_classes=2)["per_label"]["1"]
    assert m["dice"] == pytest.approx(2 * (4 * 6 * 5) / (144 + 144))
    assert m["volume_true_ml"] == pytest.approx(144 * 5.0 * 1.0 * 1.0 / 1000)
    pred = box()
    pred[0, 0, :3] = 1  # three extra voxels
    assert case_metrics(pred, box(), ANISO, 2)["per_label"]["1"]["volume_pred_ml"] == pytest.approx(147 * 5 / 1000)


def test_multilabel_keys_and_means():
    true = box()
    true[0:2, 0:2, 0:2] = 2
    pred = box()  # label 2 missing from the prediction
    m = case_metrics(pred, true, ANISO, num_classes=3)
    assert list(m["per_label"]) == ["1", "2"]
    assert set(m["per_label"]["2"]) == {"dice", "hd95_mm", "surface_dice", "volume_true_ml", "volume_pred_ml"}
    assert m["per_label"]["2"]["dice"] == 0.0 and m["per_label"]["2"]["volume_true_ml"] == pytest.approx(8 * 5 / 1000)
    assert m["dice"] == pytest.approx(0.5)
    assert m["hd95_mm"] == 0.0  # nanmean over labels: label 2 (NaN) is left out
    assert m["surface_dice"] == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [-1, 3])
def test_out_of_range_labels(bad):
    pred = box()
    pred[0, 0, 0] = bad
    with pytest.raises(ValueError, match="labels"):
        case_metrics(pred, box(), ANISO, num_classes=3)


def test_summarize_cases():
    rng = np.random.default_rng(1)
    empty = np.zeros(SHAPE, dtype=np.int64)
    cases = [case_metrics(box(tuple(rng.integers(0, 3, 3))), box(), ANISO, 2) for _ in range(7)]
    cases.append(case_metrics(empty, box(), ANISO, 2))  # HD95 undefined
    s = summarize_cases(cases, n_boot=200, seed=0)
    assert s["n_cases"] == 8 and s["hd95_excluded"] == 1 and s["per_label"]["1"]["hd95_excluded"] == 1
    for block in (s, s["per_label"]["1"]):
        for metric in ("dice", "hd95_mm", "surface_dice"):
            e = block[metric]
            assert e["low"] <= e["mean"] <= e["high"]
    assert s["dice"]["mean"] == pytest.approx(np.mean([c["dice"] for c in cases]))
    assert s["hd95_mm"]["mean"] == pytest.approx(np.mean([c["hd95_mm"] for c in cases[:7]]))
    json.dumps(s)  # plain Python
    with pytest.raises(ValueError):
        summarize_cases([])


def test_plot_case_overlays(tmp_path, monkeypatch):
    seen: list[tuple[list[str], list[object]]] = []
    save = plots._save

    def spy(fig, out_path):
        seen.append(([ax.get_title() for ax in fig.axes], [ax.get_aspect() for ax in fig.axes]))
        return save(fig, out_path)

    monkeypatch.setattr(plots, "_save", spy)
    rng = np.random.default_rng(0)
    shape = (8, 40, 32)
    image = rng.normal(size=shape).astype(np.float32)
    true = np.zeros(shape, dtype=np.int64)
    true[1:4, 5:14, 20:27] = 1  # off-centre lesion, centroid (z, y, x) = (2, 9, 23)
    pred = np.roll(true, 2, axis=2)
    out = plot_case_overlays(image, true, pred, (4.0, 0.8, 0.8), tmp_path / "case.png", title="case $1")
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert seen[0][0] == ["Axial (z = 2)", "Coronal (y = 9)", "Sagittal (x = 23)"]
    assert seen[0][1] == pytest.approx([1.0, 5.0, 5.0])  # dy/dx, dz/dx, dz/dy
    # truth empty: slices through the prediction's centroid; both empty: through the volume centre
    empty = np.zeros(shape, dtype=np.int64)
    plot_case_overlays(image, empty, pred, (4.0, 0.8, 0.8), tmp_path / "pred.png")
    plot_case_overlays(image, empty, empty, (4.0, 0.8, 0.8), tmp_path / "empty.png")
    assert seen[1][0] == ["Axial (z = 2)", "Coronal (y = 9)", "Sagittal (x = 25)"]
    assert seen[2][0] == ["Axial (z = 4)", "Coronal (y = 20)", "Sagittal (x = 16)"]
    assert (tmp_path / "empty.png").stat().st_size > 0
