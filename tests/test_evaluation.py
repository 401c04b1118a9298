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
from medpipe.evaluation import mean_foreground_dice, training_spacing
from medpipe.evaluation.bootstrap import batched_accuracy, batched_auroc, batched_f1_macro
from medpipe.evaluation.report import PNG_SIGNATURE
from medpipe.task import Task

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
        tmp_path / "report", title="Lesion classifier", task=Task.classify, metrics=m, plots=plots,
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
    md = markdown_summary(m, Task.classify)
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
    html_path = write_report(tmp_path / "r", title="Organ segmentation", task=Task.segment, metrics=m,
                             plots=plots, model_info={}, data_info={"unit": "slices"})
    doc = html_path.read_text()
    assert f"Mean Dice {m['dice_mean']:.2f}" in doc and "on 3 test slices" in doc
    assert "not recorded" in doc  # patient count, content hash and code version missing
    back = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert back["metrics"]["per_sample"]["hd95"][1] is None  # NaN written as null
    assert "Mean Dice" in markdown_summary(m, Task.segment)


# ---- Task enum, mean foreground Dice, spacing ----------------------------------------------------------------------


def test_metrics_carry_the_task_enum_and_reject_old_names(tmp_path):
    y, p = _random_probs(20, 2, seed=1)
    m = classification_metrics(y, p, ["none", "lesion"])
    assert m["task"] is Task.classify
    pred, true = _boxes()
    assert segmentation_metrics(pred, true)["task"] is Task.segment
    with pytest.raises(ValueError, match="unknown task"):
        with_confidence_intervals({**m, "task": "classification"}, y, p)
    with pytest.raises(ValueError):
        write_report(tmp_path, title="t", task="classification", metrics=m, plots={}, model_info={}, data_info={})
    assert json.loads(json.dumps(to_jsonable({"task": Task.segment}))) == {"task": "segment"}


def test_mean_foreground_dice_by_hand():
    true = np.zeros((2, 1, 8, 8), dtype=np.int64)
    pred = np.zeros_like(true)
    true[0, 0, :4, :4] = 1  # 16 px
    pred[0, 0, :4, :2] = 1  # 8 px inside: Dice 2*8/24
    # sample 1: both empty -> 1.0 by convention
    assert mean_foreground_dice(pred, true, 2) == pytest.approx((2 * 8 / 24 + 1.0) / 2)
    # three classes: class 2 absent everywhere (1.0 for both samples), class 1 as above
    assert mean_foreground_dice(pred, true, 3) == pytest.approx((2 * 8 / 24 + 1.0 + 1.0 + 1.0) / 4)
    # a prediction where the truth is empty scores 0
    assert mean_foreground_dice(true[:1], np.zeros_like(true[:1]), 2) == 0.0
    # (N, *spatial) without the channel axis gives the same; matches the report's mean Dice
    assert mean_foreground_dice(pred[:, 0], true[:, 0], 2) == mean_foreground_dice(pred, true, 2)
    assert mean_foreground_dice(pred, true, 2) == pytest.approx(segmentation_metrics(pred, true)["dice_mean"])
    assert math.isnan(mean_foreground_dice(np.zeros((0, 1, 4, 4)), np.zeros((0, 1, 4, 4)), 2))
    with pytest.raises(ValueError):
        mean_foreground_dice(pred, true[:1], 2)


def test_training_spacing_resolution_order():
    three = {"training_spacing": [2.0, 0.7, 0.7], "config": {"preprocess": {"target_spacing": [3.0, 1.0, 1.0]}}}
    assert training_spacing(three, 3).spacing == (2.0, 0.7, 0.7) and training_spacing(three, 3).units == "mm"
    target_only = {"config": {"preprocess": {"target_spacing": [3.0, 1.0, 1.0]}}}
    assert training_spacing(target_only, 3).spacing == (3.0, 1.0, 1.0)
    unknown = training_spacing({"config": {"preprocess": {"target_spacing": None}}}, 3)
    assert unknown.spacing is None and unknown.units == "voxels" and "voxels" in unknown.source
    # 2D: pixels unless the store records a 2-value spacing; a 3D target spacing never applies
    assert training_spacing(target_only, 2).units == "pixels"
    assert training_spacing({"training_spacing": [0.4, 0.5]}, 2).spacing == (0.4, 0.5)
    assert training_spacing({"training_spacing": [2.0, 0.4, 0.5]}, 2).spacing is None


def test_hd95_units_follow_spacing():
    pred, true = _boxes()
    assert segmentation_metrics(pred, true)["hd95_units"] == "pixels"
    assert segmentation_metrics(pred[:, :, None].repeat(3, 2), true[:, :, None].repeat(3, 2))["hd95_units"] == "voxels"
    assert segmentation_metrics(pred, true, spacing=(0.5, 0.5))["hd95_units"] == "mm"
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(pred, true, spacing=(1.0, 0.5, 0.5))  # the old native, padded 3-vector on 2D


# ---- evaluate_checkpoint -------------------------------------------------------------------------------------------


def _fake_checkpoint(monkeypatch, tmp_path, store, meta, result):
    """evaluate_checkpoint with the checkpoint loading and the network's predictions replaced by fixed ones."""
    import medpipe.evaluation.evaluate as ev
    import medpipe.training.engine as engine
    from medpipe.store import store_attrs

    ckpt = tmp_path / "run" / "best.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(ev, "load_checked_model", lambda s, m: (None, meta, ckpt, ckpt.parent, store_attrs(s)))
    monkeypatch.setattr(engine, "predict", lambda *a, **k: result)


