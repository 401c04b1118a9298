"""Checkpoints: plain dicts of tensors and Python types (loadable with `torch.load(weights_only=True)`),
written atomically (temporary file + os.replace) so a kill never leaves half a checkpoint."""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medpipe.task import Task
from medpipe.training import CorruptCheckpointError
from medpipe.planning import SegmentationPlan
from medpipe.training.models import PLAN_MODEL, build_model, build_plan_unet

REQUIRED_KEYS = ("model", "epoch", "config", "store_content_hash", "code_version", "classes", "sample_shape",
                 "task", "model_name", "num_outputs")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically (same-folder temp file, fsync, os.replace). A `Task` under "task" is
    stored as its value string, so the file loads with weights_only=True."""
    path = Path(path)
    if isinstance(payload.get("task"), Task):
        payload = {**payload, "task": payload["task"].value}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_torch_file(path: str | Path, map_location: str | torch.device, error: type[Exception], what: str,
                    advice: str = "") -> Any:
    """torch.load(weights_only=True) of a file; `error` (one line naming `what`) when it is absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise error(f"no {what} file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise error(f"{what} {path} is unreadable ({type(exc).__name__}){advice}") from exc


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (a checkpoint's identity that does not depend on where it lies)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; CorruptCheckpointError when unreadable or incomplete.
    `payload["task"]` is stored as the Task value string ("classify"/"segment") and returned as a `Task`."""
    payload = read_torch_file(path, map_location, CorruptCheckpointError, "checkpoint",
                              ": delete it or resume from another file")
    if not isinstance(payload, dict):
        raise CorruptCheckpointError(f"checkpoint {path} does not hold a medpipe checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CorruptCheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a medpipe checkpoint")
    try:
        payload["task"] = Task(payload["task"])
    except ValueError:
        raise CorruptCheckpointError(f"checkpoint {path} has unknown task {payload['task']!r}") from None
    return payload


def model_from_checkpoint(payload: dict[str, Any]) -> nn.Module:
    """Rebuild the registry model of a checkpoint and load its weights."""
    shape = list(payload["sample_shape"])
    if payload["model_name"] == PLAN_MODEL:
        model = build_plan_unet(SegmentationPlan.from_dict(payload["plan"]), int(shape[0]),
                                int(payload["num_outputs"]), bool(payload.get("deep_supervision", False)))
    else:
        model = build_model(payload["model_name"], payload["task"], len(shape) - 1, int(shape[0]),
                            int(payload["num_outputs"]))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CorruptCheckpointError(f"checkpoint weights do not fit model {payload['model_name']}: {exc}") from exc
    return model


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata without tensors) from a best.pt / last.pt file."""
    payload = load_checkpoint(path, map_location)
    model = model_from_checkpoint(payload).eval()
    meta = {k: v for k, v in payload.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng")}
    return model, meta
