"""Patch-based 3D segmentation training on a "volumes"-layout store (nnU-Net's 3d_fullres, on CPU or CUDA).

`train_volumes` is what `medpipe.training.engine.train` runs when the store holds whole cases
(`medpipe.volumes`): a plan U-Net (`build_plan_unet`, MONAI DynUNet) learns from random patches of the train
cases (`PatchDataset`, foreground-oversampled, the last `ceil(batch * oversample)` of each batch centred on a
foreground voxel), with DiceCE loss and optional deep supervision. After each epoch every val case is predicted
whole by sliding-window inference (`medpipe.inference.predict_volume`) in the stored grid and scored with the
evaluation report's Dice (`mean_foreground_dice`); best.pt, early stopping, last.pt/resume, metrics.csv and the
test scoring on best.pt are the fixed layout's (`engine.fit`). The spacing is fixed at ingest: re-planning
(`config.plan`, `patch_size`, `batch_size` overrides, or a CPU-planned store trained on CUDA) keeps it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader

from medpipe.evaluation.metrics import mean_foreground_dice
from medpipe.inference import predict_volume
from medpipe.planning import SegmentationPlan, plan_segmentation
from medpipe.store import ATTRS_KEY, SPLIT_CODES, get_array
from medpipe.task import Task
from medpipe.training import MissingLabelsError, StoreNotCompleteError, TrainingError
from medpipe.training.config import TrainConfig
from medpipe.training.data import open_group, seed_worker, worker_context
from medpipe.training.engine import (VALIDATION_ON_VAL, EpochCallback, FitJob, TrainResult, _amp_dtype,
                                     _check_model, _check_resumable, _complete_attrs, _empty_reason, _open_run,
                                     _run_meta, _seed_everything, _validation_mode, fit, resolve_device)
from medpipe.training.models import build_plan_unet
from medpipe.training.patches import PatchDataset, patch_augmentation
from medpipe.volumes import VolumeCase, open_case

logger = logging.getLogger(__name__)

SLIDING_WINDOW_OVERLAP = 0.5  # validation and test windows overlap by half a patch (nnU-Net's default)
DEEP_SUPERVISION_DECAY = 0.5  # nnU-Net: head s (0 = full resolution) weighs 1 / 2**s before normalising

__all__ = ["DeepSupervisionLoss", "check_volume_inputs", "deep_supervision_weights", "max_mask_label", "resolve_plan", "score_cases",
           "train_volumes", "volume_store_facts"]


# -- the store -------------------------------------------------------------------------------------------------------
def volume_store_facts(store_url: str, config: TrainConfig,
                       storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate a volumes-layout store for `config` (task segment, model auto/plan-unet, complete, masks in the
    train split). Returns its attributes plus the per-case columns `split` (N,), `has_mask` (N,),
    `volume_shape` (N, 3) and `val_empty` / `test_empty` (None, or why the split cannot be scored)."""
    root = open_group(store_url, storage_options)
    if config.task is not Task.segment:
        raise TrainingError(f"{store_url} holds whole 3D volumes (layout volumes), which train {Task.segment.value} "
                            f"only; to {config.task.value}, ingest with `preprocess.layout: fixed`")
    _check_model(config, "volumes")
    attrs = _complete_attrs(root, store_url)
    if "samples" not in root or "plan" not in attrs:
        raise StoreNotCompleteError(f"{store_url} has no sample table or segmentation plan ('{ATTRS_KEY}' attrs)")
    split = np.asarray(get_array(root, "samples/split")[...])
    has_mask = np.asarray(get_array(root, "samples/has_mask")[...], dtype=bool)
    if not (has_mask & (split == SPLIT_CODES["train"])).any():
        raise MissingLabelsError(f"segmentation needs masks in the train split; {store_url} has none")
    return {**attrs, "split": split, "has_mask": has_mask,
            "volume_shape": np.asarray(get_array(root, "samples/volume_shape")[...], dtype=np.int64).reshape(-1, 3),
            "val_empty": _empty_reason(split == SPLIT_CODES["val"], has_mask, Task.segment),
            "test_empty": _empty_reason(split == SPLIT_CODES["test"], has_mask, Task.segment)}


def check_volume_inputs(store_url: str, config: TrainConfig, storage_options: dict[str, Any] | None = None) -> None:
    """Raise now what `train_volumes` would raise before training: the store checks of `volume_store_facts` and a
    plan override that cannot be planned (`PlanningError`)."""
    facts = volume_store_facts(store_url, config, storage_options)
    resolve_plan(facts, config, resolve_device(config.device), int(facts["sample_shape"][0]), 2)


