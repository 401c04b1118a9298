"""Training loop and inference: `train(store_url, out_dir, config)` and `predict(model, store_url, split)`.

One epoch = one pass over the train split in block-shuffled batches; after each epoch the validation metric is
computed, `last.pt` is written (everything needed to resume) and `best.pt` when the monitored metric improved.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_f1_score
from tqdm.auto import tqdm

from medpipe import __version__
from medpipe.store import ATTRS_KEY, SPLIT_CODES
from medpipe.training import (CheckpointExistsError, CheckpointMismatchError, MissingLabelsError,
                              StoreNotCompleteError, TrainingError)
from medpipe.training.checkpoints import load_checkpoint, save_checkpoint
from medpipe.training.config import RUNTIME_FIELDS, TrainConfig
from medpipe.training.data import (BlockShuffleSampler, ZarrImageDataset, collate_samples, default_augmentation,
                                   open_group, seed_worker, worker_context)
from medpipe.training.models import build_model, model_task

EpochCallback = Callable[[int, dict[str, float]], None]


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


# -- store checks ------------------------------------------------------------------------------------------------
def _store_facts(store_url: str, config: TrainConfig, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate the store for the task; returns its attrs plus num_outputs."""
    root = open_group(store_url, storage_options)
    attrs = dict(root.attrs.get(ATTRS_KEY, {}))
    if not attrs:
        raise StoreNotCompleteError(f"{store_url} is not a medpipe store (no '{ATTRS_KEY}' attributes)")
    if not attrs.get("complete"):
        raise StoreNotCompleteError(f"{store_url} is not complete: ingestion was interrupted or is still running; "
                                    "finish it (rerun `medpipe ingest`, it resumes) before training")
    if "training" not in root or "images" not in root["training"] or "samples" not in root:
        raise StoreNotCompleteError(f"{store_url} has no training arrays or sample table")
    split = np.asarray(root["samples/split"][...])
    labels = np.asarray(root["training/labels"][...])
    train = split == SPLIT_CODES["train"]
    if not train.any():
        raise MissingLabelsError(f"{store_url} has no samples in the train split")
    classes = list(attrs.get("classes") or [])
    if config.task == "classify":
        present = np.unique(labels[train & (labels >= 0)])
        if present.size < 2:
            raise MissingLabelsError(
                f"classification needs labelled train samples of at least 2 classes; {store_url} has "
                f"{int((train & (labels >= 0)).sum())} labelled train samples of {present.size} class(es). "
                "Ingest with a labels manifest (labels.csv with a 'label' column)")
        num_outputs = max(len(classes), int(labels.max()) + 1)
    else:
        if "masks" not in root["training"]:
            raise MissingLabelsError(f"segmentation needs masks; {store_url} has no training/masks "
                                     "(ingest with a manifest 'mask' column)")
        has_mask = np.asarray(root["samples/has_mask"][...]) if "has_mask" in root["samples"] else train
        if not (has_mask & train).any():
            raise MissingLabelsError(f"segmentation needs masks in the train split; {store_url} has none")
        num_outputs = 0  # set from the train masks once loaded
    return {**attrs, "store_url": store_url, "num_outputs": num_outputs, "has_val": bool((split == 1).any()),
            "has_test": bool((split == 2).any())}


def check_training_inputs(store_url: str, config: TrainConfig, out_dir: str | Path | None = None,
                          resume: bool = False, overwrite: bool = False,
                          storage_options: dict[str, Any] | None = None) -> None:
    """Raise a TrainingError now (before any flow starts) for an unknown model, a store unfit for the task or a
    run folder that holds checkpoints already."""
    if config.task not in model_task(config.model_name()):
        raise TrainingError(f"model {config.model_name()!r} does not do {config.task!r}")
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


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


