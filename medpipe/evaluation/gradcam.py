"""Grad-CAM heat maps for 2D and 3D classifiers via ``monai.visualize.GradCAM``.

Three MONAI behaviours are worked around here: its default post-processing maps (min, max) to (1, 0), i.e. it
*inverts* the heat map, so we normalise to [0, 1] ourselves; with ``class_idx=None`` its class score indexes
``logits[:, argmax_vector]`` and so mixes every sample's predicted class into every map, so we pick each sample's
own score; and the hooks it registers are never removed, so we remove them after use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["find_last_conv_layer", "grad_cam_maps"]


def find_last_conv_layer(model: nn.Module) -> str:
    """Name of the last ``Conv1d/2d/3d`` module in ``model.named_modules()`` order (transposed convs skipped)."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            name = n
    if name is None:
        raise ValueError("model has no convolution layer; pass target_layer explicitly")
    return name


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] (high = more important); a constant map becomes all zeros."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1).values.view(-1, *[1] * (maps.ndim - 1))
    hi = flat.max(dim=1).values.view(-1, *[1] * (maps.ndim - 1))
    rng = hi - lo
    return torch.where(rng > 0, (maps - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(maps))


def grad_cam_maps(
    model: nn.Module,
    images: torch.Tensor,
    target_layer: str | None = None,
    class_idx: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Grad-CAM maps, shape (N, 1, *spatial) like ``images`` (N, C, *spatial), float32 in [0, 1].

    ``target_layer`` defaults to the last convolution layer. ``class_idx``: one class for all images, one per
    image, or ``None`` for each image's predicted class. The model's train/eval mode and hooks are left as found.
    """
    from monai.visualize import GradCAM
    from monai.visualize.class_activation_maps import ModelWithHooks

    if images.ndim not in (4, 5):
        raise ValueError(f"expected (N, C, H, W) or (N, C, D, H, W) images, got shape {tuple(images.shape)}")
    layer = target_layer or find_last_conv_layer(model)
    names = {n for n, _ in model.named_modules()}
    if layer not in names:
        raise ValueError(f"target layer {layer!r} not found in the model")

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = images.detach().clone().to(device=device, dtype=torch.float32).requires_grad_(True)
    n = x.shape[0]
    if class_idx is None:
        chosen: torch.Tensor | None = None
    elif isinstance(class_idx, int):
        chosen = torch.full((n,), class_idx, dtype=torch.long, device=device)
    else:
        chosen = torch.as_tensor(list(class_idx), dtype=torch.long, device=device)
        if chosen.shape != (n,):
            raise ValueError(f"class_idx must have one entry per image ({n}), got {tuple(chosen.shape)}")

    class _PerSampleHooks(ModelWithHooks):
        def class_score(self, logits: torch.Tensor, idx: torch.Tensor | int) -> torch.Tensor:
            if chosen is not None:
                idx = chosen
            idx = torch.as_tensor(idx, device=logits.device).reshape(-1).expand(logits.shape[0])
            return logits.gather(1, idx.view(-1, 1)).squeeze(1)

    # Snapshot hook dicts and in-place flags: MONAI never removes its hooks, and an in-place op right after the
    # target layer breaks full backward hooks, so in-place is switched off for the duration of the call.
    modules = list(model.modules())
    saved_hooks = [(m, set(m._forward_hooks), set(m._backward_hooks), m._is_full_backward_hook) for m in modules]
    # modules with a plain bool `inplace` flag (e.g. ReLU); Any, as torch types module attributes Tensor | Module
    inplace: list[tuple[Any, Any]] = [(m, m.inplace) for m in modules if isinstance(getattr(m, "inplace", None), bool)]
    for m, _ in inplace:
        m.inplace = False
    try:
        wrapped = _PerSampleHooks(model, layer, register_forward=True, register_backward=True)
        # MONAI hints nn.Module, but GradCAM takes a ModelWithHooks as is (it only wraps other modules)
        cam = GradCAM(nn_module=wrapped, target_layers=layer, postprocessing=_normalise)  # type: ignore[arg-type]
        with torch.enable_grad():
            maps = cam(x=x, class_idx=0 if chosen is not None else None)
    finally:
        for m, fwd, bwd, full in saved_hooks:
            m._is_full_backward_hook = full
            for key in set(m._forward_hooks) - fwd:
                del m._forward_hooks[key]
            for key in set(m._backward_hooks) - bwd:
                del m._backward_hooks[key]
        for m, flag in inplace:
            m.inplace = flag
        model.zero_grad(set_to_none=True)
    return maps.detach().cpu().numpy().astype(np.float32)
