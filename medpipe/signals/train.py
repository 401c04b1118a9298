"""Training and prediction on a signals store, through the image models' epoch loop (`engine.fit`).

`train_signals` trains a registry model (`medpipe.signals.models`: lstm, gru, resnet1d) for rhythm classification
(`Task.classify`, monitor val macro_f1, cross-entropy) or forecasting (`Task.forecast`, monitor val mae, L1 loss:
a window (L, T) is split into the context, its first T - H samples, and the target, its last H = round(horizon_s x
rate_hz) samples of every lead). Checkpoints (last.pt / best.pt), resume, metrics.csv, TensorBoard, early stopping
on val and the single test scoring on best.pt are the engine's; checkpoints add `layout` "signals", the model spec
(`signal_model`), `rate_hz`, `leads`, `units`, `window` and `horizon`, and a run resumed on another store or with
another config is refused.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medpipe.signals.data import SignalWindowDataset, open_signal_store, pass_batch
from medpipe.signals.models import SignalModelSpec, build_signal_model, check_signal_model
from medpipe.signals.store import read_window_table, signal_attrs
from medpipe.store import SPLIT_CODES
from medpipe.task import Task
from medpipe.training import (CheckpointMismatchError, CorruptCheckpointError, MissingLabelsError, TrainingError,
                              as_task)
from medpipe.training.checkpoints import load_checkpoint
from medpipe.training.config import SIGNALS, TrainConfig
from medpipe.training.data import BlockShuffleSampler, seed_worker, worker_context
from medpipe.training.engine import (VALIDATION_ON_VAL, EpochCallback, FitJob, TrainResult, _amp_dtype,
                                     _check_resumable, _empty_reason, _infer, _open_run, _run_meta, _seed_everything,
                                     _validation_mode, fit, resolve_device, split_metrics)

# checkpoint entries a resumed run must share with its store (besides content hash, shapes and config)
SIGNAL_FACTS = ("rate_hz", "leads", "window", "horizon")


def horizon_samples(config: TrainConfig, rate_hz: float) -> int:
    """H = round(horizon_s x rate_hz): forecast samples per lead (0 for classification)."""
    return int(round(config.horizon_s * rate_hz)) if config.task is Task.forecast else 0


def signal_store_facts(store_url: str, config: TrainConfig) -> dict[str, Any]:
    """Validate a signals store for `config` (complete; classify: labelled train windows of >= 2 classes;
    forecast: 1 <= H < window). Returns its attributes plus `horizon`, `sample_shape` [L, T or T - H],
    `num_outputs`, `val_empty` / `test_empty` (None, or why the split cannot be scored)."""
    if config.task not in (Task.classify, Task.forecast):
        raise TrainingError(f"a signals store trains classify (rhythm) or forecast, not {config.task.value!r}")
    if config.train_fraction < 1 or config.synthetic_ratio > 0 or config.synthetic_only:
        raise TrainingError("train_fraction, synthetic_ratio and synthetic_only apply to image stores; leave them at "
                            "their defaults for a signals store")
    root = open_signal_store(store_url)
    attrs = signal_attrs(root)
    table = read_window_table(root)
    split, labels = np.asarray(table["split"]), np.asarray(table["label"], dtype=np.int64)
    train = split == SPLIT_CODES["train"]
    if not train.any():
        raise MissingLabelsError(f"{store_url} has no windows in the train split")
    window, leads = int(attrs["window"]), list(attrs["leads"])
    horizon = horizon_samples(config, float(attrs["rate_hz"]))
    classes = list(attrs.get("classes") or [])
    if config.task is Task.classify:
        present = np.unique(labels[train & (labels >= 0)])
        if present.size < 2:
            raise MissingLabelsError(f"rhythm classification needs labelled train windows of at least 2 classes; "
                                     f"{store_url} has {present.size} class(es) in its train split")
        num_outputs = max(len(classes), int(labels.max()) + 1)
        scorable = labels >= 0
    else:
        if not 1 <= horizon < window:
            raise TrainingError(f"horizon_s {config.horizon_s} gives {horizon} samples at {attrs['rate_hz']} Hz; it "
                                f"must give at least 1 and fewer than the store's window ({window} samples)")
        num_outputs = 0
        scorable = np.ones(split.shape, dtype=bool)
    return {**attrs, "store_url": store_url, "horizon": horizon, "num_outputs": num_outputs,
            "sample_shape": [len(leads), window - horizon], "has_mask": None,
            "val_empty": _empty_reason(split == SPLIT_CODES["val"], scorable, config.task),
            "test_empty": _empty_reason(split == SPLIT_CODES["test"], scorable, config.task)}


def model_spec(config: TrainConfig, facts: dict[str, Any]) -> SignalModelSpec:
    """The model this config trains on a store with `facts` (model auto resolves for the signals layout)."""
    name = check_signal_model(config.model_name(SIGNALS), config.task)
    return SignalModelSpec(name=name, task=config.task.value, leads=len(facts["leads"]),
                           num_outputs=int(facts["num_outputs"]), horizon=int(facts["horizon"]),
                           hidden=config.rnn_hidden, layers=config.rnn_layers, bidirectional=config.bidirectional,
                           dropout=config.dropout)


def check_signal_training(store_url: str, config: TrainConfig) -> None:
    """Raise now (a one-line TrainingError) what `train_signals` would refuse before training."""
    model_spec(config, signal_store_facts(store_url, config))


def _loader(ds: SignalWindowDataset, config: TrainConfig, batch_size: int, shuffle: bool,
            device: torch.device) -> DataLoader:
    """Batches of whole blocks (`BlockShuffleSampler`: a full shuffle of a cached split, shard-wise otherwise)."""
    sampler = BlockShuffleSampler(cast(Any, ds), batch_size, seed=config.seed, window=config.block_window,
                                  shuffle=shuffle, drop_last=shuffle and len(ds) > batch_size,
                                  workers=config.num_workers)
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    return DataLoader(ds, batch_sampler=sampler, num_workers=config.num_workers, worker_init_fn=seed_worker,
                      generator=generator, pin_memory=device.type == "cuda", collate_fn=pass_batch,
                      multiprocessing_context=worker_context(config.num_workers))


def forecast_metrics(result: dict[str, Any]) -> dict[str, float]:
    """{"mae", "rmse"} over every forecast sample of a `predict` result (NaN when empty); plus "loss" if present."""
    err = np.asarray(result["y_pred"], np.float64) - np.asarray(result["y_true"], np.float64)
    nan = float("nan")
    metrics = {"mae": float(np.abs(err).mean()) if err.size else nan,
               "rmse": float(np.sqrt((err**2).mean())) if err.size else nan}
    if "loss" in result:
        metrics["loss"] = float(result["loss"])
    return metrics


def _score(result: dict[str, Any], num_outputs: int, classes: list[str]) -> dict[str, float]:
    """Monitorable metrics of a signal `_infer` result."""
    if result["task"] is Task.forecast:
        return forecast_metrics(result)
    return split_metrics(result, num_outputs, classes)


def _check_signal_facts(ckpt: dict[str, Any], facts: dict[str, Any], path: Path) -> None:
    for key in SIGNAL_FACTS:
        if ckpt.get(key) != facts.get(key):
            raise CheckpointMismatchError(f"{path} has {key}={ckpt.get(key)!r} but this store gives {facts.get(key)!r}")


def train_signals(store_url: str, out_dir: str | Path, config: TrainConfig | None = None, resume: bool = False,
                  progress: bool = True, *, overwrite: bool = False,
                  on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """Train a signal model on the train split of a signals store, validate on val each epoch, keep
    last.pt/best.pt, metrics.csv and tb/ in out_dir and score test once with best.pt (see the module docstring).
    resume=True continues out_dir/last.pt (same store and config); overwrite=True discards existing checkpoints."""
    config = config or TrainConfig()
    started = time.perf_counter()
    out = Path(out_dir)
    facts = signal_store_facts(store_url, config)
    spec = model_spec(config, facts)
    ckpt = _open_run(out, resume, overwrite)
    if ckpt is not None:
        _check_resumable(ckpt, facts, config, out / "last.pt", spec.name)
        _check_signal_facts(ckpt, facts, out / "last.pt")
    device = resolve_device(config.device)
    _seed_everything(config.seed)
    validation = _validation_mode(facts, store_url)
    batch_size = config.effective_batch_size(SIGNALS)
    data = partial(SignalWindowDataset, store_url, task=config.task, horizon=facts["horizon"],
                   cache=config.cache != "none",
                   cache_max_bytes=config.cache_max_bytes if config.cache == "auto" else sys.maxsize)
    train_loader = _loader(data("train", augment=config.augment, seed=config.seed), config, batch_size, True, device)
    val_loader = (_loader(data("val"), config, batch_size, False, device) if validation == VALIDATION_ON_VAL
                  else None)
    model = build_signal_model(spec).to(device)
    loss_fn: nn.Module = nn.L1Loss() if config.task is Task.forecast else nn.CrossEntropyLoss(ignore_index=-1)
    if config.task is Task.classify and config.class_weights:
        labels = _split_labels(store_url, "train")
        counts = np.bincount(labels[labels >= 0], minlength=spec.num_outputs).astype(np.float64)
        weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / spec.num_outputs, dtype=torch.float32,
                              device=device)
        loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=-1)
    amp = _amp_dtype(config.amp, device)
    classes = list(facts.get("classes") or [])

    def score(loader: DataLoader, module: nn.Module, loss: nn.Module | None) -> dict[str, float]:
        return _score(_infer(module, loader, config.task, device, amp, None, loss), spec.num_outputs, classes)

    def score_test(module: nn.Module) -> dict[str, float]:
        return score(_loader(data("test"), config, batch_size, False, device), module, None)

    meta = _run_meta(config, facts, spec.name, spec.num_outputs, validation, layout=SIGNALS,
                     signal_model=spec.to_dict(), units=list(facts["units"]),
                     **{key: facts[key] for key in SIGNAL_FACTS})
    job = FitJob(store_url=store_url, out=out, config=config, facts=facts, model=model, loss_fn=loss_fn,
                 train_loader=train_loader, device=device,
                 validate=None if val_loader is None else partial(score, val_loader), score_test=score_test,
                 meta=meta, validation=validation, epochs=config.effective_epochs(SIGNALS), ckpt=ckpt,
                 started=started)
    return fit(job, progress, on_epoch_end)


def _split_labels(store_url: str, split: str) -> np.ndarray:
    """Labels (int64, -1 = none) of a split's windows, in store order."""
    table = read_window_table(open_signal_store(store_url))
    return np.asarray(table["label"], np.int64)[np.asarray(table["split"]) == SPLIT_CODES[split]]


