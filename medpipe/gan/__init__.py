"""Class-conditional GAN augmentation of 2D stores: a DCGAN-style generator and a projection discriminator trained
with hinge loss, R1 and DiffAugment on a store's train split (docs/augmentation.md, "The generator").

Public entry points: `train_gan`, `generate`, `load_generator`, `check_generator_matches_store` (train),
`GanConfig` (config), `build_generator` / `build_discriminator` (models), `diff_augment` (diffaugment).
Bad input raises a `GanError` (a `UserError`) with a one-line message; importing this package imports no torch.
"""

from __future__ import annotations

from medpipe.errors import UserError


class GanError(UserError, ValueError):
    """Base class of every GAN input error."""


class GanInputError(GanError):
    """A store the GAN cannot train on: not a complete fixed-layout 2D store, no labelled train samples, a class
    with too few train samples, or an image size the networks do not support."""


class GanMismatchError(GanError):
    """A generator checkpoint that does not fit a store (shape, classes, content hash) or a resumed config."""


class GanCheckpointError(GanError):
    """A file that is not a readable medpipe GAN checkpoint."""


_LAZY = {
    "train_gan": "train", "generate": "train", "load_generator": "train", "check_generator_matches_store": "train",
    "GanResult": "train", "GanConfig": "config", "build_generator": "models", "build_discriminator": "models",
    "diff_augment": "diffaugment",
}


def __getattr__(name: str):  # lazy: importing the exceptions must not import torch/monai
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"medpipe.gan.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = ["GanError", "GanInputError", "GanMismatchError", "GanCheckpointError", *_LAZY]