# -- rng state (plain types so checkpoints load with weights_only=True) ----------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
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
    sampler = BlockShuffleSampler(ds, batch_size, seed=config.seed, window=config.block_window, shuffle=shuffle,
                                  drop_last=drop_last)
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    return DataLoader(ds, batch_sampler=sampler, num_workers=config.num_workers, worker_init_fn=seed_worker,
                      generator=generator, pin_memory=device.type == "cuda", collate_fn=collate_samples,
                      multiprocessing_context=worker_context(config.num_workers))


def _start_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make an epoch's order and augmentations a function of (seed, epoch) only, so a resumed run repeats them."""
    loader.batch_sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed * 100_003 + epoch)
    transform = loader.dataset.transform
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=(seed * 100_003 + epoch) % (2**32))


def _to_device(batch: dict[str, Any], task: str, device: torch.device, fmt: torch.memory_format | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    x = batch["image"].to(device, non_blocking=True)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    y = batch["label"] if task == "classify" else batch["mask"]
    return x, y.to(device, non_blocking=True).long()


# -- metrics ---------------------------------------------------------------------------------------------------------
def classification_metrics(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 of labelled samples (y_true >= 0)."""
    keep = y_true >= 0
    if not keep.any():
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    target = torch.as_tensor(y_true[keep])
    pred = torch.as_tensor(y_prob[keep].argmax(axis=1))
    k = y_prob.shape[1]
    return {"accuracy": float((pred == target).float().mean()),
            "macro_f1": float(multiclass_f1_score(pred, target, num_classes=k, average="macro"))}


def segmentation_dice(masks_pred: np.ndarray | torch.Tensor, masks_true: np.ndarray | torch.Tensor,
                      num_outputs: int) -> float:
    """Mean Dice over foreground classes and samples whose ground truth is not empty (MONAI DiceMetric)."""
    pred = one_hot(torch.as_tensor(np.asarray(masks_pred)).long(), num_outputs, dim=1)
    true = one_hot(torch.as_tensor(np.asarray(masks_true)).long(), num_outputs, dim=1)
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    metric(pred, true)
    value = float(metric.aggregate())
    return value


@torch.no_grad()
def _infer(model: nn.Module, loader: DataLoader, task: str, device: torch.device, amp: torch.dtype | None,
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
        if task == "classify":
            probs.append(torch.softmax(out, dim=1).cpu().numpy())
        else:
            preds.append(out.argmax(dim=1, keepdim=True).to(torch.uint8).cpu().numpy())
            trues.append(y.to(torch.uint8).cpu().numpy())
        labels.append(batch["label"].numpy())
        indices.append(np.asarray(batch["index"]))
    result: dict[str, Any] = {
        "task": task,
        "indices": np.concatenate(indices) if indices else np.zeros(0, np.int64),
        "y_true": np.concatenate(labels) if labels else np.zeros(0, np.int64),
    }
    if task == "classify":
        result["y_prob"] = np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)
        result["y_pred"] = result["y_prob"].argmax(axis=1) if probs else np.zeros(0, np.int64)
    else:
        result["masks_pred"] = np.concatenate(preds) if preds else np.zeros((0,), np.uint8)
        result["masks_true"] = np.concatenate(trues) if trues else np.zeros((0,), np.uint8)
    if losses:
        result["loss"] = sum(losses) / max(1, sum(counts))
    return result


def _metrics(result: dict[str, Any], num_outputs: int) -> dict[str, float]:
    if result["task"] == "classify":
        metrics = classification_metrics(result["y_true"], result["y_prob"])
    else:
        dice = segmentation_dice(result["masks_pred"], result["masks_true"], num_outputs) if result["indices"].size else 0.0
        metrics = {"dice": 0.0 if np.isnan(dice) else dice}  # nan = no foreground in the split
    if "loss" in result:
        metrics["val_loss"] = float(result["loss"])
    return metrics


def predict(model: nn.Module, store_url: str, split: str = "test", *, task: str | None = None,
            batch_size: int = 32, device: str = "auto", num_workers: int = 0,
            storage_options: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Run a model over a split. Returns numpy arrays:
    classify: {"task", "indices", "y_true" (N,), "y_prob" (N, K), "y_pred" (N,)};
    segment: {"task", "indices", "y_true" (N,), "masks_pred" (N, 1, ...), "masks_true" (N, 1, ...)} (uint8).
    `indices` are store indices (rows of training/ and samples/)."""
    task = task or getattr(model, "medpipe_task", None) or "classify"
    dev = resolve_device(device)
    ds = ZarrImageDataset(store_url, split, task, cache="none", storage_options=storage_options)
    sampler = BlockShuffleSampler(ds, batch_size, shuffle=False)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_samples,
                        multiprocessing_context=worker_context(num_workers))
    model = model.to(dev)
    return _infer(model, loader, task, dev, _amp_dtype("auto", dev), None, progress=progress)


# -- checkpoints / out_dir -------------------------------------------------------------------------------------------
def _check_resumable(ckpt: dict[str, Any], facts: dict[str, Any], config: TrainConfig, path: Path) -> None:
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
                      ("task", config.task), ("model_name", config.model_name())):
        if ckpt[key] != have:
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