def load_signal_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, checkpoint metadata without tensors) of a signal run's best.pt / last.pt."""
    payload = load_checkpoint(path, map_location)
    if payload.get("layout") != SIGNALS or "signal_model" not in payload:
        raise CorruptCheckpointError(f"checkpoint {path} is not a signal model (train it on a signals store)")
    model = build_signal_model(SignalModelSpec.from_dict(payload["signal_model"]))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CorruptCheckpointError(f"checkpoint weights do not fit model {payload['model_name']}") from exc
    meta = {k: v for k, v in payload.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng")}
    return model.eval(), meta


def predict_signals(model: nn.Module, store_url: str, split: str = "test", *, batch_size: int = 64,
                    device: str = "auto") -> dict[str, Any]:
    """Run a signal model over a split's windows. Returns numpy arrays (store units, e.g. mV):
    classify: {"task", "indices" (N,), "y_true" (N,), "y_prob" (N, K), "y_pred" (N,)};
    forecast: {"task", "indices" (N,), "context" (N, L, T-H), "y_true" (N, L, H), "y_pred" (N, L, H)}.
    `indices` are store rows (of signals/ and windows/); "task" is a `Task`."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, SignalModelSpec):
        raise TrainingError("predict_signals needs a signal model (load_signal_model or build_signal_model)")
    task = as_task(spec.task)
    dev = resolve_device(device)
    ds = SignalWindowDataset(store_url, split, task, horizon=spec.horizon)
    if ds.leads != spec.leads:
        raise TrainingError(f"the model reads {spec.leads} leads; {store_url} has {ds.leads}")
    sampler = BlockShuffleSampler(cast(Any, ds), batch_size, shuffle=False)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=pass_batch)
    result = _infer(model.to(dev), loader, task, dev, _amp_dtype("auto", dev), None)
    if task is Task.forecast:
        position = np.searchsorted(ds.indices, result["indices"])
        result["context"] = ds.read(position)[:, :, : ds.window - ds.horizon]
    return result


__all__ = ["check_signal_training", "forecast_metrics", "horizon_samples", "load_signal_model", "model_spec",
           "predict_signals", "signal_store_facts", "train_signals"]