def _cases(root: zarr.Group, facts: dict[str, Any], split: str) -> list[VolumeCase]:
    """The cases of `split` that have a mask (the scorable ones), in store order."""
    keep = (facts["split"] == SPLIT_CODES[split]) & facts["has_mask"]
    return [open_case(root, int(i)) for i in np.flatnonzero(keep)]


def max_mask_label(masks: Sequence[zarr.Array]) -> int:
    """The largest label in (1, Z, Y, X) masks, read one slab of Z chunks at a time."""
    best = 0
    for mask in masks:
        step = int(mask.chunks[-3])
        for z0 in range(0, int(mask.shape[-3]), step):
            best = max(best, int(np.asarray(mask[..., z0 : z0 + step, :, :]).max(initial=0)))
    return best


def resolve_plan(facts: dict[str, Any], config: TrainConfig, device: torch.device, in_channels: int,
                 num_outputs: int) -> SegmentationPlan:
    """The plan this run trains: the store's, or re-planned at the store's `training_spacing` when the config
    overrides it (`plan`, `patch_size`, `batch_size`; the ingest's own plan overrides still apply) or when a
    store planned for the CPU budget trains on CUDA (then with the CUDA memory budget; a note says so)."""
    stored = SegmentationPlan.from_dict(facts["plan"])
    overrides: dict[str, Any] = dict(config.plan)
    if config.patch_size is not None:
        overrides["patch_size"] = list(config.patch_size)
    if config.batch_size is not None:
        overrides["batch_size"] = config.batch_size
    for_cuda = device.type == "cuda" and stored.budget_source == "cpu"
    if not overrides and not for_cuda:
        return stored
    ingest_overrides = dict(((facts.get("config") or {}).get("preprocess") or {}).get("plan") or {})
    spacing = [float(v) for v in facts.get("training_spacing") or stored.target_spacing]
    shapes = [list(s) for s, code in zip(facts["volume_shape"], facts["split"]) if code >= 0]
    plan = plan_segmentation(spacings=[spacing] * len(shapes), shapes=shapes,
                             memory_budget_bytes=None if for_cuda else stored.memory_budget_bytes,
                             overrides={**ingest_overrides, **overrides, "target_spacing": spacing},
                             in_channels=in_channels, num_classes=num_outputs)
    if for_cuda:
        note = (f"re-planned for {plan.budget_source}: the store's plan was made for the CPU budget (patch "
                f"{list(stored.patch_size)}, batch {stored.batch_size})")
        logger.info(note)
        return dataclasses.replace(plan, notes=(*plan.notes, note))
    return dataclasses.replace(plan, budget_source=stored.budget_source)


# -- loss ------------------------------------------------------------------------------------------------------------
def deep_supervision_weights(heads: int) -> list[float]:
    """nnU-Net's deep-supervision weights for `heads` outputs (full resolution first): 1, 1/2, 1/4, ... normalised
    to sum 1."""
    raw = [DEEP_SUPERVISION_DECAY**s for s in range(heads)]
    return [w / sum(raw) for w in raw]


