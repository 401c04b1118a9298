"""Differentiable augmentation (DiffAugment; Zhao, Liu, Lin, Zhu & Han, "Differentiable Augmentation for
Data-Efficient GAN Training", NeurIPS 2020, arXiv:2006.10738).

The discriminator sees every image, real or generated, through the same random, differentiable transformations,
so it cannot memorise a small training set, and the generator still learns the un-augmented distribution (the
gradient flows back through the ops). Images are in the GAN's model space [-1, 1] (see `medpipe.gan.train`);
parameters are drawn per sample from torch's global generator, as in the paper's reference code (same magnitudes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from medpipe.gan.config import diffaugment_ops


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Add one uniform offset in [-0.5, 0.5) per sample. x: (B, C, H, W)."""
    return x + (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)


def saturation(x: torch.Tensor) -> torch.Tensor:
    """Scale each pixel's deviation from its channel mean by a factor in [0, 2) (the identity for one channel)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) * 2) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    """Scale deviations from the image mean by a factor in [0.5, 1.5) per sample."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each sample by whole pixels, up to `ratio` of each side, filling with zeros."""
    b, c, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sy, sy + 1, (b, 1), device=x.device)
    tx = torch.randint(-sx, sx + 1, (b, 1), device=x.device)
    padded = F.pad(x, (sx, sx, sy, sy))
    rows = torch.arange(h, device=x.device) + sy - ty  # (b, h): output row i reads padded row i + sy - ty
    cols = torch.arange(w, device=x.device) + sx - tx  # (b, w)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * sx))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero one rectangle of `ratio` x each side per sample, centred anywhere in the image (clipped at edges)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device) - ch // 2
    left = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device) - cw // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).to(x.dtype)[:, None]


OPS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "color": [brightness, saturation, contrast], "brightness": [brightness], "saturation": [saturation],
    "contrast": [contrast], "translation": [translation], "cutout": [cutout],
}


def diff_augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """Apply the policy's ops ("translation,cutout", ...) in order; x: (B, C, H, W) in [-1, 1], same shape out."""
    for name in diffaugment_ops(policy):
        for op in OPS[name]:
            x = op(x)
    return x.contiguous()
