"""`augment_store`: GAN -> samples -> quality -> memorisation gate -> synthetic/ with provenance (or nothing)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medpipe.gan.augment import AugmentConfig, MemorisationGateError, augment_store, split_images
from medpipe.gan.config import GanConfig
from medpipe.gan.synthetic import read_synthetic, synthetic_provenance
from medpipe.store import content_hash, open_store
from training_store import make_2d_store

TINY = AugmentConfig(gan=GanConfig(epochs=2, width=8, latent_dim=16, batch_size=16, device="cpu"),
                     n_per_class=12, seed=3, classifier_epochs=1)


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads only contend on 2 cores
    try:
        tmp = tmp_path_factory.mktemp("augment")
        store = make_2d_store(str(tmp / "s.zarr"), n=96, size=16)
        before = content_hash(open_store(store))
        result = augment_store(store, tmp / "out", TINY)
        yield store, result, before, tmp
    finally:
        torch.set_num_threads(threads)


def test_publishes_samples_with_provenance_and_leaves_real_data_alone(augmented):
    store, result, before, _ = augmented
    assert result.published and result.n_samples == 24
    images, labels, provenance = read_synthetic(store)
    train, _ = split_images(store, "train")
    assert images.shape == (24, *train.shape[1:]) and images.dtype == np.float32
    assert train.min() - 1e-6 <= images.min() and images.max() <= train.max() + 1e-6  # the store's value range
    assert sorted(np.bincount(labels).tolist()) == [12, 12]
    assert provenance["seed"] == 3 and provenance["n_per_class"] == 12 and len(provenance["generator_sha256"]) == 64
    assert provenance["trained_on_content_hash"] == before == content_hash(open_store(store))
    report = json.loads(result.report.read_text())
    assert np.isfinite(report["quality"]["frechet_distance"]["fake"])
    assert report["memorisation"]["gate"]["passed"] and (result.out_dir / "samples.png").stat().st_size > 0
    tstr = report["quality"]["tstr"]  # train on synthetic, test on real; beside train on real, test on real
    assert set(tstr["tstr"]) == set(tstr["trtr"]) == {"accuracy", "macro_f1"}


def test_same_seed_same_samples(augmented):
    store, result, _, tmp = augmented
    first, _, _ = read_synthetic(store)
    augment_store(store, tmp / "again", TINY, generator=result.generator, classifier=result.classifier)
    again, _, _ = read_synthetic(store)
    np.testing.assert_array_equal(first, again)


def test_a_generator_that_copies_training_images_is_not_published(augmented, monkeypatch):
    store, result, _, tmp = augmented
    before = synthetic_provenance(store)
    train, train_labels = split_images(store, "train")

    def copying(checkpoint, n_per_class, seed, device="cpu"):
        return train[:24].copy(), train_labels[:24].copy()

    monkeypatch.setattr("medpipe.gan.augment.generate", copying)
    with pytest.raises(MemorisationGateError, match="not written"):
        augment_store(store, tmp / "copy", TINY, generator=result.generator, classifier=result.classifier)
    assert synthetic_provenance(store) == before  # the published set is unchanged
    assert (tmp / "copy" / "memorisation.png").exists()


def test_cli_augment_runs_the_flow_and_refuses_bad_stores_in_one_line(prefect_api, tmp_path):
    from typer.testing import CliRunner

    from medpipe.cli import app

    runner = CliRunner()
    store = make_2d_store(str(tmp_path / "cli.zarr"), n=64, size=16)
    config = tmp_path / "augment.yaml"
    config.write_text("augment:\n  classifier_epochs: 1\n  gan:\n    latent_dim: 16\n    batch_size: 16\n")
    result = runner.invoke(app, ["augment", store, "--out", str(tmp_path / "run"), "-c", str(config), "--epochs",
                                 "1", "--width", "8", "--n-per-class", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "16 synthetic samples" in result.output and synthetic_provenance(store)["n_per_class"] == 8
    experiment = runner.invoke(app, ["augment-experiment", store, "--out", str(tmp_path / "exp"), "--fractions", "1",
                                     "--seeds", "0,1", "--epochs", "1"])
    assert experiment.exit_code == 0, experiment.output
    assert "real+synthetic at 1 of the train patients" in experiment.output
    assert (tmp_path / "exp" / "experiment.csv").read_text().count("\n") == 1 + 4 * 5  # header + arms x metrics
    unlabelled = make_2d_store(str(tmp_path / "unlabelled.zarr"), n=32, size=16)
    root = open_store(unlabelled, mode="a")
    root["training/labels"][...] = -1
    bad = runner.invoke(app, ["augment", unlabelled, "--out", str(tmp_path / "bad"), "--epochs", "1"])
    assert bad.exit_code == 2 and "labels" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert synthetic_provenance(unlabelled) is None
    none_yet = runner.invoke(app, ["augment-experiment", unlabelled, "--out", str(tmp_path / "none")])
    assert none_yet.exit_code == 2 and "medpipe augment" in none_yet.output


def test_compare_arms_gives_paired_verdicts():
    from medpipe.gan.experiment import compare_arms

    def run(arm, seed, auroc):
        return {"fraction": 0.5, "seed": seed, "arm": arm, "scores": {"auroc": {"value": auroc}}}

    runs = [run("real", s, 0.70 + 0.01 * s) for s in range(3)]
    runs += [run("real+synthetic", s, 0.80 + 0.01 * s + 0.002 * (s == 1)) for s in range(3)]  # +0.10 each seed
    runs += [run("real+classic", s, 0.60 + 0.01 * s - 0.002 * (s == 2)) for s in range(3)]  # -0.10 each seed
    runs += [run("all", s, 0.70 + 0.01 * s + (0.05 if s == 0 else -0.05 if s == 1 else 0.0)) for s in range(3)]
    rows = {r["arm"]: r for r in compare_arms(runs) if r["metric"] == "auroc"}
    assert rows["real+synthetic"]["verdict"] == "helps" and abs(rows["real+synthetic"]["diff_vs_real"] - 0.1007) < 1e-3
    assert rows["real+classic"]["verdict"] == "hurts"
    assert rows["all"]["verdict"] == "no clear difference"
    assert "verdict" not in rows["real"]


def test_experiment_runs_every_arm_on_the_real_test_split(augmented):
    from medpipe.gan.experiment import ExperimentConfig, augmentation_experiment
    from medpipe.training.config import TrainConfig

    store, _, _, tmp = augmented
    config = ExperimentConfig(fractions=[0.5, 1.0], seeds=[0, 1], n_boot=200,
                              arms=["real", "real+synthetic", "real+classic", "all", "synthetic-only"],
                              train=TrainConfig(task="classify", epochs=1, batch_size=16, device="cpu"))
    result = augmentation_experiment(store, tmp / "experiment", config)
    assert len(result["runs"]) == 2 * 2 * 5
    n_test = {r["n_test"] for r in result["runs"]}
    assert len(n_test) == 1  # every arm is scored on the same real test split
    for run in result["runs"]:
        for metric in ("accuracy", "sensitivity", "specificity", "f1_macro", "auroc"):
            entry = run["scores"][metric]
            assert entry["low"] <= entry["value"] <= entry["high"] or not np.isfinite(entry["low"])
    assert (tmp / "experiment" / "experiment.png").stat().st_size > 0
    assert result["caveats"] and result["summary"]


def test_augment_artifact_when_too_few_held_out_images_for_the_metrics():
    """Under k + 2 held-out images the quality metrics are None: the artifact says n/a instead of crashing the flow."""
    from flows.augment import augment_markdown

    memo = {"flagged_count": 0, "flagged_fraction": 0.0,
            "gate": {"passed": True, "max_flagged_fraction": 0.01, "rule": "chance"}}
    summary = {"frechet_distance": {"fake": None, "real_test": None}, "prdc": {"fake": None, "real_test": None},
               "memorisation": memo, "n_samples": 4, "published": True, "out_dir": "o", "report": "r"}
    text = augment_markdown(summary)
    assert "| Fréchet distance | n/a" in text and "| coverage | n/a" in text