def _improved(value: float, best: float | None, monitor: str) -> bool:
    if np.isnan(value):
        return False
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


# -- training --------------------------------------------------------------------------------------------------------
def train(store_url: str, out_dir: str | Path, config: TrainConfig | None = None, resume: bool = False,
          progress: bool = True, *, overwrite: bool = False, storage_options: dict[str, Any] | None = None,
          on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """Train a model on a store's train split, validate on val each epoch, keep last.pt/best.pt in out_dir.

    resume=True continues from out_dir/last.pt (same store and config); overwrite=True discards existing
    checkpoints. `on_epoch_end(epoch, metrics)` runs after each epoch's checkpoint is written."""
    config = config or TrainConfig()
    started = time.perf_counter()
    out = Path(out_dir)
    model_name = config.model_name()
    if config.task not in model_task(model_name):  # raises UnknownModelError for unknown names
        raise TrainingError(f"model {model_name!r} does not do {config.task!r}")
    facts = _store_facts(store_url, config, storage_options)
    _prepare_out_dir(out, resume, overwrite)
    last_path, best_path = out / "last.pt", out / "best.pt"
    ckpt = load_checkpoint(last_path) if resume else None
    if ckpt is not None:
        _check_resumable(ckpt, facts, config, last_path)

    device = resolve_device(config.device)
    amp = _amp_dtype(config.amp, device)
    _seed_everything(config.seed)
    sample_shape = list(facts["sample_shape"])
    spatial_dims = len(sample_shape) - 1
    batch_size = config.effective_batch_size()
    augment = default_augmentation(config.task, spatial_dims) if config.augment else None
    common = dict(task=config.task, cache=config.cache, cache_max_bytes=config.cache_max_bytes,
                  storage_options=storage_options)
    train_ds = ZarrImageDataset(store_url, "train", transform=augment, **common)
    val_ds = ZarrImageDataset(store_url, "val" if facts["has_val"] else "train", **common)
    num_outputs = facts["num_outputs"] or max(2, _max_mask_label(train_ds) + 1)
    train_loader = _loader(train_ds, config, batch_size, shuffle=True,
                           drop_last=len(train_ds) > batch_size, device=device)
    val_loader = _loader(val_ds, config, batch_size, shuffle=False, drop_last=False, device=device)

    model = build_model(model_name, config.task, spatial_dims, sample_shape[0], num_outputs).to(device)
    fmt = _memory_format(len(sample_shape) + 1) if config.channels_last and device.type == "cuda" else None
    if fmt is not None:
        model = model.to(memory_format=fmt)
    if config.task == "classify":
        weight = None
        if config.class_weights:
            lab = train_ds.labels_all[train_ds.indices]
            counts = np.bincount(lab[lab >= 0], minlength=num_outputs).astype(np.float64)
            weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / num_outputs, dtype=torch.float32, device=device)
        loss_fn: nn.Module = nn.CrossEntropyLoss(weight=weight, ignore_index=-1)
    else:
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * max(1, len(train_loader))
    if config.scheduler == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.2)
    elif config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    else:
        scheduler = None
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    forward = torch.compile(model) if config.compile else model  # checkpoints keep the uncompiled module's weights

    monitor = config.monitor_name()
    history: list[dict[str, float]] = []
    best: float | None = None
    best_epoch, bad_epochs, start_epoch, stopped = 0, 0, 0, False
    if ckpt is not None:
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
    meta = {"config": config.to_dict(), "store_content_hash": facts.get("content_hash"), "code_version": __version__,
            "classes": list(facts.get("classes") or []), "sample_shape": sample_shape, "task": config.task,
            "model_name": model_name, "num_outputs": int(num_outputs), "monitor": monitor}
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            if stopped:
                break
            t0 = time.perf_counter()
            model.train()
            _start_epoch(train_loader, config.seed, epoch)
            total, seen = 0.0, 0
            bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
            for batch in bar:
                x, y = _to_device(batch, config.task, device, fmt)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    out_t = forward(x)
                loss = loss_fn(out_t.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None:
                    scheduler.step()
                total += float(loss.detach()) * x.shape[0]
                seen += x.shape[0]
                bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
            result = _infer(forward, val_loader, config.task, device, amp, fmt, loss_fn)
            metrics = {"epoch": epoch, "train_loss": total / max(seen, 1), **_metrics(result, num_outputs),
                       "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            history.append(metrics)
            value = metrics.get(monitor, float("nan"))
            if _improved(value, best, monitor):
                best, best_epoch, bad_epochs = float(value), epoch, 0
                save_checkpoint(best_path, {**meta, "model": model.state_dict(), "epoch": epoch, "metrics": metrics})
            else:
                bad_epochs += 1
                stopped = config.early_stopping_patience > 0 and bad_epochs >= config.early_stopping_patience
            save_checkpoint(last_path, {
                **meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "epoch": epoch, "metrics": metrics,
                "history": history, "rng": _rng_state(),
                "early_stopping": {"best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs, "stopped": stopped},
            })
            _write_metrics_csv(out / "metrics.csv", history)
            for key, val in metrics.items():
                if key != "epoch":
                    writer.add_scalar(key, val, epoch)
            writer.flush()
            if progress:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("epoch", "lr", "seconds"))
                tqdm.write(f"epoch {epoch}/{config.epochs}: {shown} ({metrics['seconds']:.1f}s)")
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
    finally:
        writer.close()

    test_metrics: dict[str, float] = {}
    if facts["has_test"] and best_path.exists():
        best_ckpt = load_checkpoint(best_path, map_location=device)
        model.load_state_dict(best_ckpt["model"])
        test_ds = ZarrImageDataset(store_url, "test", **common)
        test_loader = _loader(test_ds, config, batch_size, shuffle=False, drop_last=False, device=device)
        test_metrics = _metrics(_infer(model, test_loader, config.task, device, amp, fmt), num_outputs)
    result = TrainResult(out_dir=out, best_path=best_path, last_path=last_path,
                         epochs_completed=len(history), best_epoch=best_epoch,
                         best_metric=float("nan") if best is None else best, monitor=monitor, stopped_early=stopped,
                         device=str(device), history=history, test_metrics=test_metrics,
                         seconds=time.perf_counter() - started)
    (out / "summary.json").write_text(json.dumps({
        "epochs_completed": result.epochs_completed, "best_epoch": best_epoch, "best_metric": result.best_metric,
        "monitor": monitor, "stopped_early": stopped, "device": str(device), "test_metrics": test_metrics,
        "config": config.to_dict(), "store_content_hash": facts.get("content_hash")}, indent=1))
    return result
