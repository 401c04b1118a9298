"""Training: Zarr dataset and sampler, models, checkpoints, train/resume/predict and input errors."""

from __future__ import annotations

import ast
import csv
import json
import logging
import pickle
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from medpipe.config import StoreConfig
from medpipe.evaluation import metrics as eval_metrics
from medpipe.store import ATTRS_KEY
from medpipe.task import Task
from medpipe.training import (CheckpointExistsError, CheckpointMismatchError, CorruptCheckpointError,
                              MissingLabelsError, StoreNotCompleteError, TrainingError, UnknownModelError)
from medpipe.training import data as data_module
from medpipe.training import engine
from medpipe.training.checkpoints import load_checkpoint, load_model, save_checkpoint
from medpipe.training.config import TrainConfig
from medpipe.training.data import BlockShuffleSampler, ZarrImageDataset, default_augmentation, worker_context
from medpipe.training.engine import predict, split_metrics, train
from medpipe.training.models import MODEL_NAMES, build_model
from medpipe.training.selection import best_val_epoch, improved, monitor_key
from training_store import (SENTINEL, check_kill_and_resume, make_2d_store, make_3d_store, synthetic_2d,
                            synthetic_3d, write_sentinel_in_worker, write_store)


@pytest.fixture(scope="module")
def store2d(tmp_path_factory):
    """300 easy 32x32 samples; small chunks (32 samples) so the split spans many blocks."""
    url = str(tmp_path_factory.mktemp("s") / "store2d.zarr")
    return make_2d_store(url, n=300, size=32, radius=(7.0, 11.0), store_config=StoreConfig(chunk_bytes=32 * 4096))


@pytest.fixture(scope="module")
def store3d(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("s") / "store3d.zarr")
    return make_3d_store(url, n=40, shape=(8, 32, 32), radius=(8.0, 12.0))


def _split(url: str) -> np.ndarray:
    return np.asarray(zarr.open_group(url, mode="r")["samples/split"][...])


# -- data --------------------------------------------------------------------------------------------------------
def test_split_selection_and_samples(store2d):
    split = _split(store2d)
    root = zarr.open_group(store2d, mode="r")
    for name, code in (("train", 0), ("val", 1), ("test", 2)):
        ds = ZarrImageDataset(store2d, name, cache="none")
        assert np.array_equal(ds.indices, np.flatnonzero(split == code))
    ds = ZarrImageDataset(store2d, "val", cache="none")
    sample = ds[3]
    idx = int(ds.indices[3])
    assert sample["index"] == idx and sample["image"].dtype == torch.float32
    assert np.array_equal(sample["image"].numpy(), root["training/images"][idx])
    assert int(sample["label"]) == int(root["training/labels"][idx]) and sample["label"].dtype == torch.int64
    with pytest.raises(TrainingError, match="unknown split"):
        ZarrImageDataset(store2d, "holdout")


def test_cache_memory_matches_reading(store2d):
    a, b = ZarrImageDataset(store2d, "train", cache="none"), ZarrImageDataset(store2d, "train", cache="memory")
    assert not a.cached and b.cached
    pos = [5, 0, 77, 3, 3]
    x, y = a.read_arrays(pos), b.read_arrays(pos)
    assert np.array_equal(x["images"], y["images"]) and np.array_equal(x["labels"], y["labels"])
    assert ZarrImageDataset(store2d, "train", cache="auto", cache_max_bytes=1).cached is False


def test_sampler_covers_each_index_once_and_reads_whole_chunks(store2d, monkeypatch):
    ds = ZarrImageDataset(store2d, "train", cache="none", chunk_cache_bytes=1 << 30)
    sampler = BlockShuffleSampler(ds, batch_size=16, seed=3, window=2)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(ds))) and len(batches) == len(sampler)
        orders.append(flat)
    assert orders[0] != orders[1], "each epoch reshuffles"
    sampler.set_epoch(0)
    assert [i for b in sampler for i in b] == orders[0], "an epoch's order depends on (seed, epoch) only"
    # each batch mixes at most the blocks of two neighbouring windows
    chunk_of = ds.indices // ds.chunk_len
    assert max(len(set(chunk_of[b].tolist())) for b in batches) <= 2 * 2

    loader = DataLoader(ds, batch_sampler=sampler)
    seen = np.concatenate([batch["index"].numpy() for batch in loader])
    assert sorted(seen.tolist()) == ds.indices.tolist()
    # whole chunks, each decoded once per epoch: tests/test_loader.py::test_each_chunk_is_decoded_once_per_epoch


