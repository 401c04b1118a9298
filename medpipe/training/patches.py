"""Patch-based 3D training data as nnU-Net and MONAI do it: foreground-oversampled patch origins, patch reads that
decode only the chunks a patch touches, and a map-style dataset of random patches from per-case zarr arrays.

Rules (see the functions for details):
- A case is one zarr array per volume, image (C, Z, Y, X) and mask (1, Z, Y, X) or (Z, Y, X), chunked e.g.
  (1, 64, 64, 64). `read_patch` reads one patch with a single zarr slice of the region it overlaps, so only the
  chunks (or inner shard chunks) it touches are fetched and decoded; the part outside the volume is padded
  (the array's fill value, the edge voxel, or a given constant).
- Patch origins: a volume axis of size s and a patch axis of size p allow origins in [min(0, s - p), max(0, s - p)]:
  the patch lies inside the volume when s >= p, and holds the whole axis (padded) when s < p. Uniform patches draw
  the origin uniformly from that range; foreground patches centre on a random foreground voxel (origin = voxel - p//2)
  and clip the origin into the range, so the chosen voxel is always inside the patch.
- Which draws are foreground patches: "bernoulli" (default) decides each draw independently with probability
  `oversample`, so the rate is exact in expectation for any batch size; "last" forces the last
  ceil(n * oversample) draws of each call of n (nnU-Net's rule: every batch holds at least one foreground patch,
  but the rate is quantised, e.g. 1/2 for batches of 2 at oversample 1/3). A case without foreground gets uniform
  patches.
- `PatchDataset` is map-style: item i of epoch e is a pure function of (seed, e, i), whatever the number of workers
  or the order they are asked in. Call `set_epoch` before each epoch (without persistent workers, so the workers
  receive the new epoch when the DataLoader re-pickles the dataset).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Callable, Literal

import numpy as np
import torch
import zarr
from monai.data import set_track_meta
from torch.utils.data import Dataset

from medpipe.training.chunk_reader import RegionArray
from medpipe.volumes import NormalizedVolume

set_track_meta(False)  # plain tensors out of MONAI transforms (as medpipe.training.data): MetaTensor costs ~3x here

Transform = Callable[[dict[str, Any]], dict[str, Any]]
Pad = Literal["fill", "edge"] | float
Rule = Literal["bernoulli", "last"]

__all__ = ["PatchDataset", "foreground_index", "patch_augmentation", "read_patch", "sample_patch_origins"]


def _spatial(mask: np.ndarray) -> np.ndarray:
    """(Z, Y, X) foreground of a (Z, Y, X) or channel-first (C, Z, Y, X) label array (any channel > 0)."""
    if mask.ndim == 4:
        return np.any(mask > 0, axis=0)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (Z, Y, X) or (C, Z, Y, X), got shape {mask.shape}")
    return mask > 0


def foreground_index(mask: np.ndarray, max_points: int = 10000, seed: int = 0) -> np.ndarray:
    """(K, 3) int64 (z, y, x) coordinates of the foreground voxels (label > 0) of a (Z, Y, X) or (C, Z, Y, X) mask,
    a uniform random subset of at most `max_points` (without replacement, sorted, the same for the same seed)."""
    coords = np.argwhere(_spatial(np.asarray(mask))).astype(np.int64)
    if coords.shape[0] > max_points:
        keep = np.random.default_rng(seed).choice(coords.shape[0], size=max_points, replace=False)
        coords = coords[np.sort(keep)]
    return coords.reshape(-1, 3)


def foreground_index_zarr(mask: zarr.Array, max_points: int = 10000, seed: int = 0) -> np.ndarray:
    """`foreground_index` of a zarr mask (Z, Y, X) or (C, Z, Y, X), read one slab of Z chunks at a time so that
    memory stays at one slab plus `max_points` coordinates per slab. Still a uniform subset of all foreground
    voxels: each slab keeps a uniform subset and the final draw splits `max_points` across slabs by a
    multivariate hypergeometric draw on the slab counts."""
    z_axis = mask.ndim - 3
    depth, step = int(mask.shape[z_axis]), int(mask.chunks[z_axis])
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    counts: list[int] = []
    for z0 in range(0, depth, step):
        slab = np.asarray(mask[(slice(None),) * z_axis + (slice(z0, z0 + step),)])
        fg = _spatial(slab)
        count = int(np.count_nonzero(fg))
        coords = foreground_index(slab, max_points, seed=int(rng.integers(2**31))) + np.array([z0, 0, 0])
        parts.append(coords)
        counts.append(count)
    total = sum(counts)
    if total == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if total <= max_points:
        return np.concatenate(parts)
    take = rng.multivariate_hypergeometric(np.array(counts, dtype=np.int64), max_points)
    chosen = [p[np.sort(rng.choice(p.shape[0], size=int(k), replace=False))] for p, k in zip(parts, take) if k]
    return np.concatenate(chosen)


def origin_range(shape: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest allowed origin per axis: [min(0, s - p), max(0, s - p)]."""
    s, p = np.asarray(shape, dtype=np.int64), np.asarray(patch, dtype=np.int64)
    return np.minimum(0, s - p), np.maximum(0, s - p)


