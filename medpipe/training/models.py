"""Model registry: `build_model(name, task, spatial_dims, in_channels, num_classes)`.

Classifiers return logits (B, K); segmenters return logits (B, K, *spatial) with K = background + classes.
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.networks import nets
from torch import nn

from medpipe.planning import MAX_SPACING_RATIO, SegmentationPlan
from medpipe.task import Task
from medpipe.training import TrainingError, UnknownModelError, as_task
from medpipe.training.config import PLAN_MODEL


class SmallCNN(nn.Module):
    """Four conv blocks (conv-BN-ReLU, max-pool between) and global average+max pooling: fast on CPU, 2D or 3D.

    Global max pooling next to average pooling lets a small bright structure (a lesion of a few pixels) decide
    the class even when it covers a tiny fraction of the image.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        layers: list[nn.Module] = []
        channels = in_channels
        for i, out in enumerate((width, width * 2, width * 4, width * 8)):
            if i:
                layers.append(pool(2, ceil_mode=True))
            layers += [conv(channels, out, 3, padding=1, bias=False), norm(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(2 * channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).flatten(2)
        return self.head(torch.cat([f.mean(dim=2), f.amax(dim=2)], dim=1))


def _small_cnn(spatial_dims: int, in_channels: int, num_classes: int) -> nn.Module:
    return SmallCNN(spatial_dims, in_channels, num_classes)


def _resnet(depth: int) -> Callable[[int, int, int], nn.Module]:
    def build(spatial_dims: int, in_channels: int, num_classes: int) -> nn.Module:
        factory = nets.resnet18 if depth == 18 else nets.resnet34
        return factory(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes)

    return build


def _densenet121(spatial_dims: int, in_channels: int, num_classes: int) -> nn.Module:
    return nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes)


def _unet(spatial_dims: int, in_channels: int, num_classes: int) -> nn.Module:
    return nets.UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                     channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="instance")


def _small_unet(spatial_dims: int, in_channels: int, num_classes: int) -> nn.Module:
    return nets.UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                     channels=(16, 32, 64), strides=(2, 2), num_res_units=1, norm="instance")


def conv_kernels(plan: SegmentationPlan) -> tuple[tuple[int, int, int], ...]:
    """Convolution kernel per stage, as nnU-Net sets them: 3 along an axis, except 1 along an axis whose current
    spacing is still >= 2x the finest (an anisotropic axis not yet pooled), so thick slices are not mixed."""
    spacing = list(plan.target_spacing)
    kernels = []
    for stride in plan.strides:
        spacing = [s * k for s, k in zip(spacing, stride)]
        finest = min(spacing)
        z, y, x = (1 if s / finest >= MAX_SPACING_RATIO else 3 for s in spacing)
        kernels.append((z, y, x))
    return tuple(kernels)


def build_plan_unet(plan: SegmentationPlan, in_channels: int, num_classes: int,
                    deep_supervision: bool = False) -> nn.Module:
    """nnU-Net's 3d_fullres U-Net for a plan: MONAI DynUNet with the plan's strides, features per stage and
    kernels (`conv_kernels`), instance norm and leaky ReLU. In training mode with `deep_supervision` the network
    returns (B, 1 + S, K, *patch): the full-resolution logits then S upsampled lower-resolution heads; in eval
    mode (and without deep supervision) logits (B, K, *patch)."""
    strides = [list(s) for s in plan.strides]
    model = nets.DynUNet(
        spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
        kernel_size=[list(k) for k in conv_kernels(plan)], strides=strides, upsample_kernel_size=strides[1:],
        filters=list(plan.features_per_stage), norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=deep_supervision, deep_supr_num=max(1, min(2, plan.n_stages - 2)), res_block=False)
    model.medpipe_task = Task.segment  # type: ignore[assignment]
    return model


# name -> (builder, tasks it supports)
_REGISTRY: dict[str, tuple[Callable[[int, int, int], nn.Module], tuple[Task, ...]]] = {
    "small-cnn": (_small_cnn, (Task.classify,)),
    "resnet18": (_resnet(18), (Task.classify,)),
    "resnet34": (_resnet(34), (Task.classify,)),
    "densenet121": (_densenet121, (Task.classify,)),
    "unet": (_unet, (Task.segment,)),
    "small-unet": (_small_unet, (Task.segment,)),
}
# PLAN_MODEL ("plan-unet") is built from a store's segmentation plan (build_plan_unet), not from the registry
MODEL_NAMES: tuple[str, ...] = (*_REGISTRY, PLAN_MODEL)


def model_task(name: str) -> tuple[Task, ...]:
    """Tasks a registered model supports."""
    if name == PLAN_MODEL:
        return (Task.segment,)
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name][1]


def build_model(name: str, task: Task | str, spatial_dims: int, in_channels: int, num_classes: int) -> nn.Module:
    """A fresh model from the registry. `num_classes` counts output channels (segment: background included)."""
    task = as_task(task)
    if name == PLAN_MODEL:
        raise TrainingError(f"{PLAN_MODEL!r} is built from a segmentation plan (build_plan_unet) and trains on stores "
                            "ingested with preprocess.layout: volumes")
    tasks = model_task(name)
    if task not in tasks:
        valid = [n for n, (_, t) in _REGISTRY.items() if task in t]
        raise TrainingError(f"model {name!r} does not do {task.value!r}; models for {task.value}: {', '.join(valid)}")
    if spatial_dims not in (2, 3):
        raise TrainingError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    model = _REGISTRY[name][0](spatial_dims, in_channels, num_classes)
    # a Task member: lets predict() know what the outputs mean. torch's stub types Module.__setattr__ values as
    # Tensor | Module, but a Module takes plain attributes too
    model.medpipe_task = task  # type: ignore[assignment]
    return model
