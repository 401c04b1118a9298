"""Training loop and inference: `train(store_url, out_dir, config)` and `predict(model, store_url, split)`.

One epoch = one pass over the train split in block-shuffled batches; after each epoch the metrics of the val
split are computed (history columns `val_*`), `last.pt` is written (everything needed to resume) and `best.pt` when
the monitored val metric improved. Metrics come from `medpipe.evaluation.metrics`, the code of the evaluation report.

Validation and test are never silently replaced by other data: with no usable val split, the run warns, trains the
full `epochs` without early stopping and best.pt is the last epoch (`TrainResult.validation` says so); with no
usable test split, `test_metrics` is empty and `TrainResult.testing` says why.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import torch
import zarr
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medpipe import __version__
from medpipe.evaluation.metrics import classification_metrics, mean_foreground_dice
from medpipe.store import ATTRS_KEY, SPLIT_CODES, attrs_of, get_array, get_group
from medpipe.volumes import store_layout
from medpipe.task import Task
from medpipe.training import (CheckpointExistsError, CheckpointMismatchError, MissingLabelsError,
                              StoreNotCompleteError, TrainingError, as_task)
from medpipe.training.checkpoints import load_checkpoint, save_checkpoint
from medpipe.training.config import PLAN_MODEL, RUNTIME_FIELDS, SIGNALS, TrainConfig
from medpipe.training.data import (BlockShuffleSampler, ZarrImageDataset, collate_samples, default_augmentation,
                                   open_group, patient_subset, seed_worker, split_indices,
                                   worker_context)
from medpipe.training.models import build_model, model_task
from medpipe.training.patches import PatchDataset
from medpipe.training.selection import improved, monitor_key

EpochCallback = Callable[[int, dict[str, float]], None]
logger = logging.getLogger(__name__)

VALIDATION_ON_VAL = "val split"
NO_VALIDATION = "none: val split {why} — no early stopping, best.pt = last epoch"
TEST_ON_TEST = "test split (best.pt)"
NO_TEST = "none: test split {why} — no test metrics"


@dataclass
class TrainResult:
    """What a training run produced."""

    out_dir: Path
    best_path: Path
    last_path: Path
    epochs_completed: int
    best_epoch: int
    best_metric: float
    monitor: str
    stopped_early: bool
    device: str
    history: list[dict[str, float]] = field(default_factory=list)
    test_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    validation: str = VALIDATION_ON_VAL  # what selected best.pt: "val split", or "none: ..." (the reason)
    testing: str = TEST_ON_TEST          # where test_metrics come from, or "none: ..." (the reason)


# -- store checks ------------------------------------------------------------------------------------------------
def _complete_attrs(root: zarr.Group, store_url: str) -> dict[str, Any]:
    """The medpipe attributes of a store; StoreNotCompleteError when it is not a medpipe store or unfinished."""
    attrs = attrs_of(root)
    if not attrs:
        raise StoreNotCompleteError(f"{store_url} is not a medpipe store (no '{ATTRS_KEY}' attributes)")
    if not attrs.get("complete"):
        raise StoreNotCompleteError(f"{store_url} is not complete: ingestion was interrupted or is still running; "
                                    "finish it (rerun `medpipe ingest`, it resumes) before training")
    return attrs


def _store_facts(store_url: str, config: TrainConfig, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate the store for the task; returns its attrs plus num_outputs."""
    root = open_group(store_url, storage_options)
    attrs = _complete_attrs(root, store_url)
    if "training" not in root or "images" not in get_group(root, "training") or "samples" not in root:
        raise StoreNotCompleteError(f"{store_url} has no training arrays or sample table")
    split = np.asarray(get_array(root, "samples/split")[...])
    labels = np.asarray(get_array(root, "training/labels")[...])
    train = split == SPLIT_CODES["train"]
    if not train.any():
        raise MissingLabelsError(f"{store_url} has no samples in the train split")
    classes = list(attrs.get("classes") or [])
    has_mask = None
    if config.task is Task.classify:
        present = np.unique(labels[train & (labels >= 0)])
        if present.size < 2:
            raise MissingLabelsError(
                f"classification needs labelled train samples of at least 2 classes; {store_url} has "
                f"{int((train & (labels >= 0)).sum())} labelled train samples of {present.size} class(es). "
                "Ingest with a labels manifest (labels.csv with a 'label' column)")
        num_outputs = max(len(classes), int(labels.max()) + 1)
    else:
        if "masks" not in get_group(root, "training"):
            raise MissingLabelsError(f"segmentation needs masks; {store_url} has no training/masks "
                                     "(ingest with a manifest 'mask' column)")
        has_mask = (np.asarray(get_array(root, "samples/has_mask")[...], dtype=bool)
                    if "has_mask" in get_group(root, "samples")
                    else np.ones(split.shape, dtype=bool))
        if not (has_mask & train).any():
            raise MissingLabelsError(f"segmentation needs masks in the train split; {store_url} has none")
        num_outputs = 0  # set from the train masks once loaded
    scorable = labels >= 0 if has_mask is None else has_mask
    return {**attrs, "store_url": store_url, "num_outputs": num_outputs, "has_mask": has_mask,
            "val_empty": _empty_reason(split == SPLIT_CODES["val"], scorable, config.task),
            "test_empty": _empty_reason(split == SPLIT_CODES["test"], scorable, config.task)}