def test_workers_return_same_samples(store2d):
    ds = ZarrImageDataset(store2d, "train", cache="none")
    ds[0]  # opens a handle, which must not be pickled
    assert pickle.loads(pickle.dumps(ds))._root is None

    def collect(workers: int) -> tuple[np.ndarray, np.ndarray]:
        sampler = BlockShuffleSampler(ds, batch_size=24, seed=1)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                            multiprocessing_context=worker_context(workers))
        batches = list(loader)
        return (np.concatenate([b["index"].numpy() for b in batches]),
                np.concatenate([b["image"].numpy() for b in batches]))

    idx0, img0 = collect(0)
    idx2, img2 = collect(2)
    assert np.array_equal(idx0, idx2) and np.array_equal(img0, img2)


def test_s3_store_through_moto(moto_s3, tmp_path):
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3}).mkdir("medpipe-train")
    opts = {"client_kwargs": {"endpoint_url": moto_s3}}
    images, labels = synthetic_2d(40, 16, seed=2)
    url = write_store("s3://medpipe-train/store.zarr", images, labels, storage_options=opts)
    s3 = ZarrImageDataset(url, "all", cache="none", storage_options=opts)
    local = ZarrImageDataset(write_store(str(tmp_path / "same.zarr"), images, labels), "all", cache="none")
    batch = s3.__getitems__(list(range(40)))
    assert np.array_equal(torch.stack([s["image"] for s in batch]).numpy(), images)
    assert np.array_equal(local.read_arrays(range(40))["images"], s3.read_arrays(range(40))["images"])
    loader = DataLoader(s3, batch_sampler=BlockShuffleSampler(s3, 16), num_workers=2,
                        multiprocessing_context=worker_context(2))
    assert sorted(np.concatenate([b["index"].numpy() for b in loader]).tolist()) == list(range(40))


def test_augmentation_keeps_masks_binary(store3d):
    ds = ZarrImageDataset(store3d, "train", task="segment", transform=default_augmentation("segment", 3))
    for s in ds.__getitems__(list(range(6))):
        assert s["mask"].dtype == torch.uint8 and set(s["mask"].unique().tolist()) <= {0, 1}
        assert s["image"].shape == (1, 8, 32, 32) and s["mask"].shape == (1, 8, 32, 32)


# -- models / config ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,task,dims", [("small-cnn", "classify", 2), ("small-cnn", "classify", 3),
                                            ("resnet18", "classify", 2), ("densenet121", "classify", 2),
                                            ("small-unet", "segment", 3), ("unet", "segment", 2)])
def test_model_registry_shapes(name, task, dims):
    model = build_model(name, task, dims, 1, 3).eval()
    size = 32 if dims == 2 else 16
    x = torch.zeros((2, 1, *([size] * dims)))
    out = model(x)
    assert out.shape == ((2, 3) if task == "classify" else (2, 3, *([size] * dims)))


def test_unknown_model_and_config_validation():
    with pytest.raises(UnknownModelError, match="small-cnn"):
        build_model("vit-huge", "classify", 2, 1, 2)
    with pytest.raises(TrainingError, match="does not do"):
        build_model("unet", "classify", 2, 1, 2)
    assert set(MODEL_NAMES) >= {"small-cnn", "resnet18", "resnet34", "densenet121", "unet", "small-unet"}
    with pytest.raises(ValueError):
        TrainConfig(learning_rate=0.1)
    cfg = TrainConfig()
    assert cfg.model_name() == "small-cnn" and TrainConfig(task="segment").model_name() == "small-unet"
    assert TrainConfig.model_validate(cfg.to_dict()) == cfg