def foreground_draws(n: int, oversample: float, rng: np.random.Generator, rule: Rule = "bernoulli") -> np.ndarray:
    """(n,) bool: which of n draws are foreground patches ("bernoulli": each with probability `oversample`;
    "last": the last ceil(n * oversample))."""
    if not 0.0 <= oversample <= 1.0:
        raise ValueError(f"oversample must be in [0, 1], got {oversample}")
    if rule == "bernoulli":
        return rng.random(n) < oversample
    if rule == "last":
        forced = np.zeros(n, dtype=bool)
        k = min(n, math.ceil(n * oversample - 1e-9))
        if k:
            forced[n - k :] = True
        return forced
    raise ValueError(f"unknown foreground rule {rule!r}; use 'bernoulli' or 'last'")


def sample_patch_origins(
    shape: tuple[int, int, int],
    patch: tuple[int, int, int],
    n: int,
    rng: np.random.Generator,
    foreground: np.ndarray | None,
    oversample: float = 1 / 3,
    rule: Rule = "bernoulli",
) -> np.ndarray:
    """(n, 3) int64 patch origins (z, y, x) in a volume of spatial `shape`; negative origins and origins past
    shape - patch mean padding (only on axes where the volume is smaller than the patch).

    Foreground draws (chosen by `rule`, see `foreground_draws`) centre on a uniformly chosen row of `foreground`
    ((K, 3) voxel coordinates, e.g. from `foreground_index`), clipped into the allowed range; the others, and all
    draws when `foreground` is None or empty, are uniform over the allowed origins."""
    if len(shape) != 3 or len(patch) != 3:
        raise ValueError(f"shape and patch must be 3-D, got {shape} and {patch}")
    lo, hi = origin_range(shape, patch)
    origins = rng.integers(lo, hi + 1, size=(n, 3), dtype=np.int64)
    forced = foreground_draws(n, oversample, rng, rule)
    if foreground is not None and len(foreground) and forced.any():
        centres = np.asarray(foreground, dtype=np.int64)[rng.integers(0, len(foreground), size=int(forced.sum()))]
        origins[forced] = np.clip(centres - np.asarray(patch, dtype=np.int64) // 2, lo, hi)
    return origins


def read_patch(
    array: zarr.Array,
    origin: Sequence[int] | np.ndarray,
    patch: Sequence[int],
    leading: tuple[int | slice, ...] = (),
    pad: Pad = "fill",
) -> np.ndarray:
    """The region [origin, origin + patch) of the last len(patch) axes of `array`, read with one slice of it (a zarr
    array, or a `RegionArray` of one: PatchDataset's chunk-by-chunk reads).

    `leading` selects along the axes before them (e.g. `(3,)` for case 3 of a stacked (N, C, Z, Y, X) array;
    default: all of them, e.g. all channels of a (C, Z, Y, X) case). Only the chunks the region overlaps are read
    and decoded. Voxels outside the array are `pad`: "fill" the array's fill value, "edge" the nearest voxel,
    or a number. Result: (*remaining leading axes, *patch), the array's dtype.
    """
    nd = len(patch)
    shape = tuple(int(s) for s in array.shape[-nd:])
    n_lead = array.ndim - nd
    if len(origin) != nd or len(leading) > n_lead:
        raise ValueError(f"origin {tuple(origin)} / leading {leading} do not fit array shape {array.shape}")
    lead = tuple(leading) + (slice(None),) * (n_lead - len(leading))
    o = [int(v) for v in origin]
    p = [int(v) for v in patch]
    if pad == "edge":
        # The voxel each output position copies, per axis; one read of the rows they span (never empty).
        idx = [np.clip(np.arange(oi, oi + pi), 0, si - 1) for oi, pi, si in zip(o, p, shape)]
        region = np.asarray(array[lead + tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)])
        for axis, i in enumerate(idx):
            rel = i - i[0]
            if rel.size != region.shape[region.ndim - nd + axis] or np.any(rel != np.arange(rel.size)):
                region = np.take(region, rel, axis=region.ndim - nd + axis)
        return region
    lo = [min(max(oi, 0), si) for oi, si in zip(o, shape)]
    hi = [max(min(oi + pi, si), 0) for oi, pi, si in zip(o, p, shape)]
    value = array.fill_value if pad == "fill" else pad
    if value is None:
        value = 0
    if any(h <= low for low, h in zip(lo, hi)):  # entirely outside: nothing to read
        lead_shape = np.empty(array.shape[:n_lead], dtype=np.uint8)[lead].shape
        return np.full((*lead_shape, *p), value, dtype=array.dtype)
    region = np.asarray(array[lead + tuple(slice(a, b) for a, b in zip(lo, hi))])
    widths = [(low - oi, oi + pi - h) for oi, pi, low, h in zip(o, p, lo, hi)]
    if any(w != (0, 0) for w in widths):
        region = np.pad(region, [(0, 0)] * (region.ndim - nd) + widths, mode="constant", constant_values=value)
    return region