def _empty_reason(in_split: np.ndarray, scorable: np.ndarray, task: Task) -> str | None:
    """Why a split cannot be scored ("empty", "has no labelled samples", "has no masks"), None when it can."""
    if not in_split.any():
        return "empty"
    if not (in_split & scorable).any():
        return "has no labelled samples" if task is Task.classify else "has no masks"
    return None


def check_training_inputs(store_url: str, config: TrainConfig, out_dir: str | Path | None = None,
                          resume: bool = False, overwrite: bool = False,
                          storage_options: dict[str, Any] | None = None) -> None:
    """Raise a TrainingError now (before any flow starts) for an unknown model, a store unfit for the task or a
    run folder that holds checkpoints already (volumes stores: also a PlanningError for a plan override)."""
    layout = store_layout_of(store_url, storage_options)
    if layout == "volumes":
        from medpipe.training.patch_training import check_volume_inputs

        check_volume_inputs(store_url, config, storage_options)
    elif layout == SIGNALS:
        from medpipe.signals.train import check_signal_training

        check_signal_training(store_url, config)
    else:
        _check_model(config, layout)
        _store_facts(store_url, config, storage_options)
    if out_dir is not None and not resume and not overwrite and (Path(out_dir) / "last.pt").exists():
        raise CheckpointExistsError(f"{out_dir} already holds checkpoints: pass --resume to continue that run or "
                                    "--overwrite to discard it")


def _max_mask_label(ds: ZarrImageDataset) -> int:
    """Largest mask label in a split (reads the split chunk-wise when not cached)."""
    if ds.cached:
        return int(ds._cache["masks"].max()) if len(ds) else 0
    best = 0
    for block in ds.blocks():
        best = max(best, int(ds.read_arrays(block)["masks"].max()))
    return best


# -- device / precision ------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """CUDA when asked or available (auto), else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' asked but CUDA is not available; use device 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _memory_format(ndim: int) -> torch.memory_format | None:
    """channels-last format of a batch of `ndim` dims (4: 2D images, 5: 3D); None for others (1D signals)."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)


# -- rng state (plain types so checkpoints load with weights_only=True) ----------------------------------------------
def _rng_state() -> dict[str, Any]:
    # legacy=True (numpy's default) gives the MT19937 tuple for the global generator; the stub's union covers
    # other bit generators, which np.random's global state never uses
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# -- data ------------------------------------------------------------------------------------------------------------
def _loader(ds: ZarrImageDataset, config: TrainConfig, batch_size: int, shuffle: bool, drop_last: bool,
            device: torch.device) -> DataLoader:
    # workers=: each DataLoader worker gets whole windows of chunks, so no chunk is decoded twice. Workers are not
    # persistent: each epoch's augmentation RNG is reseeded in the workers at their start (resumed runs repeat it)
    sampler = BlockShuffleSampler(ds, batch_size, seed=config.seed, window=config.block_window, shuffle=shuffle,
                                  drop_last=drop_last, workers=config.num_workers)
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    return DataLoader(ds, batch_sampler=sampler, num_workers=config.num_workers, worker_init_fn=seed_worker,
                      generator=generator, pin_memory=device.type == "cuda", collate_fn=collate_samples,
                      multiprocessing_context=worker_context(config.num_workers))


def _start_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make an epoch's order and augmentations a function of (seed, epoch) only, so a resumed run repeats them."""
    for part in (loader.batch_sampler, loader.dataset):  # _loader's sampler, or a PatchDataset
        if isinstance(part, (BlockShuffleSampler, PatchDataset)):
            part.set_epoch(epoch)
    loader.generator.manual_seed(seed * 100_003 + epoch)
    transform = getattr(loader.dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=(seed * 100_003 + epoch) % (2**32))


