"""Archive image -> fixed-shape training sample: channel conversion, resampling, normalisation, crop/pad/resize.

Normalisation follows nnU-Net: CT is clipped to the dataset's foreground 0.5/99.5 percentiles and z-scored with the
foreground mean/std (from the fingerprint); MR is z-scored per image; other 2D images are scaled to 0..1.
Spatial operations on channel-first arrays reproduce MONAI's `Resize` and `ResizeWithPadOrCrop` exactly
(tests/test_preprocess.py compares them with MONAI's): `resize` is torch's interpolate, as MONAI calls it, and
`pad_or_crop` a centre crop then a symmetric pad. They are written here because importing MONAI costs every
ingest process ~240 MB of memory (it loads matplotlib, pandas, scikit-learn, scikit-image and tensorboard) for
these two operations, and Dask workers' memory limits count it (issue 11).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from medpipe.config import PreprocessConfig
from medpipe.fingerprint import CT_FOREGROUND_HU


ZSCORED_MODALITIES = frozenset({"CT", "MR"})  # normalised to zero mean, unit std; others are scaled to 0..1


class NotTrainable(ValueError):
    """An archive image that cannot soundly become a sample of the configured kind (recorded as excluded)."""


def convert_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """RGB -> luminance (ITU-R 601) when one channel is wanted; grey -> RGB by replication when three are."""
    have = pixels.shape[0]
    if have == channels:
        return pixels
    if have == 3 and channels == 1:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(3, *([1] * (pixels.ndim - 1)))
        return (pixels.astype(np.float32) * weights).sum(axis=0, keepdims=True)
    if have == 1 and channels == 3:
        return np.repeat(pixels, 3, axis=0)
    raise NotTrainable(f"{have} channels cannot become {channels}")


def check_kind(shape: tuple[int, ...], config: PreprocessConfig) -> None:
    """Raise NotTrainable when an image of `shape` (C,Y,X or C,Z,Y,X) does not fit the configured kind."""
    if config.kind == "2d" and len(shape) != 3:
        raise NotTrainable("a volume (3D or multi-frame) does not fit a 2D dataset")
    if config.kind == "3d" and (len(shape) != 4 or shape[1] < 2):
        raise NotTrainable("a 2D image does not fit a 3D dataset")
    if shape[0] not in (1, 3):
        raise NotTrainable(f"{shape[0]} channels are not supported (1 or 3)")


def normalize(pixels: np.ndarray, modality: str, norm: dict[str, Any] | None) -> np.ndarray:
    """Intensity normalisation by modality; `norm` is the fingerprint's intensity entry for CT."""
    x = pixels.astype(np.float32, copy=False)
    if modality == "CT" and norm:
        x = np.clip(x, norm["p00_5"], norm["p99_5"])
        return ((x - norm["mean"]) / max(norm["std"], 1e-6)).astype(np.float32)
    if modality in ZSCORED_MODALITIES:
        std = float(x.std())
        return ((x - float(x.mean())) / (std if std > 1e-6 else 1.0)).astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)


def floor_below_ct_foreground(hu: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Raw CT intensities (HU, any shape) with every value below CT_FOREGROUND_HU raised to it (a new array, or
    `hu` itself with `in_place`: only for an array no one else holds). Training reads normalise raw CT by clipping
    at the dataset's foreground 0.5th percentile, a percentile of values above CT_FOREGROUND_HU
    (medpipe.fingerprint), so they cannot tell these values apart: normalised reads are unchanged, while the air's
    noise (half of a head CT's voxels, most of its compressed bytes) becomes one value. Only for copies that are
    read through that normalisation; the archive keeps every HU."""
    floor = np.asarray(CT_FOREGROUND_HU).astype(hu.dtype)
    return np.maximum(hu, floor, out=hu if in_place else None)


def resampled_size(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    """Spatial size after resampling from `spacing` to `target` (same physical extent)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def to_training_sample(
    pixels: np.ndarray,
    spacing: tuple[float, ...],
    modality: str,
    config: PreprocessConfig,
    mask: np.ndarray | None = None,
    norm: dict[str, Any] | None = None,
    target_spacing: tuple[float, ...] | None = None,
    intensities: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One archive image (C,Y,X or C,Z,Y,X; native dtype/HU) -> float32 (channels, *shape) and uint8 mask.

    `intensities=False` leaves intensities as they are (CT in HU): the caller normalises with the dataset's
    statistics once they are known (medpipe.ingest.training.normalize_rows)."""
    check_kind(pixels.shape, config)
    x = convert_channels(pixels, config.channels).astype(np.float32, copy=False)
    if intensities:
        x = normalize(x, modality, norm)
    m = None if mask is None else mask[:1].astype(np.float32)
    spatial = tuple(config.shape)
    if config.kind == "3d":
        if target_spacing is not None:
            size = resampled_size(x.shape[1:], spacing, target_spacing)
            if size != tuple(x.shape[1:]):
                x = resize(x, size, "trilinear")
                m = None if m is None else resize(m, size, "nearest")
        x = pad_or_crop(x, spatial, "edge")
        m = None if m is None else pad_or_crop(m, spatial)
    elif config.fit == "resize":
        if tuple(x.shape[1:]) != spatial:
            x = resize(x, spatial, "area")
            m = None if m is None else resize(m, spatial, "nearest")
    else:
        x = pad_or_crop(x, spatial, "edge")
        m = None if m is None else pad_or_crop(m, spatial)
    return x.astype(np.float32), None if m is None else np.rint(m).astype(np.uint8)


def resize(x: np.ndarray, size: tuple[int, ...], mode: str) -> np.ndarray:
    """(C, *spatial) float32 resized to `size` by torch's interpolate (mode "area", "nearest", "bilinear",
    "trilinear"; align_corners unset): MONAI's `Resize(size, mode)`, which returns an input already of that size as
    it is."""
    if tuple(x.shape[1:]) == tuple(size):
        return x.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(tensor, size=tuple(size), mode=mode)[0].numpy()


def pad_or_crop(x: np.ndarray, size: tuple[int, ...], mode: Literal["constant", "edge"] = "constant") -> np.ndarray:
    """(C, *spatial) cropped about its centre where larger than `size`, then padded symmetrically where smaller
    (`mode` "constant": zeros, or "edge"): MONAI's `ResizeWithPadOrCrop(size, mode=mode)`, whose crop starts at
    n // 2 - size // 2 and whose pad puts the odd voxel after."""
    crop = tuple(slice(max(n // 2 - t // 2, 0), max(n // 2 - t // 2, 0) + t) for n, t in zip(x.shape[1:], size))
    x = x[(slice(None), *crop)]
    widths = [(0, 0)] + [(max(t - n, 0) // 2, max(t - n, 0) - max(t - n, 0) // 2) for n, t in zip(x.shape[1:], size)]
    return np.pad(x, widths, mode=mode) if any(w != (0, 0) for w in widths) else x
