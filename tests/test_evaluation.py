"""Evaluation: metrics against hand-computed cases, bootstrap CIs, Grad-CAM, figures and the HTML/JSON report."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_auroc, multiclass_f1_score

from medpipe.evaluation import (
    bootstrap_ci,
    classification_metrics,
    grad_cam_maps,
    markdown_summary,
    plot_confusion_matrix,
    plot_gradcam_grid,
    plot_roc_curves,
    plot_sample_predictions,
    plot_segmentation_samples,
    plot_training_curves,
    segmentation_metrics,
    to_jsonable,
    with_confidence_intervals,
    write_report,
)
from medpipe.evaluation.bootstrap import batched_accuracy, batched_auroc, batched_f1_macro
from medpipe.evaluation.report import PNG_SIGNATURE

CLASSES3 = ["normal", "benign", "malignant"]


def _one_hot_probs(pred: list[int], k: int, confidence: float = 0.8) -> np.ndarray:
    p = np.full((len(pred), k), (1 - confidence) / (k - 1))
    p[np.arange(len(pred)), pred] = confidence
    return p


def _random_probs(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), n)
    p[np.arange(n), y] += 0.4
    return y, p / p.sum(axis=1, keepdims=True)


# ---- classification ------------------------------------------------------------------------------------------------


def test_hand_computed_confusion_matrix():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 2, 2, 2, 2, 0]
    m = classification_metrics(np.array(y_true), _one_hot_probs(y_pred, 3), CLASSES3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert m["n"] == 9 and m["support"] == {"normal": 3, "benign": 2, "malignant": 4}
    assert m["accuracy"] == pytest.approx(6 / 9)
    # precision = tp / predicted: 2/3, 1/2, 3/4; recall = tp / support: 2/3, 1/2, 3/4
    pc = m["per_class"]
    assert [pc[c]["precision"] for c in CLASSES3] == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert [pc[c]["recall"] for c in CLASSES3] == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert [pc[c]["f1"] for c in CLASSES3] == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert m["f1_macro"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert m["precision_macro"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)


def test_perfect_and_inverted_binary():
    y = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.7, 0.8, 0.9])
    perfect = classification_metrics(y, np.stack([1 - scores, scores], 1), ["neg", "pos"])
    assert perfect["accuracy"] == 1.0 and perfect["auroc"] == pytest.approx(1.0) and perfect["f1_macro"] == 1.0
    inverted = classification_metrics(y, np.stack([scores, 1 - scores], 1), ["neg", "pos"])
    assert inverted["accuracy"] == 0.0 and inverted["auroc"] == pytest.approx(0.0)
    assert "positive class 'pos'" in perfect["auroc_average"]


def test_matches_torchmetrics_multiclass():
    y, p = _random_probs(300, 4, seed=3)
    m = classification_metrics(y, p, list("abcd"))
    t, pt = torch.from_numpy(y), torch.from_numpy(p)
    assert m["f1_macro"] == pytest.approx(float(multiclass_f1_score(pt, t, num_classes=4, average="macro")), abs=1e-6)
    assert m["auroc"] == pytest.approx(float(multiclass_auroc(pt, t, num_classes=4)), abs=1e-6)
    # the vectorised bootstrap versions agree with the point estimates
    assert batched_accuracy(y[None], p[None])[0] == pytest.approx(m["accuracy"])
    assert batched_f1_macro(y[None], p[None])[0] == pytest.approx(m["f1_macro"])
    assert batched_auroc(y[None], p[None])[0] == pytest.approx(m["auroc"], abs=1e-6)


def test_absent_class_gives_null_auroc_and_note():
    y = np.array([0, 1, 0, 1, 0])
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.2, 0.5], [0.9, 0.05, 0.05]])
    m = classification_metrics(y, p, CLASSES3)
    assert math.isnan(m["per_class"]["malignant"]["auroc"])
    assert m["per_class"]["normal"]["auroc"] == pytest.approx(1.0)
    assert m["auroc"] == pytest.approx(np.mean([m["per_class"][c]["auroc"] for c in ("normal", "benign")]))
    assert any("malignant" in n for n in m["notes"])
    back = json.loads(json.dumps(to_jsonable(m), allow_nan=False))
    assert back["per_class"]["malignant"]["auroc"] is None


def test_invalid_inputs():
    with pytest.raises(ValueError, match="N=0"):
        classification_metrics(np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"])
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 2]), np.zeros((2, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="N=0"):
        segmentation_metrics(np.zeros((0, 1, 4, 4), int), np.zeros((0, 1, 4, 4), int))


# ---- segmentation --------------------------------------------------------------------------------------------------


def _boxes():
    true = np.zeros((3, 1, 32, 32), dtype=np.int64)
    pred = np.zeros_like(true)
    true[0, 0, 8:16, 8:16] = 1  # 8x8 box
    pred[0, 0, 10:18, 8:16] = 1  # same box shifted 2 rows: overlap 6x8
    true[1, 0, 4:12, 4:12] = 1  # missed entirely: empty prediction
    return pred, true  # sample 2: both empty


def test_dice_iou_hd95_of_known_boxes():
    pred, true = _boxes()
    m = segmentation_metrics(pred, true)
    ps = m["per_sample"]
    assert ps["dice"] == pytest.approx([2 * 48 / 128, 0.0, 1.0])  # empty vs empty counts as 1.0
    assert ps["iou"] == pytest.approx([48 / 80, 0.0, 1.0])
    assert ps["hd95"][0] == pytest.approx(2.0)  # shifted by 2 voxels
    assert math.isnan(ps["hd95"][1]) and math.isnan(ps["hd95"][2])
    assert m["hd95_mean"] == pytest.approx(2.0) and m["hd95_excluded"] == 2
    assert m["dice_mean"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert m["empty_vs_empty_score"] == 1.0 and any("empty" in n for n in m["notes"])
    # spacing scales the distance
    assert segmentation_metrics(pred, true, spacing=(0.5, 0.5))["per_sample"]["hd95"][0] == pytest.approx(1.0)


def test_segmentation_3d_multiclass():
    true = np.zeros((2, 1, 12, 12, 12), dtype=np.int64)
    true[:, 0, 2:6, 2:6, 2:6] = 1
    true[:, 0, 7:10, 7:10, 7:10] = 2
    m = segmentation_metrics(true.copy(), true, num_classes=3)
    assert m["dice_mean"] == 1.0 and m["iou_mean"] == 1.0 and m["hd95_mean"] == 0.0
    assert set(m["per_class"]) == {"1", "2"}


# ---- bootstrap -----------------------------------------------------------------------------------------------------


def test_bootstrap_contains_estimate_and_narrows():
    widths = []
    for n in (50, 800):
        y, p = _random_probs(n, 3, seed=n)
        m = with_confidence_intervals(classification_metrics(y, p, CLASSES3), y, p, n_boot=500)
        for key in ("accuracy", "f1_macro", "auroc"):
            ci = m["ci"][key]
            assert ci["low"] <= m[key] <= ci["high"], key
        widths.append(m["ci"]["accuracy"]["high"] - m["ci"]["accuracy"]["low"])
    assert widths[1] < widths[0] / 2


def test_bootstrap_generic_and_skips_undefined():
    x = np.arange(20, dtype=float)
    low, high = bootstrap_ci(lambda a: a.mean(), x, n_boot=300)
    assert low < x.mean() < high
    # tiny binary set: some resamples contain a single class (AUROC undefined) and are skipped
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    p = np.stack([1 - np.linspace(0, 1, 8), np.linspace(0, 1, 8)], 1)
    low, high = bootstrap_ci(batched_auroc, y, p, n_boot=500, batched=True)
    assert np.isfinite(low) and np.isfinite(high) and high == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bootstrap_ci(np.mean, np.array([]))


def test_bootstrap_speed_1000x1000():
    y, p = _random_probs(1000, 3)
    m = classification_metrics(y, p, CLASSES3)
    t0 = time.perf_counter()
    with_confidence_intervals(m, y, p, n_boot=1000)
    assert time.perf_counter() - t0 < 2.0


def test_segmentation_cis():
    pred, true = _boxes()
    m = with_confidence_intervals(segmentation_metrics(np.tile(pred, (5, 1, 1, 1)), np.tile(true, (5, 1, 1, 1))))
    assert m["ci"]["dice_mean"]["low"] <= m["dice_mean"] <= m["ci"]["dice_mean"]["high"]
    assert m["ci"]["hd95_mean"]["low"] == pytest.approx(2.0)


# ---- Grad-CAM ------------------------------------------------------------------------------------------------------


def _tiny_cnn(dim: int) -> nn.Module:
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if dim == 2 else nn.AdaptiveAvgPool3d
    torch.manual_seed(0)
    return nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU(inplace=True), conv(4, 8, 3, padding=1),
                         nn.ReLU(inplace=True), pool(1), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("dim", [2, 3])
def test_grad_cam_shapes(dim):
    model = _tiny_cnn(dim).train()
    x = torch.randn(3, 1, *([12] * dim))
    maps = grad_cam_maps(model, x)
    assert maps.shape == (3, 1, *([12] * dim))
    assert maps.min() >= 0 and maps.max() <= 1 and float(maps.std()) > 0
    assert model.training and model[1].inplace  # state restored
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())  # hooks removed
    # per-sample maps equal single-image maps (each image uses its own predicted class)
    np.testing.assert_allclose(grad_cam_maps(model, x[1:2])[0], maps[1], atol=1e-5)
    assert grad_cam_maps(model, x, target_layer="0", class_idx=[0, 1, 2]).shape == maps.shape


# ---- plots and report ----------------------------------------------------------------------------------------------


def _is_png(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_SIGNATURE


def test_classification_plots_and_report(tmp_path):
    y, p = _random_probs(60, 3, seed=7)
    classes = ["normal", "benign $x_1$", "<b>malignant</b>"]  # markup in a class name must be escaped
    m = with_confidence_intervals(classification_metrics(y, p, classes), y, p, n_boot=200)
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,train_loss,val_loss,val_accuracy,note\n1,1.0,1.1,0.5,a\n2,0.7,0.9,0.6,b\n3,0.5,0.8,0.7,c\n")
    images = np.random.default_rng(0).normal(size=(6, 1, 16, 16))
    cams = grad_cam_maps(_tiny_cnn(2), torch.from_numpy(images).float())
    plots = {
        "roc": plot_roc_curves(y, p, classes, tmp_path / "roc.png"),
        "confusion_matrix": plot_confusion_matrix(m["confusion_matrix"], classes, tmp_path / "cm.png"),
        "training_curves": plot_training_curves(csv, tmp_path / "curves.png"),
        "samples": plot_sample_predictions(images, y[:6], p[:6], classes, tmp_path / "samples.png"),
        "gradcam": plot_gradcam_grid(images, cams, tmp_path / "gradcam.png"),
    }
    for path in plots.values():
        assert _is_png(path) and (tmp_path / path).stat().st_size > 1000
    html_path = write_report(
        tmp_path / "report", title="Lesion classifier", task="classification", metrics=m, plots=plots,
        model_info={"architecture": "DenseNet121", "code_version": "abc123", "config": {"lr": 1e-3}},
        data_info={"n_patients": 8, "content_hash": "sha256:feed", "patients": ["PSEUDO-0001", "PSEUDO-0002"]},
    )
    doc = html_path.read_text()
    acc = f"{m['accuracy']:.2f} (95% CI {m['ci']['accuracy']['low']:.2f}\u2013{m['ci']['accuracy']['high']:.2f})"
    assert f"Accuracy {acc}" in doc and "on 60 test images from 8 patients" in doc
    assert 'src="http' not in doc and "<script" not in doc and "<link" not in doc
    assert doc.count('src="data:image/png;base64,') == 5
    assert "&lt;b&gt;malignant&lt;/b&gt;" in doc and "<b>malignant</b>" not in doc
    assert "sha256:feed" in doc and "abc123" in doc and "PSEUDO-0001" not in doc
    back = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert back["metrics"]["accuracy"] == pytest.approx(m["accuracy"])
    assert back["metrics"]["ci"]["auroc"]["low"] == pytest.approx(m["ci"]["auroc"]["low"])
    md = markdown_summary(m, "classification")
    assert "| Accuracy |" in md and f"{m['accuracy']:.2f}" in md


def test_segmentation_plots_and_report(tmp_path):
    pred, true = _boxes()
    m = with_confidence_intervals(segmentation_metrics(pred, true), n_boot=200)
    images = np.random.default_rng(1).normal(size=(3, 1, 32, 32))
    vol = np.random.default_rng(2).normal(size=(2, 1, 8, 32, 32))
    vmask = np.zeros((2, 1, 8, 32, 32), int)
    vmask[:, 0, 2:6, 8:20, 8:20] = 1
    plots = {
        "samples": plot_segmentation_samples(images, true, pred, tmp_path / "seg.png", dice=m["per_sample"]["dice"]),
        "samples3d": plot_segmentation_samples(vol, vmask, np.roll(vmask, 2, axis=-1), tmp_path / "seg3d.png"),
    }
    assert all(_is_png(v) for v in plots.values())
    html_path = write_report(tmp_path / "r", title="Organ segmentation", task="segmentation", metrics=m,
                             plots=plots, model_info={}, data_info={"unit": "slices"})
    doc = html_path.read_text()
    assert f"Mean Dice {m['dice_mean']:.2f}" in doc and "on 3 test slices" in doc
    assert "not recorded" in doc  # patient count, content hash and code version missing
    back = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert back["metrics"]["per_sample"]["hd95"][1] is None  # NaN written as null
    assert "Mean Dice" in markdown_summary(m, "segmentation")