def _to_device(batch: dict[str, Any], task: Task, device: torch.device, fmt: torch.memory_format | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    x = batch["image"].to(device, non_blocking=True)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    if task is Task.forecast:  # a float target: the next samples of the signal window
        return x, batch["target"].to(device, non_blocking=True).float()
    y = batch["label"] if task is Task.classify else batch["mask"]
    return x, y.to(device, non_blocking=True).long()


# -- metrics ---------------------------------------------------------------------------------------------------------
def split_metrics(result: dict[str, Any], num_outputs: int, classes: Sequence[str] = (),
                  has_mask: np.ndarray | None = None) -> dict[str, float]:
    """Monitorable metrics of a `predict` result, from medpipe.evaluation.metrics (the evaluation report's code).

    classify: {"accuracy", "macro_f1"} over labelled samples (y_true >= 0) of y_prob (N, K=num_outputs);
    segment: {"dice"} = `mean_foreground_dice` of masks_pred/masks_true (N, 1, *spatial) over the samples that
    have a mask (`has_mask[indices]`, store rows; all when None); an empty prediction of an empty mask scores 1.0.
    NaN when nothing is scorable. Adds "loss" when the result has one."""
    nan = float("nan")
    if result["task"] is Task.classify:
        keep = result["y_true"] >= 0
        y_true, y_prob = result["y_true"][keep], result["y_prob"][keep]
        if not keep.any() or not np.all(np.isfinite(y_prob)):
            metrics = {"accuracy": nan, "macro_f1": nan}
        else:
            names = [*list(classes)[:num_outputs], *(f"class {k}" for k in range(len(classes), num_outputs))]
            full = classification_metrics(y_true, y_prob, names)
            metrics = {"accuracy": float(full["accuracy"]), "macro_f1": float(full["f1_macro"])}
    else:
        keep = (np.ones(result["indices"].shape, dtype=bool) if has_mask is None
                else np.asarray(has_mask, dtype=bool)[result["indices"]])
        metrics = {"dice": mean_foreground_dice(result["masks_pred"][keep], result["masks_true"][keep], num_outputs)
                   if keep.any() else nan}
    if "loss" in result:
        metrics["loss"] = float(result["loss"])
    return metrics


@torch.no_grad()
def _infer(model: nn.Module, loader: DataLoader, task: Task, device: torch.device, amp: torch.dtype | None,
           fmt: torch.memory_format | None, loss_fn: nn.Module | None = None, progress: bool = False
           ) -> dict[str, Any]:
    model.eval()
    probs, preds, trues, labels, indices, losses, counts = [], [], [], [], [], [], []
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        x, y = _to_device(batch, task, device, fmt)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        out = out.float()
        if loss_fn is not None:
            losses.append(float(loss_fn(out, y)) * x.shape[0])
            counts.append(x.shape[0])
        if task is Task.classify:
            probs.append(torch.softmax(out, dim=1).cpu().numpy())
        elif task is Task.forecast:
            preds.append(out.cpu().numpy())
            trues.append(y.cpu().numpy().copy())  # on the CPU y may be a view of the batch: keep a copy, not it
        else:
            preds.append(out.argmax(dim=1, keepdim=True).to(torch.uint8).cpu().numpy())
            trues.append(y.to(torch.uint8).cpu().numpy())
        if "label" in batch:  # copies: a view would keep the whole batch block (a worker's ring slot) alive
            labels.append(batch["label"].numpy().copy())
        indices.append(np.array(batch["index"]))
    result: dict[str, Any] = {
        "task": task,
        "indices": np.concatenate(indices) if indices else np.zeros(0, np.int64),
        "y_true": np.concatenate(labels) if labels else np.zeros(0, np.int64),
    }
    if task is Task.classify:
        result["y_prob"] = np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)
        result["y_pred"] = result["y_prob"].argmax(axis=1) if probs else np.zeros(0, np.int64)
    elif task is Task.forecast:  # y_true / y_pred (N, L, H): the target samples and their forecast
        result["y_true"] = np.concatenate(trues) if trues else np.zeros((0, 0, 0), np.float32)
        result["y_pred"] = np.concatenate(preds) if preds else np.zeros((0, 0, 0), np.float32)
    else:
        result["masks_pred"] = np.concatenate(preds) if preds else np.zeros((0,), np.uint8)
        result["masks_true"] = np.concatenate(trues) if trues else np.zeros((0,), np.uint8)
    if losses:
        result["loss"] = sum(losses) / max(1, sum(counts))
    return result


