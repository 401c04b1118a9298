"""Synthetic image quality and memorisation checks (medpipe.gan.quality, medpipe.gan.memorisation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medpipe.gan import GanError
from medpipe.gan.memorisation import chance_flagged_fraction, memorisation_check, pixel_vectors, plot_memorisation
from medpipe.gan.quality import (feature_extractor, frechet_distance, mode_collapse, per_class_diversity,
                                 pooled_pixel_extractor, precision_recall_density_coverage, quality_report)
from tests.training_store import make_2d_store, synthetic_2d


@pytest.fixture(scope="module")
def real():
    """(train images, train labels, test images, test labels) of the synthetic 2D data."""
    images, labels = synthetic_2d(96, size=32, seed=0)
    return images[:64], labels[:64], images[64:], labels[64:]


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    """Penultimate features of a small-cnn trained one epoch on the train split of a synthetic store."""
    from medpipe.training.config import TrainConfig
    from medpipe.training.engine import train

    root = tmp_path_factory.mktemp("quality")
    url = make_2d_store(str(root / "store.zarr"), n=64, size=32)
    result = train(url, root / "run", TrainConfig(epochs=1, batch_size=32, early_stopping_patience=0), progress=False)
    return feature_extractor(result.best_path)


def _gaussian(n: int, d: int, seed: int, mean: float | np.ndarray = 0.0, scale: float = 1.0) -> np.ndarray:
    return mean + scale * np.random.default_rng(seed).normal(size=(n, d))


def test_identical_sets_score_perfect():
    x = _gaussian(300, 8, 0)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    prdc = precision_recall_density_coverage(x, x.copy(), k=5)
    assert prdc["precision"] == prdc["recall"] == prdc["coverage"] == 1.0
    assert prdc["density"] > 0.9


def test_disjoint_sets_score_zero():
    x = _gaussian(300, 8, 0)
    far = _gaussian(300, 8, 1, mean=100.0)
    assert frechet_distance(x, far) > 0.9 * 8 * 100.0**2
    prdc = precision_recall_density_coverage(x, far)
    assert prdc == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_frechet_distance_of_known_gaussians():
    # N(0, I) vs N(mu, I): |mu|^2 = 1 + 4 = 5; N(0, I_4) vs N(0, 4 I_4): Tr(I + 4I - 2 * 2I) = 4
    x = _gaussian(20000, 4, 0)
    assert frechet_distance(x, _gaussian(20000, 4, 1, mean=np.array([1.0, 2.0, 0.0, 0.0]))) == pytest.approx(5.0, abs=0.1)
    assert frechet_distance(x, _gaussian(20000, 4, 2, scale=2.0)) == pytest.approx(4.0, abs=0.15)


def test_inputs_are_checked():
    with pytest.raises(GanError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(GanError):
        precision_recall_density_coverage(np.zeros((5, 3)), np.zeros((50, 3)), k=5)


def test_mode_collapse_flagged_for_one_repeated_image(real):
    train, train_y, _, _ = real
    fx = pooled_pixel_extractor(8)
    fresh, fresh_y = synthetic_2d(64, size=32, seed=5)
    healthy = mode_collapse(fx(train), fx(fresh), train_y, fresh_y)
    assert not healthy["mode_collapse"], healthy
    assert all(0.7 < c["diversity_ratio"] < 1.4 for c in healthy["classes"].values())

    repeated = np.repeat(train[:1], 40, axis=0)
    collapsed = mode_collapse(fx(train), fx(repeated), train_y, np.arange(40) % 2)
    assert collapsed["mode_collapse"] and collapsed["collapsed_classes"] == ["0", "1"]
    assert all(c["duplicate_fraction"] == 1.0 and c["diversity_ratio"] == 0.0 for c in collapsed["classes"].values())
    missing = mode_collapse(fx(train), fx(fresh[fresh_y == 0]), train_y, fresh_y[fresh_y == 0])
    assert missing["collapsed_classes"] == ["1"] and "no synthetic samples" in missing["classes"]["1"]["reasons"]

    stats = per_class_diversity(fx(train), train_y)
    assert set(stats) == {"0", "1"} and stats["0"]["n"] == int((train_y == 0).sum())
    assert stats["0"]["mean_pairwise_distance"] > stats["0"]["median_nn_distance"] > 0


def test_feature_extractor_from_checkpoint(extractor, real):
    train = real[0]
    feats = extractor(train)
    assert feats.shape == (64, 256) and np.isfinite(feats).all()
    extractor.batch_size = 7
    np.testing.assert_allclose(extractor(train[:20]), feats[:20], rtol=1e-5, atol=1e-6)
    extractor.batch_size = 64
    assert "small-cnn" in extractor.description
    with pytest.raises(GanError, match="channels"):
        extractor(np.zeros((2, 3, 32, 32), np.float32))


def test_quality_report_is_json_and_separates_good_from_collapsed(extractor, real):
    train, train_y, test, test_y = real
    fresh, fresh_y = synthetic_2d(32, size=32, seed=11)
    good = quality_report(train, test, fresh, extractor, train_labels=train_y, test_labels=test_y, fake_labels=fresh_y)
    bad = quality_report(train, test, np.repeat(train[:1], 32, axis=0), extractor, train_labels=train_y,
                         test_labels=test_y, fake_labels=np.arange(32) % 2)
    json.dumps(good, allow_nan=False)
    json.dumps(bad, allow_nan=False)
    assert good["n"] == {"real_train": 64, "real_test": 32, "fake": 32, "matched": 32}
    assert not good["diversity"]["mode_collapse"] and bad["diversity"]["mode_collapse"]
    assert bad["frechet_distance"]["fake"] > good["frechet_distance"]["fake"]
    assert bad["prdc"]["fake"]["recall"] == 0.0 < good["prdc"]["fake"]["recall"]
    assert set(good["per_class"]) == {"0", "1"}


def test_pixel_vectors_distance_is_correlation_distance():
    a = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
    v = pixel_vectors(np.concatenate([a, 3 * a + 1, -a]))
    assert np.linalg.norm(v[0] - v[1]) == pytest.approx(0.0, abs=1e-5)  # brightness/contrast change: a copy
    assert np.linalg.norm(v[0] - v[2]) == pytest.approx(2.0, abs=1e-5)  # sqrt(2 (1 - r)), r = -1


def test_memorisation_flags_noised_copies_and_passes_fresh_samples(extractor, real, tmp_path):
    train, _, test, _ = real
    rng = np.random.default_rng(3)
    picks = rng.choice(len(train), 40)
    copies = (train[picks] + rng.normal(0, 0.01, train[picks].shape)).astype(np.float32)
    copied = memorisation_check(train, test, copies, extractor)
    assert copied["flagged"] == list(range(40)) and copied["flagged_fraction"] == 1.0
    assert not copied["gate"]["passed"]
    assert copied["spaces"]["pixel"]["nn_index"] == picks.tolist()

    fresh = synthetic_2d(40, size=32, seed=21)[0]
    clean = memorisation_check(train, test, fresh, extractor)
    assert clean["gate"]["passed"], clean["flagged_fraction"]
    pixel = clean["spaces"]["pixel"]
    assert pixel["threshold"] == min(pixel["test_distances"]) > 0
    assert len(pixel["distances"]) == len(clean["spaces"]["feature"]["nn_index"]) == 40
    assert not memorisation_check(train, test, fresh, max_flagged_fraction=-1.0)["gate"]["passed"]
    json.dumps(copied, allow_nan=False)
    leaky = memorisation_check(train, np.concatenate([test, train[:1]]), fresh)
    assert leaky["spaces"]["pixel"]["threshold"] < 1e-6 and "pixel space" in leaky["warnings"][0]

    png = plot_memorisation(copies, train, copied["flagged"], copied["spaces"]["pixel"]["nn_index"],
                            tmp_path / "mem.png", distances=copied["spaces"]["pixel"]["distances"])
    none_flagged = plot_memorisation(fresh, train, [], pixel["nn_index"], tmp_path / "closest.png", max_rows=3)
    for path in (png, none_flagged):
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_chance_gate_rarely_fails_an_ideal_generator():
    # fresh samples and test images are exchangeable: simulate their nearest-train distances directly (one space)
    rng = np.random.default_rng(0)
    n_test, n_fake, trials = 30, 200, 2000
    thresholds = rng.exponential(size=(trials, n_test)).min(axis=1, keepdims=True)
    fractions = (rng.exponential(size=(trials, n_fake)) < thresholds).mean(axis=1)
    limit = chance_flagged_fraction(n_test, n_fake, n_spaces=1, alpha=0.05)
    assert (fractions > limit).mean() <= 0.05
    assert limit < 0.5