def patch_augmentation(keys: Sequence[str] = ("image", "mask"), flips: bool = True, rotate90: bool = True,
                       noise_std: float = 0.05, scale: float = 0.1, prob: float = 0.15) -> Transform:
    """Light nnU-Net-style patch augmentation with MONAI dictionary transforms: random flips on each axis and
    90-degree rotations in the (Y, X) plane (image and mask, exact for labels), Gaussian noise and intensity
    scaling (image only). Rotations in a plane keep the patch shape only when that plane is square."""
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised, RandRotate90d, RandScaleIntensityd

    keys = list(keys)
    steps: list[Any] = []
    if flips:
        steps += [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    if rotate90:
        steps.append(RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=(1, 2)))
    if noise_std > 0:
        steps.append(RandGaussianNoised(keys="image", prob=prob, std=noise_std))
    if scale > 0:
        steps.append(RandScaleIntensityd(keys="image", factors=scale, prob=prob))
    return Compose(steps)


REGION_READERS = 32  # cases whose chunk readers a process keeps (each holds memory maps of its shard files)


def chunk_regions(array: Any) -> Any:
    """`array` with its regions read through a ChunkReader (`RegionArray`: ~1.6x faster than zarr slicing for a
    patch) when it is a zarr array or a NormalizedVolume of one; anything else as it is."""
    if isinstance(array, zarr.Array):
        return RegionArray(array)
    if isinstance(array, NormalizedVolume) and isinstance(array.array, zarr.Array):
        return dataclasses.replace(array, array=RegionArray(array.array))
    return array