def predict(model: nn.Module, store_url: str, split: str = "test", *, task: Task | str | None = None,
            batch_size: int = 32, device: str = "auto", num_workers: int = 0,
            storage_options: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Run a model over a split. Returns numpy arrays:
    classify: {"task", "indices", "y_true" (N,), "y_prob" (N, K), "y_pred" (N,)};
    segment: {"task", "indices", "y_true" (N,), "masks_pred" (N, 1, ...), "masks_true" (N, 1, ...)} (uint8).
    `indices` are store indices (rows of training/ and samples/); "task" is a `Task`."""
    task = as_task(task or getattr(model, "medpipe_task", None) or Task.classify)
    dev = resolve_device(device)
    ds = ZarrImageDataset(store_url, split, task, cache="none", storage_options=storage_options)
    sampler = BlockShuffleSampler(ds, batch_size, shuffle=False, workers=num_workers)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_samples,
                        multiprocessing_context=worker_context(num_workers))
    model = model.to(dev)
    return _infer(model, loader, task, dev, _amp_dtype("auto", dev), None, progress=progress)


# -- checkpoints / out_dir -------------------------------------------------------------------------------------------
def _check_resumable(ckpt: dict[str, Any], facts: dict[str, Any], config: TrainConfig, path: Path,
                     model_name: str) -> None:
    if ckpt["store_content_hash"] != facts.get("content_hash"):
        raise CheckpointMismatchError(f"{path} was trained on a different store (content hash "
                                      f"{str(ckpt['store_content_hash'])[:12]} vs {str(facts.get('content_hash'))[:12]}); "
                                      "train into a new out_dir or pass overwrite")
    theirs = dict(ckpt["config"])
    ours = config.to_dict()
    differ = sorted(k for k in set(theirs) | set(ours) if k not in RUNTIME_FIELDS and theirs.get(k) != ours.get(k))
    if differ:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in differ)
        raise CheckpointMismatchError(f"{path} was made with a different config ({detail}); resume with the same "
                                      "settings or train into a new out_dir")
    for key, have in (("sample_shape", list(facts.get("sample_shape") or [])), ("classes", list(facts.get("classes") or [])),
                      ("task", config.task.value), ("model_name", model_name)):
        if ckpt[key] != have:  # a loaded "task" is a Task, equal to its value string
            raise CheckpointMismatchError(f"{path} has {key}={ckpt[key]!r} but this run has {have!r}")


def _prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    existing = [p for p in (out / "last.pt", out / "best.pt") if p.exists()]
    if resume:
        if not (out / "last.pt").exists():
            raise CheckpointExistsError(f"nothing to resume: {out / 'last.pt'} does not exist")
        return
    if existing and not overwrite:
        raise CheckpointExistsError(f"{out} already holds checkpoints ({', '.join(p.name for p in existing)}); "
                                    "pass resume=True to continue that run or overwrite=True to start over")
    for name in ("last.pt", "best.pt", "metrics.csv", "summary.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


# -- training --------------------------------------------------------------------------------------------------------
def store_layout_of(store_url: str, storage_options: dict[str, Any] | None = None) -> str:
    """"volumes", "fixed" or "signals" (a signals store, medpipe.signals.store): the training layout of a store
    (StoreNotCompleteError when there is no store)."""
    attrs = attrs_of(open_group(store_url, storage_options))
    return SIGNALS if attrs.get("kind") == SIGNALS else store_layout(attrs)


def _check_model(config: TrainConfig, layout: str) -> str:
    """The model name this run trains; TrainingError when it does not do the task or does not fit the layout."""
    name = config.model_name(layout)
    if config.task not in model_task(name):  # raises UnknownModelError for unknown names
        raise TrainingError(f"model {name!r} does not do {config.task!r}")
    if (name == PLAN_MODEL) != (layout == "volumes"):
        raise TrainingError(f"model {name!r} does not train on a {layout}-layout store: use model auto"
                            + ("" if layout == "volumes" else " (or ingest with preprocess.layout: volumes for plan-unet)"))
    return name


def _open_run(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Prepare out_dir (see `_prepare_out_dir`); the checkpoint to resume from, None for a fresh run."""
    _prepare_out_dir(out, resume, overwrite)
    return load_checkpoint(out / "last.pt") if resume else None


def _validation_mode(facts: dict[str, Any], store_url: str) -> str:
    """VALIDATION_ON_VAL, or the NO_VALIDATION reason (warned) when the val split cannot be scored."""
    if facts["val_empty"] is None:
        return VALIDATION_ON_VAL
    validation = NO_VALIDATION.format(why=facts["val_empty"])
    _warn(f"{store_url}: no validation — {validation}. Ingest with a val fraction (split: val) to select "
          "the model on held-out data", stacklevel=4)
    return validation


def _run_meta(config: TrainConfig, facts: dict[str, Any], model_name: str, num_outputs: int,
              validation: str, **extra: Any) -> dict[str, Any]:
    """Checkpoint entries besides weights and training state (`extra`: layout-specific entries)."""
    return {"config": config.to_dict(), "store_content_hash": facts.get("content_hash"), "code_version": __version__,
            "classes": list(facts.get("classes") or []), "sample_shape": list(facts["sample_shape"]),
            "task": config.task.value, "model_name": model_name, "num_outputs": int(num_outputs),
            "monitor": config.monitor_name(), "validation": validation, **extra}


@dataclass
class FitJob:
    """One training run as a loop builds it for `fit`: the model and its data, how to score val and test."""

    store_url: str
    out: Path
    config: TrainConfig
    facts: dict[str, Any]  # store facts: content_hash, test_empty, ...
    model: nn.Module
    loss_fn: nn.Module
    train_loader: DataLoader
    device: torch.device
    validate: Callable[[nn.Module, nn.Module], dict[str, float]] | None  # (module, loss) -> val metrics, or None
    score_test: Callable[[nn.Module], dict[str, float]]  # best.pt's module -> test metrics
    meta: dict[str, Any]  # `_run_meta`
    validation: str  # VALIDATION_ON_VAL or the NO_VALIDATION reason
    epochs: int
    ckpt: dict[str, Any] | None = None  # last.pt when resuming
    started: float = field(default_factory=time.perf_counter)


def _optimizer(model: nn.Module, config: TrainConfig, steps: int
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    if config.scheduler == "onecycle":
        # OneCycle needs a few steps per phase (it divides by the phase length): a run of fewer than 10 steps (a
        # tiny train subset) follows the start of a 10-step cycle
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=max(steps, 10),
                                                        pct_start=0.2)
    elif config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    else:
        scheduler = None
    return optimizer, scheduler


def _train_epoch(forward: nn.Module, job: FitJob, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, scaler: torch.amp.GradScaler,
                 amp: torch.dtype | None, fmt: torch.memory_format | None, desc: str, progress: bool) -> float:
    """One pass over the train loader; the mean training loss per sample."""
    total, seen = 0.0, 0
    bar = tqdm(job.train_loader, desc=desc, disable=not progress, leave=False)
    for batch in bar:
        x, y = _to_device(batch, job.config.task, job.device, fmt)
        with torch.autocast(job.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out_t = forward(x)
        loss = job.loss_fn(out_t.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * x.shape[0]
        seen += x.shape[0]
        bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
    return total / max(seen, 1)


def fit(job: FitJob, progress: bool = True, on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """The epoch loop shared by both layouts: train, validate (val only), select best.pt / stop early, write
    last.pt, metrics.csv and TensorBoard each epoch, then score test once with best.pt and write summary.json."""
    config, device, model, out = job.config, job.device, job.model, job.out
    last_path, best_path = out / "last.pt", out / "best.pt"
    amp = _amp_dtype(config.amp, device)
    fmt = _memory_format(len(job.meta["sample_shape"]) + 1) if config.channels_last and device.type == "cuda" else None
    if fmt is not None:
        # Module.to accepts memory_format at runtime (see its docstring); torch's overload stubs omit it
        model = model.to(memory_format=fmt)  # type: ignore[call-overload]
    epochs = job.epochs
    optimizer, scheduler = _optimizer(model, config, epochs * max(1, len(job.train_loader)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    # checkpoints keep the uncompiled module's weights; torch.compile of a Module returns a Module (OptimizedModule)
    forward = cast(nn.Module, torch.compile(model)) if config.compile else model

    monitor = config.monitor_name()
    history: list[dict[str, float]] = []
    best: float | None = None
    best_epoch, bad_epochs, start_epoch, stopped = 0, 0, 0, False
    if job.ckpt is not None:
        ckpt = job.ckpt
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        early = ckpt["early_stopping"]
        best, best_epoch, bad_epochs, stopped = early["best"], early["best_epoch"], early["bad_epochs"], early["stopped"]
        history = list(ckpt["history"])
        start_epoch = int(ckpt["epoch"])
        _set_rng_state(ckpt["rng"])

    from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import

    if history:  # a resumed run: drop rows written after the checkpoint (a kill mid-epoch)
        _write_metrics_csv(out / "metrics.csv", history)
    writer = SummaryWriter(log_dir=str(out / "tb"), purge_step=start_epoch + 1 if start_epoch else None)
    meta = job.meta
    try:
        for epoch in range(start_epoch + 1, epochs + 1):
            if stopped:
                break
            t0 = time.perf_counter()
            model.train()
            _start_epoch(job.train_loader, config.seed, epoch)
            train_loss = _train_epoch(forward, job, optimizer, scheduler, scaler, amp, fmt, f"epoch {epoch}/{epochs}",
                                      progress)
            metrics: dict[str, float] = {"epoch": epoch, "train_loss": train_loss}
            if job.validate is not None:  # val split only: the monitor never sees train or test samples
                val = job.validate(forward, job.loss_fn)
                metrics.update({monitor_key(k): v for k, v in val.items()})
            metrics.update(lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - t0)
            history.append(metrics)
            value = metrics.get(monitor_key(monitor), float("nan"))
            if job.validate is None:  # no model selection: best.pt is simply the latest epoch
                best_epoch = epoch
                save_checkpoint(best_path, {**meta, "model": model.state_dict(), "epoch": epoch, "metrics": metrics})
            elif improved(value, best, monitor):
                best, best_epoch, bad_epochs = float(value), epoch, 0
                save_checkpoint(best_path, {**meta, "model": model.state_dict(), "epoch": epoch, "metrics": metrics})
            else:
                bad_epochs += 1
                stopped = (config.early_stopping_patience > 0 and bad_epochs >= config.early_stopping_patience
                           and epoch >= config.early_stopping_after * epochs)
            save_checkpoint(last_path, {
                **meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "epoch": epoch, "metrics": metrics,
                "history": history, "rng": _rng_state(),
                "early_stopping": {"best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs, "stopped": stopped},
            })
            _write_metrics_csv(out / "metrics.csv", history)
            for key, scalar in metrics.items():
                if key != "epoch":
                    writer.add_scalar(key, scalar, epoch)
            writer.flush()
            if progress:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("epoch", "lr", "seconds"))
                tqdm.write(f"epoch {epoch}/{epochs}: {shown} ({metrics['seconds']:.1f}s)")
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
    finally:
        writer.close()

    # Test: once, after training, on best.pt; never read by selection or early stopping.
    test_metrics: dict[str, float] = {}
    testing = TEST_ON_TEST
    if job.facts["test_empty"] is not None:
        testing = NO_TEST.format(why=job.facts["test_empty"])
    elif not best_path.exists():
        testing = NO_TEST.format(why="not scored: no best.pt (the val metric was never finite)")
    if testing != TEST_ON_TEST:
        _warn(f"{job.store_url}: {testing}", stacklevel=4)
    else:
        best_ckpt = load_checkpoint(best_path, map_location=device)
        model.load_state_dict(best_ckpt["model"])
        test_metrics = job.score_test(model)
    result = TrainResult(out_dir=out, best_path=best_path, last_path=last_path,
                         epochs_completed=len(history), best_epoch=best_epoch,
                         best_metric=float("nan") if best is None else best, monitor=monitor, stopped_early=stopped,
                         device=str(device), history=history, test_metrics=test_metrics,
                         seconds=time.perf_counter() - job.started, validation=job.validation, testing=testing)
    (out / "summary.json").write_text(json.dumps({
        "epochs_completed": result.epochs_completed, "best_epoch": best_epoch, "best_metric": result.best_metric,
        "monitor": monitor, "stopped_early": stopped, "device": str(device), "test_metrics": test_metrics,
        "validation": job.validation, "testing": testing,
        "config": config.to_dict(), "store_content_hash": job.facts.get("content_hash")}, indent=1))
    return result


def synthetic_extra(store_url: str, config: TrainConfig, n_real: int
                    ) -> tuple[tuple[np.ndarray, np.ndarray] | None, dict[str, Any] | None]:
    """(images, labels) of the synthetic samples a run mixes into its train split, and their lineage for the
    checkpoint (None, None at synthetic_ratio 0). round(ratio * n_real) samples drawn without replacement with the
    run's seed (all of them, with a warning, when the set is smaller)."""
    if config.synthetic_ratio <= 0:
        return None, None
    if config.task is not Task.classify:
        raise TrainingError("synthetic_ratio applies to classification (the GAN makes labelled 2D images)")
    from medpipe.gan.synthetic import read_synthetic

    images, labels, provenance = read_synthetic(store_url)
    wanted = int(round(config.synthetic_ratio * n_real))
    if wanted > len(labels):
        _warn(f"synthetic_ratio {config.synthetic_ratio} asks for {wanted} synthetic samples; the store has "
              f"{len(labels)}: all of them are used")
    pick = np.sort(np.random.default_rng(config.seed).permutation(len(labels))[: min(wanted, len(labels))])
    lineage = {"generator_sha256": provenance.get("generator_sha256"), "seed": provenance.get("seed"),
               "n_used": int(pick.size), "ratio": config.synthetic_ratio}
    return (images[pick], labels[pick]), lineage


def train(store_url: str, out_dir: str | Path, config: TrainConfig | None = None, resume: bool = False,
          progress: bool = True, *, overwrite: bool = False, storage_options: dict[str, Any] | None = None,
          on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """Train a model on a store's train split, validate on val each epoch, keep last.pt/best.pt in out_dir.

    best.pt and early stopping read val metrics only (history columns `val_*`); test metrics are computed once,
    after training, from best.pt. Without a usable val split the run warns (warnings + logger), trains all epochs
    and best.pt is the last one; without a usable test split `test_metrics` is empty (see `TrainResult`).
    resume=True continues from out_dir/last.pt (same store and config); overwrite=True discards existing
    checkpoints. `on_epoch_end(epoch, metrics)` runs after each epoch's checkpoint is written.
    A store of the "volumes" layout (whole 3D cases) trains a plan U-Net on random patches instead
    (`medpipe.training.patch_training.train_volumes`); a signals store trains a signal model
    (`medpipe.signals.train.train_signals`)."""
    config = config or TrainConfig()
    started = time.perf_counter()
    layout = store_layout_of(store_url, storage_options)
    if layout == "volumes":
        from medpipe.training.patch_training import train_volumes

        return train_volumes(store_url, out_dir, config, resume, progress, overwrite=overwrite,
                             storage_options=storage_options, on_epoch_end=on_epoch_end)
    if layout == SIGNALS:  # windows of physiological signals: medpipe.signals.train (local stores)
        from medpipe.signals.train import train_signals

        return train_signals(store_url, out_dir, config, resume, progress, overwrite=overwrite,
                             on_epoch_end=on_epoch_end)
    out = Path(out_dir)
    model_name = _check_model(config, layout)
    facts = _store_facts(store_url, config, storage_options)
    ckpt = _open_run(out, resume, overwrite)
    if ckpt is not None:
        _check_resumable(ckpt, facts, config, out / "last.pt", model_name)

    device = resolve_device(config.device)
    _seed_everything(config.seed)
    sample_shape = list(facts["sample_shape"])
    spatial_dims = len(sample_shape) - 1
    batch_size = config.effective_batch_size()
    augment = default_augmentation(config.task, spatial_dims) if config.augment else None
    common: dict[str, Any] = dict(task=config.task, cache=config.cache, cache_max_bytes=config.cache_max_bytes,
                  storage_options=storage_options)
    validation = _validation_mode(facts, store_url)
    root = open_group(store_url, storage_options)
    rows = patient_subset(root, "train", config.train_fraction, config.seed) if config.train_fraction < 1 else None
    extra, synthetic = synthetic_extra(store_url, config, len(split_indices(root, "train") if rows is None else rows))
    if config.synthetic_only:  # TSTR: no real train sample at all
        if extra is None:
            raise TrainingError("synthetic_only needs synthetic_ratio > 0 (and a synthetic set: medpipe augment)")
        rows = np.zeros(0, np.int64)
    train_ds = ZarrImageDataset(store_url, "train", transform=augment, extra=extra, rows=rows, **common)
    num_outputs = facts["num_outputs"] or max(2, _max_mask_label(train_ds) + 1)
    train_loader = _loader(train_ds, config, batch_size, shuffle=True,
                           drop_last=len(train_ds) > batch_size, device=device)
    val_loader = None
    if validation == VALIDATION_ON_VAL:
        val_loader = _loader(ZarrImageDataset(store_url, "val", **common), config, batch_size, shuffle=False,
                             drop_last=False, device=device)
    classes = list(facts.get("classes") or [])

    model = build_model(model_name, config.task, spatial_dims, sample_shape[0], num_outputs).to(device)
    if config.task is Task.classify:
        weight = None
        if config.class_weights:
            lab = train_ds.labels_all[train_ds.indices]
            counts = np.bincount(lab[lab >= 0], minlength=num_outputs).astype(np.float64)
            weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / num_outputs, dtype=torch.float32, device=device)
        loss_fn: nn.Module = nn.CrossEntropyLoss(weight=weight, ignore_index=-1)
    else:
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    amp = _amp_dtype(config.amp, device)
    fmt = _memory_format(len(sample_shape) + 1) if config.channels_last and device.type == "cuda" else None

    def score(loader: DataLoader, module: nn.Module, loss: nn.Module | None) -> dict[str, float]:
        return split_metrics(_infer(module, loader, config.task, device, amp, fmt, loss), num_outputs, classes,
                             facts["has_mask"])

    def score_test(module: nn.Module) -> dict[str, float]:
        test_ds = ZarrImageDataset(store_url, "test", **common)
        return score(_loader(test_ds, config, batch_size, shuffle=False, drop_last=False, device=device), module, None)

    job = FitJob(store_url=store_url, out=out, config=config, facts=facts, model=model, loss_fn=loss_fn,
                 train_loader=train_loader, device=device,
                 validate=None if val_loader is None else partial(score, val_loader),
                 score_test=score_test, meta={**_run_meta(config, facts, model_name, num_outputs, validation),
                                              "synthetic": synthetic},
                 validation=validation, epochs=config.effective_epochs(layout), ckpt=ckpt, started=started)
    return fit(job, progress, on_epoch_end)


def _warn(message: str, stacklevel: int = 3) -> None:
    """Say it loudly: a Python warning (shown once per call site by default) and a logger warning."""
    warnings.warn(message, UserWarning, stacklevel=stacklevel)
    logger.warning(message)
