"""Baselines beside every model: majority class, intensity logistic regression, Otsu threshold (synthetic stores)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from medpipe.config import StoreConfig
from medpipe.evaluation.baselines import (
    C_GRID,
    FEATURE_NAMES,
    classification_baselines,
    intensity_features,
    majority_class,
    otsu_masks,
    paired_differences,
    segmentation_baselines,
)
from medpipe.evaluation.report import markdown_summary, network_vs_baselines
from medpipe.store import ATTRS_KEY
from medpipe.task import Task
from tests.training_store import write_store

SMALL_CHUNKS = StoreConfig(chunk_bytes=4096)  # 4 samples of 16x16 float32 per chunk: reads cross many chunks
SIZE = 16


def _splits(n: int, seed: int, fractions=(0.6, 0.2, 0.2)) -> np.ndarray:
    return np.random.default_rng(seed).choice(3, size=n, p=list(fractions)).astype(np.int8)


def _store(tmp_path, name, images, labels, split, masks=None) -> str:
    return write_store(str(tmp_path / name), images.astype(np.float32), labels, masks=masks, split=split,
                       store_config=SMALL_CHUNKS)


def _test_rows(url: str) -> np.ndarray:
    return np.flatnonzero(np.asarray(zarr.open_group(url)["samples/split"][...]) == 2)


def _brightness_images(labels: np.ndarray, seed: int, shift: float) -> np.ndarray:
    """Noise images whose mean is 0.4 (+shift for class 1)."""
    rng = np.random.default_rng(seed)
    imgs = 0.4 + rng.normal(0, 0.1, (labels.size, 1, SIZE, SIZE))
    return imgs + shift * labels[:, None, None, None]


def test_intensity_features_by_hand():
    img = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    f = dict(zip(FEATURE_NAMES, intensity_features(img)[0]))
    assert f["mean"] == pytest.approx(7.5) and f["std"] == pytest.approx(np.arange(16).std())
    assert (f["min"], f["max"]) == (0.0, 15.0) and f["p50"] == pytest.approx(7.5)
    assert f["skewness"] == pytest.approx(0.0, abs=1e-12) and f["frac_above_mean_2sd"] == 0.0
    assert intensity_features(np.zeros((0, 1, 4, 4))).shape == (0, len(FEATURE_NAMES))
    # a constant image does not divide by zero
    assert np.isfinite(intensity_features(np.ones((1, 1, 4, 4)))).all()


def test_majority_class_from_train_ignores_unlabelled():
    assert majority_class(np.array([1, 1, 0, -1, -1, -1]), 2) == 1
    assert majority_class(np.array([0, 1]), 2) == 0  # tie: lowest index
    with pytest.raises(ValueError):
        majority_class(np.array([-1, -1]), 2)


def test_logistic_regression_separates_when_intensity_does(tmp_path):
    n = 160
    labels = np.random.default_rng(1).permutation(np.arange(n) % 2).astype(np.int64)
    url = _store(tmp_path, "bright.zarr", _brightness_images(labels, 2, 0.15), labels, _splits(n, 3))
    test = _test_rows(url)
    out = classification_baselines(url, test, labels[test], ["none", "lesion"], n_boot=200)
    lr = out["intensity_logreg"]
    assert lr["metrics"]["accuracy"] >= 0.95 and lr["metrics"]["auroc"] >= 0.99
    assert lr["tuning"]["chosen_on"] == "val" and lr["tuning"]["C"] in C_GRID
    assert set(lr["tuning"]["val_log_loss"]) == {f"{c:g}" for c in C_GRID}
    ci = lr["metrics"]["ci"]["accuracy"]
    assert ci["low"] <= lr["metrics"]["accuracy"] <= ci["high"] and ci["n_boot"] == 200
    assert out["majority"]["metrics"]["auroc"] == pytest.approx(0.5)  # constant scores


def test_logistic_regression_near_chance_when_intensity_cannot(tmp_path):
    n = 240
    rng = np.random.default_rng(4)
    labels = rng.permutation(np.arange(n) % 2).astype(np.int64)
    # the same intensity distribution for both classes; class 1 images have their pixels rearranged into a ramp
    # (a permutation of the same values): obvious to the eye, invisible to intensity statistics
    images = _brightness_images(labels, 5, 0.0)
    before = intensity_features(images)
    for i in np.flatnonzero(labels == 1):
        images[i, 0] = np.sort(images[i, 0].ravel()).reshape(SIZE, SIZE)  # same values, spatially ordered
    np.testing.assert_allclose(intensity_features(images), before)  # statistics see no difference
    url = _store(tmp_path, "chance.zarr", images, labels, _splits(n, 6))
    test = _test_rows(url)
    out = classification_baselines(url, test, labels[test], ["none", "lesion"], n_boot=300)
    m = out["intensity_logreg"]["metrics"]
    assert m["accuracy"] < 0.7 and m["ci"]["auroc"]["low"] < 0.5 < m["ci"]["auroc"]["high"]


def test_majority_comes_from_train_not_test(tmp_path):
    n = 120
    split = np.array([0] * 80 + [1] * 20 + [2] * 20, dtype=np.int8)
    labels = np.zeros(n, dtype=np.int64)
    labels[:20] = 1  # train: 60 of 80 are class 0
    labels[100:116] = 1  # test: 16 of 20 are class 1
    url = _store(tmp_path, "maj.zarr", _brightness_images(labels, 7, 0.0), labels, split)
    test = _test_rows(url)
    out = classification_baselines(url, test, labels[test], ["none", "lesion"], n_boot=100)
    assert out["majority"]["tuning"]["class"] == "none"
    assert out["majority"]["metrics"]["accuracy"] == pytest.approx(4 / 20)


def test_tuning_never_sees_test_and_empty_val_is_reported(tmp_path):
    n = 150
    labels = np.random.default_rng(8).permutation(np.arange(n) % 2).astype(np.int64)
    split = _splits(n, 9)
    images = _brightness_images(labels, 10, 0.05)
    url_a = _store(tmp_path, "a.zarr", images, labels, split)
    scrambled = images.copy()
    test = np.flatnonzero(split == 2)
    scrambled[test] = np.random.default_rng(11).normal(0.9, 0.5, scrambled[test].shape)  # test rows changed only
    url_b = _store(tmp_path, "b.zarr", scrambled, labels, split)
    a = classification_baselines(url_a, test, labels[test], ["none", "lesion"], n_boot=50)
    b = classification_baselines(url_b, test, labels[test], ["none", "lesion"], n_boot=50)
    assert a["intensity_logreg"]["tuning"] == b["intensity_logreg"]["tuning"]
    assert a["intensity_logreg"]["metrics"]["accuracy"] != b["intensity_logreg"]["metrics"]["accuracy"]

    no_val = np.where(split == 1, 0, split).astype(np.int8)
    url_c = _store(tmp_path, "c.zarr", images, labels, no_val)
    c = classification_baselines(url_c, test, labels[test], ["none", "lesion"], n_boot=50)
    tuning = c["intensity_logreg"]["tuning"]
    assert tuning["chosen_on"] == "default" and tuning["C"] == 1.0 and "empty" in tuning["note"]


def _disk_store(tmp_path, name, polarity: float, n: int = 40):
    rng = np.random.default_rng(12)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    masks = np.zeros((n, 1, SIZE, SIZE), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(5, SIZE - 5, 2)
        masks[i, 0] = np.hypot(yy - cy, xx - cx) < rng.uniform(2.5, 4.5)
    images = 0.5 + polarity * 0.3 * masks + rng.normal(0, 0.04, masks.shape)
    labels = np.ones(n, dtype=np.int64)
    url = _store(tmp_path, name, images, labels, _splits(n, 13, (0.5, 0.2, 0.3)), masks=masks)
    return url, masks


@pytest.mark.parametrize("polarity,rule", [(1.0, "above"), (-1.0, "below")])
def test_otsu_polarity_chosen_on_train(tmp_path, polarity, rule):
    url, masks = _disk_store(tmp_path, f"otsu{rule}.zarr", polarity)
    test = _test_rows(url)
    out = segmentation_baselines(url, test, masks[test], 2, n_boot=100)["otsu"]
    assert out["tuning"]["rule"] == rule and out["tuning"]["chosen_on"] == "train"
    assert out["metrics"]["dice_mean"] > 0.9 and out["metrics"]["hd95_units"] == "pixels"
    assert out["tuning"]["train_mean_dice"][rule] > 0.9
    # the other polarity labels the background: far worse on train
    other = "below" if rule == "above" else "above"
    assert out["tuning"]["train_mean_dice"][other] < 0.2


def test_otsu_masks_edge_cases():
    assert otsu_masks(np.ones((2, 1, 8, 8)), "above").sum() == 0  # constant image: empty
    two = np.zeros((1, 1, 8, 8))
    two[0, 0, :, 4:] = 1.0
    np.testing.assert_array_equal(otsu_masks(two, "above")[0, 0], two[0, 0] > 0.5)
    np.testing.assert_array_equal(otsu_masks(two, "below")[0, 0], two[0, 0] < 0.5)
    with pytest.raises(ValueError):
        otsu_masks(two, "sideways")


def test_paired_difference_and_sentence(tmp_path):
    n = 160
    labels = np.random.default_rng(14).permutation(np.arange(n) % 2).astype(np.int64)
    url = _store(tmp_path, "pair.zarr", _brightness_images(labels, 15, 0.0), labels, _splits(n, 16))
    test = _test_rows(url)
    y = labels[test]
    perfect = np.stack([1.0 - y, y.astype(float)], axis=1) * 0.8 + 0.1
    out = classification_baselines(url, test, y, ["none", "lesion"], model_prob=perfect, n_boot=200)
    diff = out["majority"]["difference"]["accuracy"]
    maj_acc = out["majority"]["metrics"]["accuracy"]
    assert diff["value"] == pytest.approx(1.0 - maj_acc) and diff["low"] > 0
    model = {"task": Task.classify, "n": len(y), "accuracy": 1.0, "f1_macro": 1.0, "auroc": 1.0}
    sentence = network_vs_baselines(model, out)
    assert "strongest baseline" in sentence and "adds something" in sentence
    md = markdown_summary(model, Task.classify, out)
    assert "| metric | model | Majority class | Intensity logistic regression |" in md
    # the same predictions as the baseline: difference exactly 0 with a degenerate CI, "not demonstrably better"
    same = paired_differences(Task.classify, y, perfect, perfect, n_boot=100)
    assert same["auroc"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    worse = {"majority": {**out["majority"], "difference": {"auroc": {"value": 0.0, "low": -0.1, "high": 0.1}}}}
    assert "not demonstrably better" in network_vs_baselines({**model, "auroc": 0.5}, worse)


def test_segmentation_difference_is_paired(tmp_path):
    per_model = {"dice": [0.9, 0.8, 0.7, 0.6], "iou": [0.8, 0.7, 0.6, 0.5], "hd95": [1.0, 2.0, float("nan"), 3.0]}
    per_base = {"dice": [0.5, 0.4, 0.3, 0.2], "iou": [0.4, 0.3, 0.2, 0.1], "hd95": [2.0, 3.0, 4.0, float("nan")]}
    d = paired_differences(Task.segment, per_model, per_base, n_boot=200)
    assert d["dice_mean"] == {"value": pytest.approx(0.4), "low": pytest.approx(0.4), "high": pytest.approx(0.4)}
    assert d["hd95_mean"]["value"] == pytest.approx(-1.0)  # over the 2 cases defined for both


def test_empty_train_split_gives_no_baselines(tmp_path):
    n = 16
    labels = np.arange(n) % 2
    split = np.array([1] * 8 + [2] * 8, dtype=np.int8)
    url = _store(tmp_path, "notrain.zarr", _brightness_images(labels, 17, 0.0), labels, split)
    assert classification_baselines(url, _test_rows(url), labels[8:], ["none", "lesion"], n_boot=10) == {}
    attrs = zarr.open_group(url).attrs[ATTRS_KEY]
    assert attrs["splits"]["train"] == 0
