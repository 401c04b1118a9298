"""Whole-volume prediction of a patch-trained 3D segmentation model: MONAI sliding-window inference with Gaussian
blending (as nnU-Net), optional mirror test-time augmentation.

Rules: windows of `patch` overlap by `overlap` of their size; a volume axis smaller than the patch is padded with
zeros (MONAI's constant padding) and cropped back. Logits are blended across windows (Gaussian importance map,
sigma = patch/8, or uniform when gaussian=False), averaged over the 8 flips of (Z, Y, X) when tta_flips (each
window is predicted flipped and flipped back, nnU-Net's mirroring), and only then turned into probabilities:
softmax over classes, or sigmoid for a single-channel model ("auto").
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
import torch
from monai.inferers import sliding_window_inference

Activation = Literal["auto", "softmax", "sigmoid", "none"]

FLIP_AXES: tuple[tuple[int, ...], ...] = tuple(
    axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)
)  # (), (Z), (Y), (X), (Z, Y), ... : the 8 mirrorings of a (B, C, Z, Y, X) batch


class _Mirrored(torch.nn.Module):
    """model(x) averaged over the given flips (each flipped back)."""

    def __init__(self, model: torch.nn.Module, flips: tuple[tuple[int, ...], ...]) -> None:
        super().__init__()
        self.model = model
        self.flips = flips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for axes in self.flips:
            xi = torch.flip(x, axes) if axes else x
            yi = self.model(xi).float()
            yi = torch.flip(yi, axes) if axes else yi
            total = yi if total is None else total + yi
        assert total is not None
        return total / len(self.flips)


def predict_volume(
    model: torch.nn.Module,
    volume: np.ndarray,
    patch: tuple[int, int, int],
    overlap: float = 0.5,
    gaussian: bool = True,
    tta_flips: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int = 2,
    activation: Activation = "auto",
) -> np.ndarray:
    """Class probabilities (K, Z, Y, X) float32 of a (C, Z, Y, X) volume, predicted window by window.

    The model runs in eval mode under torch.inference_mode (its previous mode is restored); windows go to
    `device` `batch_size` at a time and are blended there. `activation="none"` returns the blended logits."""
    volume = np.asarray(volume)
    if volume.ndim != 4:
        raise ValueError(f"volume must be (C, Z, Y, X), got shape {volume.shape}")
    if len(patch) != 3:
        raise ValueError(f"patch must be 3-D, got {patch}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    device = torch.device(device)
    predictor: torch.nn.Module = _Mirrored(model, FLIP_AXES if tta_flips else ((),))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None].to(device)
            logits = sliding_window_inference(
                inputs, roi_size=tuple(int(p) for p in patch), sw_batch_size=batch_size, predictor=predictor,
                overlap=overlap, mode="gaussian" if gaussian else "constant", sigma_scale=0.125,
                padding_mode="constant", cval=0.0, sw_device=device, device=device,
            )
            assert isinstance(logits, torch.Tensor)
            logits = logits.as_subclass(torch.Tensor)[0].float()
            if activation == "auto":
                activation = "softmax" if logits.shape[0] > 1 else "sigmoid"
            if activation == "softmax":
                out = torch.softmax(logits, dim=0)
            elif activation == "sigmoid":
                out = torch.sigmoid(logits)
            elif activation == "none":
                out = logits
            else:
                raise ValueError(f"unknown activation {activation!r}; use 'auto', 'softmax', 'sigmoid' or 'none'")
            return out.cpu().numpy()
    finally:
        model.train(was_training)
