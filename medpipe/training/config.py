"""Training configuration (one pydantic section, recorded in every checkpoint)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medpipe.config import _Section
from medpipe.task import Task

# Fields that may differ between a run and its resumption: they change speed or where it runs, not the result.
RUNTIME_FIELDS = frozenset({"num_workers", "cache", "cache_max_bytes", "amp", "channels_last", "compile", "device",
                            "early_stopping_patience", "early_stopping_after"})


class TrainConfig(_Section):
    """How `medpipe train` trains a model on a store. Defaults reach the demo quality bars in minutes on CPU."""

    task: Task = Field(default=Task.classify, description="classify or segment (YAML/CLI give the string)")
    model: str = Field(default="auto", description="registry name; auto = small-cnn (classify) / small-unet (segment)")
    epochs: int | None = Field(default=None, ge=1, description="maximum epochs; None = 20 (classify) / 40 (segment), "
                               "chosen on the val split of the demo (docs/training.md)")
    batch_size: int | None = Field(default=None, ge=1, description="None = 32 (classify) / 4 (segment)")
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    scheduler: Literal["cosine", "onecycle", "none"] = "onecycle"
    early_stopping_patience: int = Field(default=10, ge=0, description="epochs without val improvement; 0 = off")
    early_stopping_after: float = Field(
        default=0.5, ge=0, le=1, description="fraction of the epochs before early stopping may end a run: a "
        "segmentation net first settles on the empty prediction (a flat val Dice) before it finds the lesions")
    monitor: Literal["auto", "accuracy", "macro_f1", "dice", "val_loss"] = Field(
        default="auto", description="auto = macro_f1 (classify) / dice (segment)")
    class_weights: bool = Field(default=False, description="classify: weight CE by inverse train class frequency")
    seed: int = 0
    num_workers: int = Field(default=0, ge=0)
    cache: Literal["auto", "memory", "none"] = Field(
        default="auto", description="auto = hold a split's arrays in memory when under cache_max_bytes")
    cache_max_bytes: int = Field(default=2 << 30, ge=0)
    augment: bool = True
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(default="auto", description="auto = bf16/fp16 on CUDA, off on CPU")
    channels_last: bool = Field(default=True, description="channels-last memory format (CUDA only)")
    compile: bool = False
    block_window: int = Field(default=8, ge=1, description="chunk-sized blocks shuffled together per window")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def model_name(self) -> str:
        """The registry name this config trains (resolves `auto`)."""
        if self.model != "auto":
            return self.model
        return "small-cnn" if self.task is Task.classify else "small-unet"

    def effective_epochs(self) -> int:
        """Maximum epochs (resolves None)."""
        if self.epochs is not None:
            return self.epochs
        return 20 if self.task is Task.classify else 40

    def effective_batch_size(self) -> int:
        """Batch size (resolves None: volumes for segmentation are large, so fewer per batch)."""
        if self.batch_size is not None:
            return self.batch_size
        return 32 if self.task is Task.classify else 4

    def monitor_name(self) -> str:
        """The validation metric that selects best.pt and drives early stopping (resolves `auto`). It is always
        read from the val split (history column `monitor_key(name)`), never from test."""
        if self.monitor != "auto":
            return self.monitor
        return "macro_f1" if self.task is Task.classify else "dice"
