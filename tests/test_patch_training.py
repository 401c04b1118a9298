"""Patch training on a volumes-layout store: checkpoints that rebuild and predict, the foreground share of the
batches, resume, the classify error, and that a short run learns (beats an Otsu threshold on the same cases)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from medpipe.evaluation.baselines import OTSU_RULES, otsu_masks
from medpipe.evaluation.metrics import mean_foreground_dice
from medpipe import planning
from medpipe.inference import predict_volume
from medpipe.planning import PlanningError
from medpipe.store import open_store, read_sample_table, store_attrs
from medpipe.training import TrainingError
from medpipe.training import patch_training
from medpipe.training.checkpoints import load_checkpoint, load_model
from medpipe.training.config import TrainConfig
from medpipe.training.engine import check_training_inputs, train
from medpipe.training.patch_training import deep_supervision_weights, resolve_plan, score_cases, volume_store_facts
from medpipe.volumes import open_case

TINY = dict(task="segment", early_stopping_patience=0, patches_per_epoch=2)


@pytest.fixture(scope="module")
def store(volume_store):
    return str(volume_store[0])


def _cases(store: str, split: int) -> list:
    root = open_store(store)
    table = read_sample_table(store)
    return [open_case(root, int(i)) for i in np.flatnonzero((table["split"] == split) & table["has_mask"])]


def test_training_writes_checkpoints_that_rebuild_and_predict(store, tmp_path):
    with pytest.warns(UserWarning, match="no validation"):
        result = train(store, tmp_path / "run", TrainConfig(epochs=2, **TINY), progress=False)
    assert result.epochs_completed == 2 and result.validation.startswith("none: val split empty")
    assert result.best_epoch == 2, "without val cases best.pt is the last epoch"
    assert {"best.pt", "last.pt", "metrics.csv", "summary.json"} <= {p.name for p in (tmp_path / "run").iterdir()}
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and not any(k.startswith("val_") for k in rows[0])
    assert 0.0 <= result.test_metrics["dice"] <= 1.0

    attrs = store_attrs(store)
    model, meta = load_model(result.best_path)
    patch = attrs["plan"]["patch_size"]
    assert meta["model_name"] == "plan-unet" and meta["layout"] == "volumes" and meta["plan"] == attrs["plan"]
    assert meta["sample_shape"] == [attrs["sample_shape"][0], *patch] and meta["patch_size"] == patch
    assert meta["normalization"] == attrs["normalization"] and meta["training_spacing"] == attrs["training_spacing"]
    assert meta["num_outputs"] == 2 and meta["deep_supervision"] is False
    case = _cases(store, 2)[0]
    probs = predict_volume(model, np.asarray(case.image[...]), tuple(patch))
    assert probs.shape == (2, *case.image.shape[1:]) and np.allclose(probs.sum(axis=0), 1.0, atol=1e-4)
    # the test metric is the same scoring of best.pt on the test cases
    again = score_cases(model, _cases(store, 2), patch, 2, torch.device("cpu"))
    assert again["dice"] == pytest.approx(result.test_metrics["dice"], abs=1e-6)


def test_deep_supervision_trains_and_rebuilds(store, tmp_path):
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    with pytest.warns(UserWarning):
        result = train(store, tmp_path / "ds", TrainConfig(epochs=1, deep_supervision=True, **TINY), progress=False)
    assert math.isfinite(result.history[0]["train_loss"])
    model, meta = load_model(result.best_path)
    assert meta["deep_supervision"] is True and not model.training
    x = torch.zeros(1, *meta["sample_shape"])
    assert model(x).shape == (1, 2, *meta["patch_size"])  # eval mode: the full-resolution logits only
    model.train()
    heads = max(1, min(2, meta["plan"]["n_stages"] - 2))  # build_plan_unet's deep_supr_num
    assert model(x).shape[:3] == (1, 1 + heads, 2)  # train mode: logits + the deep-supervision heads


@pytest.mark.parametrize("oversample", [0.5, 0.0])
def test_batches_hold_the_configured_foreground_share(store, tmp_path, monkeypatch, oversample):
    """Patches smaller than the volumes, so foreground is not in every patch by chance: with oversample 1/2 and
    batches of 4 the last 2 patches of every batch from a case with a lesion hold foreground (they are centred on
    it); uniform patches (oversample 0) hold it far less often. Recorded as the train loop's loss receives them."""
    seen: list[np.ndarray] = []
    cases: list[np.ndarray] = []

    class Recording(patch_training.DiceCELoss):
        def forward(self, input, target):  # noqa: A002 - torch's name
            seen.append((target.flatten(1) > 0).any(dim=1).numpy())
            return super().forward(input, target)

    class Cases(patch_training.PatchDataset):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            cases.append(len(self.foreground[item["case"]]) > 0)
            return item

    monkeypatch.setattr(patch_training, "DiceCELoss", Recording)
    monkeypatch.setattr(patch_training, "PatchDataset", Cases)
    cfg = TrainConfig(epochs=1, patch_size=(16, 32, 32), batch_size=4, oversample=oversample, augment=False,
                      **{**TINY, "patches_per_epoch": 32})
    with pytest.warns(UserWarning):
        result = train(store, tmp_path / "fg", cfg, progress=False)
    assert load_checkpoint(result.best_path)["plan"]["patch_size"] == [16, 32, 32]
    fg, lesion_case = np.stack(seen), np.asarray(cases).reshape(-1, 4)
    assert fg.shape == (8, 4) and lesion_case[:, 2:].any()
    rate = fg[lesion_case].mean()
    if oversample:
        assert fg[:, 2:][lesion_case[:, 2:]].all(), "the last ceil(4 * 1/2) patches of each batch hold foreground"
        assert rate >= 0.5
    else:
        assert rate < 0.5, f"uniform patches of lesion cases hold foreground less often ({rate:.2f})"