class DeepSupervisionLoss(nn.Module):
    """`loss` over the heads of a deep-supervised DynUNet, weighted by `deep_supervision_weights`.

    MONAI's DynUNet (train mode, deep_supervision=True) returns (B, 1 + S, K, *patch): the logits, then S coarser
    decoder heads already interpolated (nearest) to the patch size, so each head is compared with the
    full-resolution target (B, 1, *patch). Plain logits (B, K, *patch) (eval mode) get `loss` alone."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if outputs.ndim != target.ndim + 1:
            return self.loss(outputs, target)
        weights = deep_supervision_weights(outputs.shape[1])
        return sum((w * self.loss(head, target) for w, head in zip(weights, torch.unbind(outputs, dim=1))),
                   torch.zeros((), device=outputs.device))


# -- scoring ---------------------------------------------------------------------------------------------------------
def score_cases(model: nn.Module, cases: Sequence[VolumeCase], patch: Sequence[int], num_outputs: int,
                device: torch.device, batch_size: int = 2, loss_fn: nn.Module | None = None,
                amp: torch.dtype | None = None) -> dict[str, float]:
    """{"dice"} (plus "loss" with `loss_fn`) of whole cases predicted by sliding windows in the stored grid:
    the mean over cases of `mean_foreground_dice` (an empty prediction of an empty mask scores 1.0) and of the loss
    on the blended logits (1, K, Z, Y, X). NaN without cases."""
    dice: list[float] = []
    losses: list[float] = []
    p = (int(patch[0]), int(patch[1]), int(patch[2]))
    for case in cases:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = predict_volume(model, np.asarray(case.image[...], dtype=np.float32), p, overlap=SLIDING_WINDOW_OVERLAP,
                                    device=device, batch_size=batch_size, activation="none")
        true = np.asarray(case.mask[...]).astype(np.int64)  # (1, Z, Y, X)
        pred = logits.argmax(axis=0)[None]
        dice.append(mean_foreground_dice(pred[None], true[None], num_outputs))
        if loss_fn is not None:
            with torch.no_grad():
                losses.append(float(loss_fn(torch.from_numpy(logits)[None], torch.from_numpy(true)[None])))
    metrics = {"dice": float(np.mean(dice)) if dice else float("nan")}
    if loss_fn is not None:
        metrics["loss"] = float(np.mean(losses)) if losses else float("nan")
    return metrics


# -- training --------------------------------------------------------------------------------------------------------
def train_volumes(store_url: str, out_dir: str | Path, config: TrainConfig, resume: bool = False,
                  progress: bool = True, *, overwrite: bool = False, storage_options: dict[str, Any] | None = None,
                  on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """Train a plan U-Net on random patches of a volumes store's train cases (see the module docstring); the
    arguments and the result are `engine.train`'s. Checkpoints add `layout`, `plan` (the plan trained),
    `patch_size`, `normalization`, `training_spacing` and `deep_supervision` to the fixed layout's entries;
    `sample_shape` is [C, *patch_size]."""
    started = time.perf_counter()
    out = Path(out_dir)
    facts = volume_store_facts(store_url, config, storage_options)
    model_name = _check_model(config, "volumes")
    device = resolve_device(config.device)
    root = open_group(store_url, storage_options)
    train_cases = _cases(root, facts, "train")
    in_channels = int(train_cases[0].image.shape[0])
    num_outputs = max(2, max_mask_label([c.mask for c in train_cases]) + 1)
    # planned before out_dir is touched (a bad override leaves a run folder as it was); a resumed run keeps its plan
    plan = None if resume else resolve_plan(facts, config, device, in_channels, num_outputs)
    ckpt = _open_run(out, resume, overwrite)
    if ckpt is not None:
        plan = SegmentationPlan.from_dict(ckpt["plan"])
    assert plan is not None  # resume=True without last.pt raised in _open_run
    _seed_everything(config.seed)
    patch = plan.patch_size
    facts["sample_shape"] = [in_channels, *patch]
    if ckpt is not None:
        _check_resumable(ckpt, facts, config, out / "last.pt", model_name)
    validation = _validation_mode(facts, store_url)

    batch_size = plan.batch_size
    augment = patch_augmentation(rotate90=patch[1] == patch[2]) if config.augment else None
    dataset = PatchDataset([c.image for c in train_cases], [c.mask for c in train_cases], patch,
                           config.effective_patches_per_epoch(batch_size), oversample=config.oversample,
                           seed=config.seed, transform=augment, rule="last", batch_size=batch_size)
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=config.num_workers,
                        worker_init_fn=seed_worker, generator=generator, pin_memory=device.type == "cuda",
                        multiprocessing_context=worker_context(config.num_workers))

    model = build_plan_unet(plan, in_channels, num_outputs, config.deep_supervision).to(device)
    loss_fn: nn.Module = DiceCELoss(to_onehot_y=True, softmax=True)
    if config.deep_supervision:  # plain logits (eval mode: validation) still get the DiceCE alone
        loss_fn = DeepSupervisionLoss(loss_fn)
    amp = _amp_dtype(config.amp, device)

    def score(split: str, module: nn.Module, loss: nn.Module | None = None) -> dict[str, float]:
        return score_cases(module, _cases(root, facts, split), patch, num_outputs, device, batch_size, loss, amp)

    meta = _run_meta(config, facts, model_name, num_outputs, validation, layout="volumes", plan=plan.to_dict(),
                     patch_size=list(patch), normalization=facts.get("normalization"),
                     training_spacing=facts.get("training_spacing"), deep_supervision=config.deep_supervision)
    job = FitJob(store_url=store_url, out=out, config=config, facts=facts, model=model, loss_fn=loss_fn,
                 train_loader=loader, device=device,
                 validate=partial(score, "val") if validation == VALIDATION_ON_VAL else None,
                 score_test=partial(score, "test"),
                 meta=meta, validation=validation, epochs=config.effective_epochs("volumes"), ckpt=ckpt,
                 started=started)
    return fit(job, progress, on_epoch_end)