# -- training -----------------------------------------------------------------------------------------------------
def test_short_training_improves_and_predicts(store2d, tmp_path):
    cfg = TrainConfig(epochs=5, batch_size=32, lr=3e-3, early_stopping_patience=0)
    result = train(store2d, tmp_path / "run", cfg, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert result.epochs_completed == 5 and losses[-1] < losses[0]
    assert result.test_metrics["accuracy"] >= 0.75, result.test_metrics
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert any((tmp_path / "run" / "tb").iterdir())
    ckpt = torch.load(result.best_path, weights_only=True)
    assert type(ckpt["task"]) is str and ckpt["task"] == "classify", "checkpoints store the Task value string"
    assert ckpt["store_content_hash"] == zarr.open_group(store2d).attrs[ATTRS_KEY]["content_hash"]
    model, meta = load_model(result.best_path)
    assert meta["task"] is Task.classify and meta["classes"] == ["none", "lesion"]
    out = predict(model, store2d, "test")
    n_test = int((_split(store2d) == 2).sum())
    assert out["y_prob"].shape == (n_test, 2) and out["y_true"].shape == (n_test,) and out["indices"].shape == (n_test,)
    assert np.allclose(out["y_prob"].sum(axis=1), 1, atol=1e-5)
    assert (out["y_pred"] == out["y_true"]).mean() == pytest.approx(result.test_metrics["accuracy"], abs=1e-6)


def test_segmentation_trains_and_predicts_masks(store3d, tmp_path):
    cfg = TrainConfig(task="segment", epochs=3, batch_size=4, early_stopping_patience=0)
    result = train(store3d, tmp_path / "seg", cfg, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.monitor == "dice" and "dice" in result.test_metrics
    assert all(0.0 <= h["val_dice"] <= 1.0 for h in result.history) and result.validation == "val split"
    model, _ = load_model(result.best_path)
    out = predict(model, store3d, "val")
    assert out["masks_pred"].shape == out["masks_true"].shape and out["masks_pred"].dtype == np.uint8


def test_resume_after_kill_continues(store2d, tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=64, early_stopping_patience=0)
    check_kill_and_resume(train, store2d, tmp_path, cfg, epochs=4)


# -- bad input ----------------------------------------------------------------------------------------------------
def _variant(tmp_path, name, **kwargs):
    images, labels = synthetic_2d(60, 16, seed=5)
    kwargs.setdefault("labels", labels)
    return write_store(str(tmp_path / f"{name}.zarr"), images, **kwargs)


def test_store_errors(tmp_path, store2d):
    cfg = TrainConfig(epochs=1)
    with pytest.raises(StoreNotCompleteError, match="not complete"):
        train(_variant(tmp_path, "incomplete", complete=False), tmp_path / "a", cfg, progress=False)
    with pytest.raises(StoreNotCompleteError, match="no medpipe store"):
        train(str(tmp_path / "nothing.zarr"), tmp_path / "b", cfg, progress=False)
    with pytest.raises(MissingLabelsError, match="at least 2 classes"):
        train(_variant(tmp_path, "unlabelled", labels=np.full(60, -1)), tmp_path / "c", cfg, progress=False)
    with pytest.raises(MissingLabelsError, match="at least 2 classes"):
        train(_variant(tmp_path, "oneclass", labels=np.zeros(60, np.int64)), tmp_path / "d", cfg, progress=False)
    with pytest.raises(MissingLabelsError, match="masks"):
        train(store2d, tmp_path / "e", TrainConfig(task="segment"), progress=False)
    with pytest.raises(UnknownModelError, match="valid names"):
        train(store2d, tmp_path / "f", TrainConfig(model="nope"), progress=False)


def test_checkpoint_errors(tmp_path, store2d):
    cfg = TrainConfig(epochs=1, batch_size=64)
    run = tmp_path / "run"
    train(store2d, run, cfg, progress=False)
    other = make_2d_store(str(tmp_path / "other.zarr"), n=120, size=32, seed=9)
    with pytest.raises(CheckpointMismatchError, match="different store"):
        train(other, run, cfg, resume=True, progress=False)
    with pytest.raises(CheckpointMismatchError, match="lr"):
        train(store2d, run, TrainConfig(epochs=1, batch_size=64, lr=0.1), resume=True, progress=False)
    # runtime-only settings may change on resume
    train(store2d, run, TrainConfig(epochs=1, batch_size=64, num_workers=0, cache="none"), resume=True, progress=False)
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:200])  # cut off
    with pytest.raises(CorruptCheckpointError, match="unreadable"):
        train(store2d, run, cfg, resume=True, progress=False)
    (run / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint(run / "last.pt")
    save_checkpoint(run / "odd.pt", {"model": {}})
    with pytest.raises(CorruptCheckpointError, match="lacks"):
        load_model(run / "odd.pt")
    with pytest.raises(CheckpointExistsError, match="nothing to resume"):
        train(store2d, tmp_path / "empty", cfg, resume=True, progress=False)
    result = train(store2d, run, cfg, overwrite=True, progress=False)
    assert result.epochs_completed == 1
    assert not list(run.glob(".*.tmp")), "atomic writes leave no temporary files"


@pytest.mark.gpu
def test_gpu_amp_channels_last(store2d, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, amp="auto", channels_last=True, device="cuda")
    result = train(store2d, tmp_path / "gpu", cfg, progress=False)
    assert result.device.startswith("cuda") and result.epochs_completed == 2


# -- one Task enum --------------------------------------------------------------------------------------------------
def test_task_enum_is_used_and_strings_still_validate(store2d):
    assert TrainConfig(task="segment").task is Task.segment
    assert TrainConfig.model_validate({"task": "classify"}).task is Task.classify
    with pytest.raises(ValueError):
        TrainConfig(task="regress")
    stored = TrainConfig(task=Task.segment).to_dict()
    assert type(stored["task"]) is str and stored["task"] == "segment"
    assert TrainConfig.model_validate(stored).task is Task.segment
    with pytest.raises(TrainingError, match="unknown task"):
        ZarrImageDataset(store2d, "train", task="regress")
    with pytest.raises(TrainingError, match="unknown task"):
        build_model("small-cnn", "regress", 2, 1, 2)
    assert build_model("small-cnn", "classify", 2, 1, 2).medpipe_task is Task.classify
    assert ZarrImageDataset(store2d, "val", task="classify", cache="none").task is Task.classify


def test_no_bare_task_strings_in_comparisons():
    """Task checks in the training code compare against Task members, not the strings "classify"/"segment"."""
    here = Path(engine.__file__).parent
    repo = here.parents[1]
    offenders = []
    for path in [*sorted(here.glob("*.py")), repo / "tasks" / "train.py", repo / "flows" / "train.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                offenders += [f"{path.name}:{node.lineno}" for sub in ast.walk(node)
                              if isinstance(sub, ast.Constant) and sub.value in ("classify", "segment")]
    assert not offenders


# -- one metrics module ---------------------------------------------------------------------------------------------
def test_validation_metrics_come_from_the_evaluation_module():
    assert not hasattr(engine, "segmentation_dice"), "the engine keeps no Dice of its own"
    assert engine.classification_metrics is eval_metrics.classification_metrics
    assert engine.mean_foreground_dice is eval_metrics.mean_foreground_dice
    true = np.zeros((3, 1, 4, 4), np.uint8)
    pred = np.zeros_like(true)
    true[0, 0, 0, :4] = 1
    pred[0, 0, 0, :2] = 1  # Dice 2*2/(4+2)
    # sample 1: empty prediction of an empty mask -> 1.0 (MONAI's ignore_empty left it out)
    pred[2, 0, 3, :3] = 1  # foreground predicted where the mask is empty -> 0.0
    seg = {"task": Task.segment, "indices": np.array([7, 8, 9]), "masks_pred": pred, "masks_true": true}
    assert split_metrics(seg, 2)["dice"] == pytest.approx((4 / 6 + 1.0 + 0.0) / 3)
    has_mask = np.zeros(10, dtype=bool)
    has_mask[[7, 8]] = True  # store row 9 has no mask: not scored
    assert split_metrics(seg, 2, has_mask=has_mask)["dice"] == pytest.approx((4 / 6 + 1.0) / 2)
    cls = {"task": Task.classify, "indices": np.arange(5), "y_true": np.array([0, 0, 1, 1, -1]),
           "y_prob": np.array([[.9, .1], [.2, .8], [.3, .7], [.4, .6], [.5, .5]]), "loss": 0.25}
    m = split_metrics(cls, 2, ["none", "lesion"])
    # unlabelled row ignored; class 0: tp 1 fn 1 -> F1 2/3; class 1: tp 2 fp 1 -> F1 4/5
    assert m == pytest.approx({"accuracy": 0.75, "macro_f1": (2 / 3 + 4 / 5) / 2, "loss": 0.25})


class _Background(torch.nn.Module):
    """A segmenter that predicts background everywhere (logits +10 / -10), whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([10.0, -10.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * 0 + self.bias.view(1, 2, *([1] * (x.ndim - 2)))


def test_empty_val_masks_score_like_the_evaluation_report(tmp_path, monkeypatch):
    """Regression: val masks all empty and a model predicting empty. Training's Dice used to be MONAI's
    ignore_empty mean (NaN, logged as 0.0) while the evaluation report scores empty-vs-empty as 1.0."""
    vols, masks, labels = synthetic_3d(16, (8, 16, 16), seed=3, lesion_fraction=1.0)
    split = np.resize(np.array([0, 0, 1, 2], np.int8), 16)
    masks[split == 1] = 0
    url = write_store(str(tmp_path / "emptyval.zarr"), vols, labels, masks=masks, split=split)
    monkeypatch.setattr(engine, "build_model", lambda *args: _Background())
    cfg = TrainConfig(task="segment", epochs=1, batch_size=4, lr=1e-6, augment=False, early_stopping_patience=0)
    result = train(url, tmp_path / "run", cfg, progress=False)
    out = predict(_Background(), url, "val", task=Task.segment)
    assert out["masks_true"].shape[0] == 4 and not out["masks_true"].any() and not out["masks_pred"].any()
    report = eval_metrics.segmentation_metrics(out["masks_pred"], out["masks_true"], num_classes=2)
    assert report["dice_mean"] == 1.0
    assert result.history[0]["val_dice"] == report["dice_mean"]


# -- never validate (or test) on something else ---------------------------------------------------------------------
class _Recorder:
    """Records which splits the engine opens and when epochs end, in order."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, object]] = []
        self.metrics: list[dict[str, float]] = []
        original = engine.ZarrImageDataset

        def make(store_url, split="train", *args, **kwargs):
            self.events.append(("dataset", split))
            return original(store_url, split, *args, **kwargs)

        monkeypatch.setattr(engine, "ZarrImageDataset", make)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.events.append(("epoch", epoch))
        self.metrics.append(dict(metrics))

    def datasets(self) -> list[str]:
        return [str(split) for kind, split in self.events if kind == "dataset"]


def _store_with_splits(tmp_path, name: str, pattern: list[int], unlabelled_val: bool = False) -> str:
    images, labels = synthetic_2d(60, 16, seed=5)
    split = np.resize(np.array(pattern, np.int8), 60)
    if unlabelled_val:
        labels = labels.copy()
        labels[split == 1] = -1
    return write_store(str(tmp_path / f"{name}.zarr"), images, labels, split=split)


@pytest.mark.parametrize("pattern,unlabelled,why", [([0, 0, 0, 2], False, "val split empty"),
                                                     ([0, 0, 1, 2], True, "val split has no labelled samples")])
def test_no_val_split_warns_and_never_validates_on_train(tmp_path, monkeypatch, caplog, pattern, unlabelled, why):
    url = _store_with_splits(tmp_path, "noval", pattern, unlabelled)
    rec = _Recorder(monkeypatch)
    cfg = TrainConfig(epochs=3, batch_size=16, early_stopping_patience=1)
    with caplog.at_level(logging.WARNING, logger=engine.__name__), pytest.warns(UserWarning, match="no validation"):
        result = train(url, tmp_path / "run", cfg, progress=False, on_epoch_end=rec.on_epoch_end)
    assert result.validation == f"none: {why} — no early stopping, best.pt = last epoch"
    assert any("no validation" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert rec.datasets() == ["train", "test"], "no stand-in validation set (the train split used to be reused)"
    assert result.epochs_completed == 3 and not result.stopped_early
    assert not [k for row in result.history for k in row if k.startswith("val_")]
    assert result.best_epoch == 3 == load_checkpoint(result.best_path)["epoch"] == load_checkpoint(result.last_path)["epoch"]
    assert np.isnan(result.best_metric)
    assert result.testing == "test split (best.pt)" and set(result.test_metrics) == {"accuracy", "macro_f1"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["validation"] == result.validation


def test_no_test_split_means_no_test_metrics(tmp_path, monkeypatch):
    url = _store_with_splits(tmp_path, "notest", [0, 0, 0, 1])
    rec = _Recorder(monkeypatch)
    with pytest.warns(UserWarning, match="no test metrics"):
        result = train(url, tmp_path / "run", TrainConfig(epochs=1, batch_size=16), progress=False)
    assert result.test_metrics == {} and result.testing == "none: test split empty — no test metrics"
    assert result.validation == "val split" and rec.datasets() == ["train", "val"]


def test_prefect_task_summary_carries_validation(tmp_path, monkeypatch):
    import tasks.train as task_module

    class RunLogger:  # stands in for Prefect's run logger (no flow run here)
        def __init__(self) -> None:
            self.lines: list[tuple[str, str]] = []

        def info(self, msg: str, *args: object) -> None:
            self.lines.append(("info", msg % args))

        def warning(self, msg: str, *args: object) -> None:
            self.lines.append(("warning", msg % args))

    run_logger = RunLogger()
    monkeypatch.setattr(task_module, "get_run_logger", lambda: run_logger)
    url = _store_with_splits(tmp_path, "noval", [0, 0, 0, 2])
    with pytest.warns(UserWarning, match="no validation"):
        summary = task_module.train_model.fn(url, str(tmp_path / "run"), TrainConfig(epochs=1, batch_size=16),
                                             False, False, False)
    assert summary["validation"] == "none: val split empty — no early stopping, best.pt = last epoch"
    assert summary["testing"] == "test split (best.pt)"
    assert ("warning", f"validation: {summary['validation']}") in run_logger.lines
    json.dumps(summary)  # plain types only


def test_test_split_is_read_once_after_training_and_best_pt_follows_val(store2d, tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    cfg = TrainConfig(epochs=3, batch_size=64, early_stopping_patience=0)
    result = train(store2d, tmp_path / "run", cfg, progress=False, on_epoch_end=rec.on_epoch_end)
    assert rec.datasets() == ["train", "val", "test"]
    last_epoch_event = max(i for i, (kind, _) in enumerate(rec.events) if kind == "epoch")
    assert rec.events.index(("dataset", "test")) > last_epoch_event, "test data is opened only after training"
    for metrics in rec.metrics:
        assert set(metrics) - {"epoch", "train_loss", "lr", "seconds"} == {"val_loss", "val_accuracy", "val_macro_f1"}
    vals = [h["val_macro_f1"] for h in result.history]
    assert result.best_epoch == 1 + int(np.argmax(vals)) == load_checkpoint(result.best_path)["epoch"]
    assert result.best_metric == max(vals)


def test_selection_reads_val_columns_only():
    assert monitor_key("macro_f1") == "val_macro_f1" and monitor_key("val_loss") == "val_loss"
    history = [{"epoch": 1, "val_macro_f1": 0.50, "test_macro_f1": 0.9, "val_loss": 0.9},
               {"epoch": 2, "val_macro_f1": 0.80, "test_macro_f1": 0.6, "val_loss": 0.5},
               {"epoch": 3, "val_macro_f1": 0.79, "test_macro_f1": 1.0, "val_loss": 0.6},
               {"epoch": 4, "val_macro_f1": 0.81, "test_macro_f1": 0.5, "val_loss": 0.4}]
    assert best_val_epoch(history, "macro_f1") == 4
    assert best_val_epoch(history, "macro_f1", tolerance=0.02) == 2
    assert best_val_epoch(history, "val_loss") == 4
    assert best_val_epoch([{"epoch": 1, "train_loss": 0.3}], "dice") == 0
    assert improved(0.5, None, "dice") and not improved(float("nan"), None, "dice")
    assert improved(0.4, 0.5, "val_loss") and not improved(0.4, 0.5, "macro_f1")


# -- the in-memory cache and spawned workers ------------------------------------------------------------------------
def test_cache_is_shared_with_spawned_workers_not_copied(store2d):
    ds = ZarrImageDataset(store2d, "train", cache="memory")
    assert ds.cached and ds.cache_bytes() > 500_000
    before = ds.read_arrays([0, 5, 9])["images"].copy()
    assert len(ForkingPickler.dumps(ds)) < 20_000, "what a spawned worker receives holds handles, not the cache"
    assert np.array_equal(ds.read_arrays([0, 5, 9])["images"], before), "moving to shared memory keeps values"
    loader = DataLoader(ds, batch_sampler=BlockShuffleSampler(ds, len(ds), shuffle=False), num_workers=1,
                        worker_init_fn=write_sentinel_in_worker, multiprocessing_context=worker_context(1))
    batches = list(loader)
    assert float(batches[0]["image"].reshape(-1)[0]) == SENTINEL
    assert float(ds._cache["images"].reshape(-1)[0]) == SENTINEL, "the worker wrote into the parent's pages"


def test_cache_without_shared_memory_room_is_not_pickled(store2d, monkeypatch):
    monkeypatch.setattr(data_module, "shared_memory_free_bytes", lambda path=data_module.SHM_DIR: 0)
    ds = ZarrImageDataset(store2d, "train", cache="memory")
    with pytest.warns(RuntimeWarning, match="does not fit"):
        blob = pickle.dumps(ds)
    assert len(blob) < 20_000 < ds.cache_bytes()
    copy = pickle.loads(blob)
    assert ds.cached and not copy.cached and not copy._cache
    pos = [3, 0, 40, 41]
    assert np.array_equal(copy.read_arrays(pos)["images"], ds.read_arrays(pos)["images"])


def test_inference_keeps_no_view_of_a_batch():
    """`_infer` copies labels and indices out of each batch: a view would keep the batch's whole block alive (in a
    DataLoader worker's ring slot, the slot itself), so a long evaluation would hold every batch it has read."""
    import gc
    import weakref

    freed: set[int] = set()
    held_late: list[int] = []

    def batches():  # each batch's tensors are views of one block, as `medpipe.training.batches` makes them
        for k in range(6):
            gc.collect()
            held_late.extend(j for j in range(k - 1) if j not in freed)  # the loop may still hold batch k - 1
            block = np.zeros(64 + 4 + 4, np.int32)
            weakref.finalize(block, freed.add, k)
            yield {"image": torch.from_numpy(block[:64].view(np.float32)).view(4, 1, 4, 4),
                   "label": torch.from_numpy(block[64:68]), "index": torch.from_numpy(block[68:72])}
            del block

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    result = engine._infer(model, batches(), Task.classify, torch.device("cpu"), None, None)  # type: ignore[arg-type]
    assert held_late == [] and result["indices"].shape == (24,) and result["y_true"].shape == (24,)