def _seg_store(tmp_path, spatial, attrs_extra):
    """A segmentation store of boxes on noise; the native spacing column is deliberately 3.0 (must not be used)."""
    import zarr

    from medpipe.store import ATTRS_KEY
    from tests.training_store import write_store

    rng = np.random.default_rng(0)
    n = 24
    masks = np.zeros((n, 1, *spatial), dtype=np.uint8)
    for i in range(n):
        lo = [int(rng.integers(1, s // 2)) for s in spatial]
        masks[(i, 0, *[slice(a, a + s // 3) for a, s in zip(lo, spatial)])] = 1
    images = (0.3 * masks + rng.normal(0, 0.05, masks.shape)).astype(np.float32)
    split = np.array([0] * 14 + [1] * 4 + [2] * 6, dtype=np.int8)
    url = write_store(str(tmp_path / "seg.zarr"), images, masks.reshape(n, -1).max(1).astype(np.int64), masks=masks,
                      split=split)
    root = zarr.open_group(url, mode="r+")
    root["samples/spacing"][...] = 3.0
    root.attrs[ATTRS_KEY] = {**root.attrs[ATTRS_KEY], **attrs_extra}
    test = np.flatnonzero(split == 2)
    true = masks[test]
    pred = np.roll(true, 2, axis=-1)  # every test prediction is the truth shifted 2 elements along x
    return url, {"task": "segment", "indices": test, "y_true": np.ones(len(test), np.int64),
                 "masks_true": true, "masks_pred": pred}


@pytest.mark.parametrize("spatial,attrs_extra,units,scale", [
    ((24, 24), {}, "pixels", 1.0),
    ((24, 24), {"training_spacing": [0.5, 0.25]}, "mm", 0.25),
    ((8, 16, 16), {}, "voxels", 1.0),
    ((8, 16, 16), {"config": {"preprocess": {"target_spacing": [2.5, 0.8, 0.4]}}}, "mm", 0.4),
    ((8, 16, 16), {"training_spacing": [2.0, 0.7, 0.6], "config": {"preprocess": {"target_spacing": [2.5, 0.8, 0.4]}}},
     "mm", 0.6),
])
def test_evaluate_segmentation_hd95_in_training_spacing(monkeypatch, tmp_path, spatial, attrs_extra, units, scale):
    url, result = _seg_store(tmp_path, spatial, attrs_extra)
    _fake_checkpoint(monkeypatch, tmp_path, url, {"task": "segment", "num_outputs": 2, "model_name": "fake"}, result)
    from medpipe.evaluation.evaluate import evaluate_checkpoint

    out = evaluate_checkpoint(url, tmp_path / "run", tmp_path / "report", n_boot=100)
    m = out["metrics"]
    assert m["task"] is Task.segment and m["hd95_units"] == units
    # a 2-element shift along x is 2 * dx in mm (the native spacing 3.0 must play no part)
    assert m["hd95_mean"] == pytest.approx(2.0 * scale)
    assert any(units in note for note in m["notes"])
    doc = (tmp_path / "report" / "report.html").read_text()
    assert f"in {units}" in doc and "Model vs baselines" in doc and "Otsu threshold" in doc
    back = json.loads((tmp_path / "report" / "metrics.json").read_text())
    otsu = back["baselines"]["otsu"]
    assert otsu["metrics"]["hd95_units"] == units and otsu["tuning"]["chosen_on"] == "train"
    assert otsu["metrics"]["dice_mean"] > 0.5  # boxes 0.3 above noise of sd 0.05: Otsu finds them


def test_evaluate_classification_report_has_roc_and_confusion_matrix(tmp_path):
    """Regression: the report left out ROC and confusion matrix when evaluation passed the task as 'classify'."""
    from medpipe.evaluation.evaluate import evaluate_checkpoint
    from medpipe.training.config import TrainConfig
    from medpipe.training.engine import train
    from tests.training_store import make_2d_store

    url = make_2d_store(str(tmp_path / "c.zarr"), n=96, size=32, radius=(7.0, 11.0))
    train(url, tmp_path / "run", TrainConfig(epochs=1, batch_size=32, early_stopping_patience=0), progress=False)
    out = evaluate_checkpoint(url, tmp_path / "run", tmp_path / "report", n_boot=100, device="cpu")
    doc = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Confusion matrix</h2>" in doc and "<h2>ROC curves</h2>" in doc
    assert 'alt="ROC curves"' in doc and 'alt="confusion matrix"' in doc
    assert "true \\ predicted" in doc  # the confusion matrix table
    assert doc.index("Model vs baselines") < doc.index("<h2>Confusion matrix</h2>")
    assert "Majority class" in doc and "Intensity logistic regression" in doc
    back = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert back["task"] == "classify" and back["metrics"]["task"] == "classify"
    assert set(back["baselines"]) == {"majority", "intensity_logreg"}
    assert back["baselines"]["intensity_logreg"]["tuning"]["chosen_on"] == "val"
    assert "## Model vs baselines" in out["markdown"] and "Majority class" in out["markdown"]