class PatchDataset(Dataset):
    """Random patches of per-case volumes: item i is {"image" float32 (C, *patch), "mask" uint8 (1, *patch),
    "case" int, "origin" int64 (3,)}; `samples_per_epoch` items per epoch.

    `images[k]` is case k's zarr array (C, Z, Y, X); `masks[k]` its labels, (1, Z, Y, X) or (Z, Y, X), same grid.
    Each item picks a case uniformly, then an origin by `sample_patch_origins` with `oversample` and `rule`
    ("bernoulli": each item independently; "last": the last ceil(batch_size * oversample) items of each run of
    `batch_size` consecutive indices, i.e. of each batch of a sequential sampler).
    Foreground coordinates are computed once per case from the masks (`foreground_index_zarr`, at most
    `max_foreground_points` per case) unless given as `foreground` (None entries = no foreground).

    Worker-safe: zarr 3 arrays pickle as their store (path/URL and options) plus metadata, not as open handles or
    data (a MemoryStore, for tests, pickles its contents); each spawned worker reads through its own copy.
    Patches are read chunk by chunk (`chunk_regions`), through readers each process makes for the cases it reads
    (at most REGION_READERS kept).
    `transform` (MONAI dictionary transforms, e.g. `patch_augmentation()`) sees torch tensors "image" and "mask";
    seed its randomness per worker (medpipe.training.data.seed_worker).
    """

    def __init__(
        self,
        images: Sequence[Any],  # zarr arrays, or medpipe.volumes.NormalizedVolume (read like one)
        masks: Sequence[zarr.Array],
        patch: tuple[int, int, int],
        samples_per_epoch: int,
        oversample: float = 1 / 3,
        seed: int = 0,
        transform: Transform | None = None,
        foreground: Sequence[np.ndarray | None] | None = None,
        max_foreground_points: int = 10000,
        rule: Rule = "bernoulli",
        batch_size: int = 2,
        image_pad: Pad = "edge",
        mask_pad: Pad = "fill",
    ) -> None:
        if len(images) != len(masks) or not images:
            raise ValueError(f"need one mask per image and at least one case ({len(images)} images, {len(masks)} masks)")
        if len(patch) != 3:
            raise ValueError(f"patch must be 3-D, got {patch}")
        self.images = list(images)
        self.masks = list(masks)
        self.patch: tuple[int, int, int] = (int(patch[0]), int(patch[1]), int(patch[2]))
        self.shapes: list[tuple[int, int, int]] = []
        for k, (image, mask) in enumerate(zip(self.images, self.masks)):
            if image.ndim != 4 or mask.ndim not in (3, 4):
                raise ValueError(f"case {k}: image must be (C, Z, Y, X) and mask (1, Z, Y, X) or (Z, Y, X), "
                                 f"got {image.shape} and {mask.shape}")
            spatial = tuple(int(s) for s in image.shape[1:])
            if tuple(int(s) for s in mask.shape[-3:]) != spatial:
                raise ValueError(f"case {k}: mask shape {mask.shape} does not match image shape {image.shape}")
            self.shapes.append((spatial[0], spatial[1], spatial[2]))
        self.samples_per_epoch = int(samples_per_epoch)
        self.oversample = float(oversample)
        self.seed = int(seed)
        self.transform = transform
        self.rule: Rule = rule
        self.batch_size = int(batch_size)
        self.image_pad: Pad = image_pad
        self.mask_pad: Pad = mask_pad
        self.epoch = 0
        foreground_draws(1, self.oversample, np.random.default_rng(0), rule)  # validates rate and rule
        if foreground is None:
            self.foreground = [foreground_index_zarr(m, max_foreground_points, seed=self.seed + k)
                               for k, m in enumerate(self.masks)]
        else:
            if len(foreground) != len(self.images):
                raise ValueError(f"foreground has {len(foreground)} entries for {len(self.images)} cases")
            self.foreground = [np.zeros((0, 3), np.int64) if f is None else np.asarray(f, np.int64).reshape(-1, 3)
                               for f in foreground]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_regions", None)  # readers hold store handles: each process makes its own
        return state

    def _region_source(self, kind: str, case: int) -> Any:
        """This process's region reader of case `case`'s image or mask (`kind`), kept in a small LRU."""
        regions: OrderedDict[tuple[str, int], Any] | None = getattr(self, "_regions", None)
        if regions is None or getattr(self, "_regions_pid", None) != os.getpid():
            regions = OrderedDict()
            self._regions, self._regions_pid = regions, os.getpid()
        key = (kind, case)
        source = regions.get(key)
        if source is None:
            source = regions[key] = chunk_regions((self.images if kind == "image" else self.masks)[case])
            while len(regions) > REGION_READERS:
                regions.popitem(last=False)
        else:
            regions.move_to_end(key)
        return source

    def set_epoch(self, epoch: int) -> None:
        """Draw a different set of patches for `epoch` (items depend on seed, epoch and index only)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def draw(self, index: int) -> tuple[int, np.ndarray]:
        """Case and origin of item `index` of the current epoch (no reading)."""
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        case = int(rng.integers(len(self.images)))
        if self.rule == "last":
            position = int(index) % self.batch_size
            forced = bool(foreground_draws(self.batch_size, self.oversample, rng, "last")[position])
            oversample = 1.0 if forced else 0.0
        else:
            oversample = self.oversample
        origin = sample_patch_origins(self.shapes[case], self.patch, 1, rng, self.foreground[case], oversample)[0]
        return case, origin

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= int(index) < self.samples_per_epoch:
            raise IndexError(index)
        case, origin = self.draw(int(index))
        image = read_patch(self._region_source("image", case), origin, self.patch, pad=self.image_pad)
        mask = read_patch(self._region_source("mask", case), origin, self.patch, pad=self.mask_pad)
        if mask.ndim == 3:
            mask = mask[None]
        sample: dict[str, Any] = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                                  "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))}
        if self.transform is not None:
            sample = self.transform(sample)
            sample["image"] = torch.as_tensor(sample["image"], dtype=torch.float32).as_subclass(torch.Tensor).contiguous()
            # interpolating transforms return float masks: back to labels
            mask_t = torch.as_tensor(sample["mask"]).as_subclass(torch.Tensor)
            sample["mask"] = (mask_t.round() if mask_t.is_floating_point() else mask_t).to(torch.uint8).contiguous()
        sample["case"] = case
        sample["origin"] = torch.from_numpy(origin.astype(np.int64))
        return sample
