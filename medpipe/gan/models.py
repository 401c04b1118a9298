"""Networks of the class-conditional GAN, for 2D images of C x H x W with H, W powers of two from 16 to 256.

Generator: DCGAN-style (Radford et al. 2016) — [z, class embedding] -> linear -> (8w, H/2^k, W/2^k) with the
smaller side 4 -> k x (2x nearest upsampling, 3x3 conv, GroupNorm, ReLU) -> 3x3 conv to C -> tanh, in [-1, 1].
It is MONAI's `monai.networks.nets.Generator` (latent -> linear -> reshape -> conv layers) with `_get_layer`
overridden, as MONAI documents it for other layers: MONAI upsamples with stride-2 transposed convolutions, which
leave checkerboard artefacts (Odena et al. 2016), so each layer here upsamples and then convolves. GroupNorm, not
BatchNorm: a sample then never depends on the rest of its batch, so the EMA generator needs no batch statistics
and `generate` gives the same image for the same noise whatever the number asked for.

Discriminator: projection discriminator (Miyato & Koyama 2018) — 3x3 convs (stride 2 to halve, LeakyReLU 0.2, no
normalisation) down to the 4-pixel side, a minibatch standard deviation channel (Karras et al. 2018, as in
StyleGAN2) before the last conv, global sum pooling to h, logit = linear(h) + <embed(y), h>; spectral norm
(Miyato et al. 2018) on every conv, the linear layer and the embedding. Without the minibatch-stddev channel the
generator collapsed to one image per class within a few hundred steps once DiffAugment was on (the augmentation
gives a collapsed batch the look of variety, and D judged each image alone); with it, it did not. D's output for
an image depends on its batch, so real and generated images go through D in separate calls. The convs are MONAI `Convolution`
blocks; MONAI's `PatchDiscriminator` does not fit: it ends in a patch map with no class projection, and its
normalisation layers are what spectral norm replaces. DiffAugment runs inside `forward` in training mode, so real
and generated images always pass through the same augmentation before the convs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import Generator
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from medpipe.gan import GanInputError
from medpipe.gan.diffaugment import diff_augment

MIN_SIDE, MAX_SIDE = 16, 256
START_SIDE = 4  # the smaller side of the generator's first feature map and of the discriminator's last
LEAKY = ("leakyrelu", {"negative_slope": 0.2})


def check_sample_shape(sample_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) when the networks support it: C in 1..4, H and W powers of two in [16, 256]; GanInputError else."""
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) != 3:
        raise GanInputError(f"the GAN needs 2D samples (C, H, W); this store's samples are {list(shape)}")
    c, h, w = shape
    sides_ok = all(MIN_SIDE <= s <= MAX_SIDE and s & (s - 1) == 0 for s in (h, w))
    if not sides_ok or not 1 <= c <= 4:
        raise GanInputError(f"the GAN needs 1-4 channels and H, W powers of two from {MIN_SIDE} to {MAX_SIDE}; "
                            f"this store's samples are {list(shape)} (ingest with such a preprocess.shape)")
    return c, h, w


def level_channels(width: int, levels: int) -> list[int]:
    """Channels at each resolution from the coarsest (index 0) to full resolution (index `levels`)."""
    return [width * min(8, 2 ** (levels - i)) for i in range(levels + 1)]


def _levels(h: int, w: int) -> int:
    return int(math.log2(min(h, w) // START_SIDE))


class _UpsamplingGenerator(Generator):
    """MONAI's Generator with nearest-upsampling + conv layers instead of transposed convolutions."""

    def _get_layer(self, in_channels: int, out_channels: int, strides: int, is_last: bool
                   ) -> Convolution | nn.Sequential:
        conv = Convolution(self.dimensions, in_channels, out_channels, strides=1, kernel_size=self.kernel_size,
                           act=self.act, norm=self.norm, bias=self.bias, conv_only=is_last)
        return conv if strides == 1 else nn.Sequential(nn.Upsample(scale_factor=strides, mode="nearest"), conv)


class ConditionalGenerator(nn.Module):
    """G(z (B, latent_dim), y (B,) int64) -> images (B, C, H, W) in [-1, 1]."""

    def __init__(self, latent_dim: int, num_classes: int, sample_shape: Sequence[int], width: int) -> None:
        super().__init__()
        c, h, w = check_sample_shape(sample_shape)
        levels = _levels(h, w)
        chans = level_channels(width, levels)
        self.latent_dim = latent_dim
        self.sample_shape = (c, h, w)
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.net = _UpsamplingGenerator(
            latent_shape=(2 * latent_dim,), start_shape=(chans[0], h >> levels, w >> levels),
            channels=(*chans[1:], c), strides=(2,) * levels + (1,), kernel_size=3, num_res_units=0,
            act="relu", norm=("group", {"num_groups": math.gcd(8, width)}))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(torch.cat([z, self.embed(y)], dim=1)))


class MinibatchStdDev(nn.Module):
    """Append one channel: the standard deviation of each feature over groups of up to 4 images of the batch,
    averaged over features and pixels (Karras et al. 2018). (B, C, H, W) -> (B, C + 1, H, W)."""

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        group = next((g for g in range(min(self.group_size, b), 1, -1) if b % g == 0), b)
        grouped = x.float().reshape(group, b // group, c, h, w)
        std = (grouped.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (b // group,)
        feature = std.repeat(group).reshape(b, 1, 1, 1).expand(b, 1, h, w).to(x.dtype)
        return torch.cat([x, feature], dim=1)


class ProjectionDiscriminator(nn.Module):
    """D(x (B, C, H, W) in [-1, 1], y (B,) int64) -> logits (B,); DiffAugment `policy` applied in training mode."""

    def __init__(self, num_classes: int, sample_shape: Sequence[int], width: int, policy: str = "") -> None:
        super().__init__()
        c, h, w = check_sample_shape(sample_shape)
        levels = _levels(h, w)
        chans = level_channels(width, levels)
        self.policy = policy
        blocks: list[nn.Module] = [Convolution(2, c, chans[-1], kernel_size=3, act=LEAKY, norm=None)]
        for i in range(levels, 0, -1):
            blocks.append(Convolution(2, chans[i], chans[i - 1], strides=2, kernel_size=3, act=LEAKY, norm=None))
            if i == 1:
                blocks.append(MinibatchStdDev())
            blocks.append(Convolution(2, chans[i - 1] + (i == 1), chans[i - 1], kernel_size=3, act=LEAKY, norm=None))
        self.features = nn.Sequential(*blocks)
        for module in [m for m in self.features.modules() if isinstance(m, nn.Conv2d)]:
            spectral_norm(module)
        self.linear = spectral_norm(nn.Linear(chans[0], 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, chans[0]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.policy:
            x = diff_augment(x, self.policy)
        h = self.features(x).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)


def build_generator(spec: dict[str, Any]) -> ConditionalGenerator:
    """The generator of a spec {"latent_dim", "num_classes", "sample_shape", "width"} (as checkpoints store it)."""
    return ConditionalGenerator(int(spec["latent_dim"]), int(spec["num_classes"]), spec["sample_shape"],
                                int(spec["width"]))


def build_discriminator(spec: dict[str, Any], policy: str = "") -> ProjectionDiscriminator:
    """The discriminator of the same spec, with a DiffAugment policy."""
    return ProjectionDiscriminator(int(spec["num_classes"]), spec["sample_shape"], int(spec["width"]), policy)
