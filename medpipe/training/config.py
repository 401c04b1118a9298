"""Training configuration (one pydantic section, recorded in every checkpoint)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from medpipe.config import _Section
from medpipe.task import Task

PLAN_MODEL = "plan-unet"  # built from a volumes store's segmentation plan (models.build_plan_unet)
VOLUME_EPOCHS = 12  # default epochs on a volumes store (docs/training.md, "3D segmentation on patches")
VOLUME_PATCHES_PER_EPOCH = 16  # default patches per epoch on a volumes store (same measurement)
SIGNALS = "signals"  # the layout name of a signals store (medpipe.signals.store), beside "fixed" and "volumes"
# Defaults on a signals store, chosen on the val split of the demo signals (medpipe demo-data -> ingest-signals:
# 12-lead, 100 Hz, 5 s windows; docs/signals.md "Training"). classify: resnet1d reaches its best val macro F1 by
# epoch ~3 (lstm by ~13), forecast: lstm's val MAE is ~15 % below resnet1d's (best epochs ~18-22); each run takes
# 15-45 s on 2 CPU cores.
SIGNAL_MODEL = {"classify": "resnet1d", "forecast": "lstm"}
SIGNAL_EPOCHS = {"classify": 15, "forecast": 25}
SIGNAL_BATCH_SIZE = 32

# Fields that may differ between a run and its resumption: they change speed or where it runs, not the result.
RUNTIME_FIELDS = frozenset({"num_workers", "cache", "cache_max_bytes", "amp", "channels_last", "compile", "device",
                            "early_stopping_patience", "early_stopping_after"})


class TrainConfig(_Section):
    """How `medpipe train` trains a model on a store. Defaults reach the demo quality bars in minutes on CPU."""

    task: Task = Field(default=Task.classify, description="classify, segment or forecast (signals stores; YAML/CLI "
                       "give the string)")
    model: str = Field(default="auto", description="registry name; auto = small-cnn (classify) / small-unet "
                       "(segment) / plan-unet (segment on a volumes store) / resnet1d (classify) / lstm (forecast) "
                       "on a signals store")
    epochs: int | None = Field(default=None, ge=1, description="maximum epochs; None = 20 (classify) / 40 (segment) / "
                               f"{VOLUME_EPOCHS} (segment on a volumes store), chosen on the val split of the demo "
                               "(docs/training.md)")
    batch_size: int | None = Field(default=None, ge=1, description="None = 32 (classify) / 4 (segment) / the plan's "
                                   "batch size (volumes store)")
    patch_size: tuple[int, int, int] | None = Field(
        default=None, description="volumes store: the training patch (z, y, x); None = the store's plan. Given, "
        "the topology is re-planned for it (each edge divisible by its pooling, docs/planning.md)")
    plan: dict[str, Any] = Field(
        default_factory=dict, description="volumes store: overrides of segmentation plan fields (base_features, "
        "n_stages, strides, ...); re-plans at the store's training spacing, which was fixed at ingest")
    oversample: float = Field(default=1 / 3, ge=0, le=1, description="volumes store: share of each batch's patches "
                              "centred on a foreground voxel (nnU-Net: 1/3, the last ones of each batch)")
    patches_per_epoch: int | None = Field(
        default=None, ge=1, description=f"volumes store: random patches per epoch, rounded up to whole batches; "
        f"None = {VOLUME_PATCHES_PER_EPOCH}")
    deep_supervision: bool = Field(default=False, description="volumes store: nnU-Net deep supervision (loss on "
                                   "the 1-2 coarser decoder heads too, weights 1, 1/2, 1/4 normalised)")
    horizon_s: float = Field(default=0.25, gt=0, description="forecast: seconds predicted at the end of each window "
                             "(context = the window before them). 0.25 s, chosen on val: the models beat the previous-"
                             "beat baseline by ~25-35 % there, by ~7 % at 0.5 s")
    rnn_hidden: int = Field(default=64, ge=1, description="lstm/gru: hidden units per layer and direction")
    rnn_layers: int = Field(default=2, ge=1, description="lstm/gru: stacked recurrent layers")
    bidirectional: bool = Field(default=True, description="lstm/gru: read the window both ways (classify and the "
                                "forecast context: both lie wholly in the past of what is predicted)")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="signal models: dropout between recurrent layers / "
                           "before the head")
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    scheduler: Literal["cosine", "onecycle", "none"] = "onecycle"
    early_stopping_patience: int = Field(default=10, ge=0, description="epochs without val improvement; 0 = off")
    early_stopping_after: float = Field(
        default=0.5, ge=0, le=1, description="fraction of the epochs before early stopping may end a run: a "
        "segmentation net first settles on the empty prediction (a flat val Dice) before it finds the lesions")
    monitor: Literal["auto", "accuracy", "macro_f1", "dice", "mae", "val_loss"] = Field(
        default="auto", description="auto = macro_f1 (classify) / dice (segment) / mae (forecast)")
    class_weights: bool = Field(default=False, description="classify: weight CE by inverse train class frequency")
    seed: int = 0
    num_workers: int = Field(default=0, ge=0)
    cache: Literal["auto", "memory", "none"] = Field(
        default="auto", description="auto = hold a split's arrays in memory when under cache_max_bytes")
    cache_max_bytes: int = Field(default=2 << 30, ge=0)
    augment: bool = True
    train_fraction: float = Field(
        default=1.0, gt=0, le=1, description="fraction of the train split's patients used (whole patients, drawn "
        "with `seed`): learning curves and the augmentation experiment")
    synthetic_only: bool = Field(
        default=False, description="train on the synthetic samples alone (TSTR: train on synthetic, test on real); "
        "their number is still synthetic_ratio x the real train samples")
    synthetic_ratio: float = Field(
        default=0.0, ge=0, description="classify (2D): synthetic samples from STORE/synthetic/ (medpipe augment) "
        "added to the train split, as a fraction of its real samples (drawn with `seed`); val and test never see "
        "them. 0 = real data only")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(default="auto", description="auto = bf16/fp16 on CUDA, off on CPU")
    channels_last: bool = Field(default=True, description="channels-last memory format (CUDA only)")
    compile: bool = False
    block_window: int = Field(default=8, ge=1, description="chunk-sized blocks shuffled together per window")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def model_name(self, layout: str = "fixed") -> str:
        """The registry name this config trains on a store of `layout` ("fixed", "volumes" or "signals"; resolves
        `auto`)."""
        if self.model != "auto":
            return self.model
        if layout == SIGNALS:
            return SIGNAL_MODEL.get(self.task.value, SIGNAL_MODEL["classify"])
        if layout == "volumes":
            return PLAN_MODEL
        return "small-cnn" if self.task is Task.classify else "small-unet"

    def effective_epochs(self, layout: str = "fixed") -> int:
        """Maximum epochs on a store of `layout` (resolves None)."""
        if self.epochs is not None:
            return self.epochs
        if layout == SIGNALS:
            return SIGNAL_EPOCHS.get(self.task.value, SIGNAL_EPOCHS["classify"])
        if layout == "volumes":
            return VOLUME_EPOCHS
        return 20 if self.task is Task.classify else 40

    def effective_patches_per_epoch(self, batch_size: int) -> int:
        """Patches per epoch on a volumes store: `patches_per_epoch` (or the default) rounded up to whole batches
        of `batch_size`, so that every batch holds its foreground share."""
        wanted = self.patches_per_epoch or VOLUME_PATCHES_PER_EPOCH
        return -(-wanted // batch_size) * batch_size

    def effective_batch_size(self, layout: str = "fixed") -> int:
        """Batch size on a store of `layout` (resolves None: volumes for segmentation are large, so fewer per
        batch)."""
        if self.batch_size is not None:
            return self.batch_size
        if layout == SIGNALS:
            return SIGNAL_BATCH_SIZE
        return 32 if self.task is Task.classify else 4

    def monitor_name(self) -> str:
        """The validation metric that selects best.pt and drives early stopping (resolves `auto`). It is always
        read from the val split (history column `monitor_key(name)`), never from test."""
        if self.monitor != "auto":
            return self.monitor
        return {Task.classify: "macro_f1", Task.segment: "dice", Task.forecast: "mae"}[self.task]
