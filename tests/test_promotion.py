"""Model promotion: a better model is promoted, a worse one refused, with known answers (a model with zeroed
weights scores AUROC 0.5, a model with its last layer negated scores 1 - AUROC), paired patient bootstrap."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from medpipe.errors import UserError
from medpipe.evaluation.metrics import classification_metrics
from medpipe.promotion import ModelScores, PromotionError, compare_models, paired_patient_bootstrap
from medpipe.task import Task
from medpipe.training.checkpoints import load_checkpoint, load_model, save_checkpoint
from medpipe.training.config import TrainConfig
from medpipe.store import read_sample_table, store_attrs
from medpipe.training.engine import predict, train
from medpipe.training.models import build_model
from training_store import make_3d_store, synthetic_2d, write_store

N_BOOT = 200


def _variant(good: str, out, change) -> str:
    """A copy of the run's best.pt with `change(payload)` applied (weights or metadata)."""
    payload = load_checkpoint(f"{good}/best.pt")
    change(payload)
    save_checkpoint(out / "best.pt", payload)
    return str(out)


def _zero(payload) -> None:
    payload["model"] = {k: v * 0 for k, v in payload["model"].items()}


def _invert(payload) -> None:
    """Negate the last linear layer: binary logits change sign, so the score order reverses exactly."""
    names = [k for k, v in payload["model"].items() if v.is_floating_point()][-2:]
    for name in names:
        payload["model"][name] = -payload["model"][name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A synthetic 2D store, a trained classifier and variants of it whose scores are known."""
    root = tmp_path_factory.mktemp("promotion")
    images, labels = synthetic_2d(160, 32, seed=0, amplitude=0.6, radius=(6.0, 10.0))  # clear lesions: learnt fast
    store = write_store(str(root / "store.zarr"), images, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(store, root / "good", TrainConfig(epochs=4, batch_size=16, augment=False, early_stopping_patience=0,
                                                device="cpu"), progress=False)
    good = str(root / "good")
    model, _ = load_model(f"{good}/best.pt")
    result = predict(model, store, "test", task=Task.classify, device="cpu")
    auroc = classification_metrics(result["y_true"], result["y_prob"], ["none", "lesion"])["auroc"]
    assert auroc > 0.8  # the fixture's premise: training works on this store
    return {
        "store": store, "good": good, "auroc": auroc, "n_test": int(result["y_true"].size),
        "zero": _variant(good, root / "zero", _zero),
        "inverted": _variant(good, root / "inverted", _invert),
        "other_store": _variant(good, root / "other", lambda p: p.update(store_content_hash="0" * 64)),
        "other_classes": _variant(good, root / "classes", lambda p: p.update(classes=["cat", "dog"], store_content_hash="1" * 64)),
    }


def test_a_better_candidate_is_promoted_and_a_worse_one_refused(runs, tmp_path):
    better = compare_models(runs["store"], runs["good"], runs["zero"], str(tmp_path / "a"), n_boot=N_BOOT,
                            device="cpu")
    assert better.promote and "not worse" in better.reason
    assert better.candidate_score == pytest.approx(runs["auroc"])  # the evaluation's own AUROC
    assert better.current_score == pytest.approx(0.5)  # constant scores: AUROC 0.5
    assert better.n == runs["n_test"] and better.metric == "auroc"
    assert better.ci_low <= better.diff <= better.ci_high and better.ci_low > 0
    assert "| candidate |" in better.markdown and "| current |" in better.markdown
    written = json.loads((tmp_path / "a" / "promotion.json").read_text())
    assert written["promote"] is True and written["diff"] == pytest.approx(better.diff)

    worse = compare_models(runs["store"], runs["zero"], runs["good"], str(tmp_path / "b"), n_boot=N_BOOT,
                           device="cpu")
    assert not worse.promote and "worse" in worse.reason and "not worse" not in worse.reason
    assert worse.diff == pytest.approx(-better.diff)
    assert (worse.ci_low, worse.ci_high) == pytest.approx((-better.ci_high, -better.ci_low))


def test_an_inverted_model_scores_one_minus_auroc_and_is_refused(runs, tmp_path):
    decision = compare_models(runs["store"], runs["inverted"], runs["good"], str(tmp_path), n_boot=N_BOOT,
                              device="cpu")
    assert decision.candidate_score == pytest.approx(1 - runs["auroc"], abs=1e-6)
    assert not decision.promote


def test_the_first_candidate_is_promoted(runs, tmp_path):
    decision = compare_models(runs["store"], runs["good"], None, str(tmp_path), n_boot=N_BOOT, device="cpu")
    assert decision.promote and "no current model" in decision.reason
    assert decision.current_score is None and decision.diff is None and decision.ci_low is None
    assert decision.candidate_score == pytest.approx(runs["auroc"])
    assert json.loads((tmp_path / "promotion.json").read_text())["current_score"] is None


def test_tolerance(runs, tmp_path):
    # zeroed: exactly 0.5; the good model: at most 1.0, so 0.5 >= good - 0.6 always, and 0.5 < good - 0.2 here
    lenient = compare_models(runs["store"], runs["zero"], runs["good"], str(tmp_path), tolerance=0.6,
                             n_boot=N_BOOT, device="cpu")
    assert lenient.promote and "tolerance 0.6" in lenient.reason
    strict = compare_models(runs["store"], runs["zero"], runs["good"], str(tmp_path), tolerance=0.2,
                            n_boot=N_BOOT, device="cpu")
    assert not strict.promote
    same = compare_models(runs["store"], runs["good"], runs["good"], str(tmp_path), n_boot=N_BOOT, device="cpu")
    assert same.promote and same.diff == 0 and (same.ci_low, same.ci_high) == (0, 0)


def test_a_candidate_of_another_store_is_not_promoted(runs, tmp_path):
    decision = compare_models(runs["store"], runs["other_store"], runs["zero"], str(tmp_path), n_boot=N_BOOT,
                              device="cpu")
    assert not decision.promote and "trained on store content 000000000000" in decision.reason
    assert "\n" not in decision.reason


def test_a_current_model_that_cannot_be_scored_lets_the_candidate_in_with_a_reason(runs, tmp_path):
    decision = compare_models(runs["store"], runs["zero"], runs["other_classes"], str(tmp_path), n_boot=N_BOOT,
                              device="cpu")
    assert decision.promote and "cannot be scored" in decision.reason and "cat, dog" in decision.reason
    assert decision.current_score is None and "\n" not in decision.reason


def test_bootstrap_resamples_patients():
    """Each patient holding two identical copies of a sample: resampling patients gives exactly the intervals of
    the single copies (same draws), while resampling the 2N samples would give narrower ones."""
    rng = np.random.default_rng(0)
    n = 40
    y = np.arange(n) % 2
    p1 = np.clip(y * 0.3 + rng.uniform(0, 0.7, n), 0, 1)
    p2 = rng.uniform(0, 1, n)
    patients = np.array([f"p{i}" for i in range(n)], dtype=object)

    def scores(prob: np.ndarray, copies: int, by_sample: bool = False) -> ModelScores:
        probs = np.stack([1 - prob, prob], 1)
        who = np.arange(n * copies).astype(str) if by_sample else np.tile(patients, copies)
        return ModelScores(Task.classify, np.arange(n * copies), who, np.tile(y, copies), np.tile(probs, (copies, 1)))

    single = paired_patient_bootstrap(scores(p1, 1), scores(p2, 1), n_boot=300)
    doubled = paired_patient_bootstrap(scores(p1, 2), scores(p2, 2), n_boot=300)
    for name in ("a", "b", "diff"):
        assert doubled[name] == pytest.approx(single[name])
    assert single["diff"][0] < single["diff"][1]
    per_sample = paired_patient_bootstrap(scores(p1, 2, True), scores(p2, 2, True), n_boot=300)
    assert np.diff(per_sample["diff"])[0] < 0.8 * np.diff(single["diff"])[0]


def test_bad_inputs_are_one_line_errors(runs, tmp_path):
    with pytest.raises(UserError) as missing:
        compare_models(runs["store"], str(tmp_path / "nothing"), None, str(tmp_path))
    with pytest.raises(PromotionError) as split:
        compare_models(runs["store"], runs["good"], None, str(tmp_path), split="holdout")
    with pytest.raises(PromotionError) as tolerance:
        compare_models(runs["store"], runs["good"], None, str(tmp_path), tolerance=-1)
    with pytest.raises(UserError) as store:
        compare_models(str(tmp_path / "no-store.zarr"), runs["good"], None, str(tmp_path))
    for exc in (missing, split, tolerance, store):
        assert "\n" not in str(exc.value)


def test_segmentation_models_are_compared_by_mean_dice(tmp_path):
    """A U-Net with zeroed weights predicts background everywhere: Dice 0 on a case with a lesion, 1 on an empty
    one (empty-vs-empty), so its mean Dice is the share of test cases without a lesion."""
    store = make_3d_store(str(tmp_path / "seg.zarr"), n=24, shape=(8, 16, 16))
    unet = build_model("small-unet", Task.segment, 3, 1, 2)
    zeroed = {k: v * 0 for k, v in unet.state_dict().items()}
    meta = {"epoch": 1, "config": {}, "store_content_hash": store_attrs(store)["content_hash"], "code_version": "test",
            "classes": ["none", "lesion"], "sample_shape": [1, 8, 16, 16], "task": "segment",
            "model_name": "small-unet", "num_outputs": 2}
    save_checkpoint(tmp_path / "zero" / "best.pt", {**meta, "model": zeroed})
    decision = compare_models(store, str(tmp_path / "zero"), None, str(tmp_path / "out"), n_boot=N_BOOT,
                              device="cpu")
    table = read_sample_table(store)
    test = np.asarray(table["split"]) == 2
    assert decision.metric == "dice_mean" and decision.n == int(test.sum())
    assert decision.candidate_score == pytest.approx(float(np.mean(np.asarray(table["label"])[test] == 0)))
    assert decision.promote and "mean Dice" in decision.markdown