def test_plan_overrides_replan_at_the_stored_spacing(store, tmp_path, monkeypatch):
    seg = TrainConfig(task="segment")
    facts = volume_store_facts(store, seg)
    cpu = torch.device("cpu")
    assert resolve_plan(facts, seg, cpu, 1, 2).to_dict() == facts["plan"], "no override: the store's plan"
    small = resolve_plan(facts, TrainConfig(task="segment", patch_size=(16, 32, 32), batch_size=3), cpu, 1, 2)
    assert small.patch_size == (16, 32, 32) and small.batch_size == 3 and small.budget_source == "cpu"
    assert list(small.target_spacing) == facts["training_spacing"]
    assert small.base_features == facts["plan"]["base_features"], "the ingest's plan overrides still apply"
    bad = TrainConfig(task="segment", patch_size=(15, 32, 32))
    with pytest.raises(PlanningError, match="divisible"):
        check_training_inputs(store, bad, tmp_path / "bad")
    # a store planned for the CPU budget, trained on CUDA: re-planned with the CUDA budget, and noted
    monkeypatch.setattr(planning, "default_memory_budget", lambda: (8 << 30, "cuda:test"))
    gpu = resolve_plan(facts, seg, torch.device("cuda"), 1, 2)
    assert gpu.budget_source == "cuda:test" and gpu.memory_budget_bytes == 8 << 30
    assert gpu.notes[-1].startswith("re-planned for cuda:test")


def test_resume_continues_like_an_uninterrupted_run(store, tmp_path):
    cfg = TrainConfig(epochs=3, **TINY)

    def kill_after_two(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt("simulated kill")

    with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt):
        train(store, tmp_path / "run", cfg, progress=False, on_epoch_end=kill_after_two)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2
    seen: list[int] = []
    with pytest.warns(UserWarning):
        resumed = train(store, tmp_path / "run", cfg, resume=True, progress=False,
                        on_epoch_end=lambda e, m: seen.append(e))
        straight = train(store, tmp_path / "straight", cfg, progress=False)
    assert seen == [3] and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["train_loss"] for h in straight.history] == pytest.approx(
        [h["train_loss"] for h in resumed.history], rel=1e-4), "a resumed run repeats the uninterrupted one"


def test_classify_on_a_volumes_store_is_one_line_error(store, tmp_path):
    for config in (TrainConfig(task="classify"), TrainConfig(task="segment", model="small-unet")):
        with pytest.raises(TrainingError) as err:
            check_training_inputs(store, config, tmp_path / "x")
        assert "\n" not in str(err.value)
        with pytest.raises(TrainingError):
            train(store, tmp_path / "x", config, progress=False)
    with pytest.raises(TrainingError, match="preprocess.layout: fixed"):
        train(store, tmp_path / "x", TrainConfig(task="classify"), progress=False)
    assert not (tmp_path / "x" / "last.pt").exists()


def test_short_training_learns_beyond_otsu(store, tmp_path):
    """A short seeded run (120 steps of 4 patches of 16x32x32, half of them on foreground): on the train cases that
    have a lesion, the model's Dice (sliding windows over the whole case, stored grid) is far above the best Otsu
    threshold rule chosen on the same cases (an empty prediction would score 0 there)."""
    cfg = TrainConfig(task="segment", early_stopping_patience=0, epochs=15, patches_per_epoch=32,
                      patch_size=(16, 32, 32), batch_size=4, oversample=0.5, lr=1e-2)
    with pytest.warns(UserWarning):
        result = train(store, tmp_path / "learn", cfg, progress=False)
    model, meta = load_model(result.best_path)
    cases = [c for c in _cases(store, 0) if np.asarray(c.mask[...]).any()]
    learned = score_cases(model, cases, meta["patch_size"], 2, torch.device("cpu"))["dice"]
    images = [np.asarray(c.image[...])[None] for c in cases]
    masks = [(np.asarray(c.mask[...]) > 0).astype(np.uint8)[None] for c in cases]
    otsu = max(np.mean([mean_foreground_dice(otsu_masks(im, rule), m, 2) for im, m in zip(images, masks)])
               for rule in OTSU_RULES)
    assert len(cases) >= 5 and learned > max(0.5, otsu + 0.4), f"train-case Dice {learned:.3f} vs Otsu {otsu:.3f}"
