"""Training on a medpipe store: Zarr-backed datasets, a model registry, a train/predict engine and checkpoints.

Public entry points: `train`, `predict` (engine), `TrainConfig` (config), `build_model` (models),
`load_model` (checkpoints), `ZarrImageDataset` / `BlockShuffleSampler` (data).
All errors raised for bad input subclass `TrainingError` (a ValueError) and carry a message a user can act on.
"""

from __future__ import annotations

from medpipe.errors import UserError

from medpipe.task import Task


class TrainingError(UserError, ValueError):
    """Base class of every training input error."""


class StoreNotCompleteError(TrainingError):
    """The store is missing, unfinished (ingest cut off) or not a medpipe store."""


class MissingLabelsError(TrainingError):
    """The store lacks what the task needs (class labels for classify, masks for segment)."""


class UnknownModelError(TrainingError):
    """A model name that is not in the registry (the message lists the valid names)."""


class CheckpointExistsError(TrainingError):
    """out_dir already holds checkpoints and neither resume nor overwrite was asked."""


class CheckpointMismatchError(TrainingError):
    """A checkpoint made from another store (content hash), model, task, shape or config."""


class CorruptCheckpointError(TrainingError):
    """A checkpoint file that cannot be read or lacks required entries."""


def as_task(value: Task | str) -> Task:
    """The `Task` member named by `value` ("classify"/"segment" or a member); TrainingError otherwise."""
    try:
        return Task(value)
    except ValueError:
        raise TrainingError(f"unknown task {value!r}; use {' or '.join(repr(t.value) for t in Task)}") from None


def __getattr__(name: str):  # lazy: importing the exceptions must not import torch/monai
    if name in ("train", "predict", "TrainResult"):
        from medpipe.training import engine

        return getattr(engine, name)
    if name == "TrainConfig":
        from medpipe.training.config import TrainConfig

        return TrainConfig
    if name in ("build_model", "MODEL_NAMES"):
        from medpipe.training import models

        return getattr(models, name)
    if name in ("load_model", "load_checkpoint", "save_checkpoint"):
        from medpipe.training import checkpoints

        return getattr(checkpoints, name)
    if name in ("best_val_epoch", "monitor_key"):
        from medpipe.training import selection

        return getattr(selection, name)
    if name in ("ZarrImageDataset", "BlockShuffleSampler"):
        from medpipe.training import data

        return getattr(data, name)
    raise AttributeError(name)


__all__ = [
    "Task", "as_task", "TrainingError", "StoreNotCompleteError", "MissingLabelsError", "UnknownModelError",
    "CheckpointExistsError", "CheckpointMismatchError", "CorruptCheckpointError", "train", "predict", "TrainResult", "TrainConfig",
    "build_model", "MODEL_NAMES", "load_model", "load_checkpoint", "save_checkpoint", "ZarrImageDataset",
    "BlockShuffleSampler", "best_val_epoch", "monitor_key",
]
