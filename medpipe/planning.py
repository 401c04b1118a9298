"""Patch-based 3D segmentation planning, as nnU-Net plans its `3d_fullres` configuration.

Pure functions over a dataset fingerprint (or per-image spacings and shapes): the target spacing, the patch size,
the U-Net topology (poolings per axis, strides per stage) and the batch size that fit a memory budget. No torch at
import time: only `default_memory_budget()` imports it, to ask CUDA for its free memory. Axis order is always
(z, y, x) and spacings are (dz, dy, dx) mm, as in `medpipe.fingerprint`. The rules and what was taken from
nnU-Net are in docs/planning.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

from medpipe.errors import UserError

Triple = tuple[int, int, int]
Spacing = tuple[float, float, float]

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD (nnunetv2/configuration.py)
LOWRES_AXIS_PERCENTILE = 10.0  # nnU-Net: the anisotropic axis gets the 10th percentile of its spacings
INITIAL_PATCH_VOXELS = 256**3  # nnU-Net: the first patch is physically isotropic with the volume of 256^3 voxels
MIN_FEATURE_MAP_EDGE = 4  # nnU-Net's UNet_featuremap_min_edge_length: no feature map edge below 4 after pooling
MAX_SPACING_RATIO = 2.0  # pool an axis only while its spacing is < 2x the finest spacing among poolable axes
MIN_BATCH_SIZE = 2  # nnU-Net's UNet_min_batch_size
MAX_DATASET_COVERED = 0.05  # nnU-Net: one step sees at most 5% of the dataset's voxels (unless batch 2 is more)
BASE_FEATURES = 32  # nnU-Net's UNet_base_num_features
MAX_FEATURES = 320  # nnU-Net's UNet_max_features_3d
MIN_PATCH_EDGE = 8  # the memory loop never shrinks an axis below this (or below its median size when smaller)

# Memory estimate (see estimate_memory_bytes): bytes per activation value (fp32; mixed precision halves part of
# it, so fp32 is the safe side) and activations kept for the backward pass per stage, in units of that stage's
# feature map: encoder 2 x (conv + norm) = 4, decoder transposed conv 1 + concatenation 2 + 2 x (conv + norm) = 4
# -> 11 (LeakyReLU is in place). Calibration: nnU-Net's 8 GB reference (patch 128^3, batch 2, features 32..320,
# 6 stages) gives 7.4 GiB of activations + 0.5 GiB of weights and optimizer state here.
BYTES_PER_VALUE = 4
ACTIVATIONS_PER_STAGE = 11
OPTIMIZER_BYTES_PER_PARAMETER = 16  # fp32 weights + gradients + two Adam moments
CPU_MEMORY_BUDGET = 2 << 30  # bytes, when no CUDA device is available
CUDA_FREE_FRACTION = 0.8  # of the free CUDA memory: the rest is the CUDA context, cuDNN workspaces, fragmentation


class PlanningError(UserError, ValueError):
    """A fingerprint or an override that cannot be planned (bad values, a patch not divisible by its pooling)."""


@dataclass(frozen=True)
class SegmentationPlan:
    """What a patch-based 3D segmentation run needs to know; every axis triple is (z, y, x)."""

    target_spacing: Spacing  # (dz, dy, dx) mm the images are resampled to
    median_shape_after_resampling: Triple  # median image shape at target_spacing
    patch_size: Triple  # every edge divisible by 2 ** pool_per_axis[axis]
    batch_size: int
    pool_per_axis: Triple  # number of 2x poolings per axis
    strides: tuple[Triple, ...]  # per stage; stage 0 is (1, 1, 1); len(strides) == n_stages
    n_stages: int
    base_features: int  # features of stage 0; stage s has min(base * 2**s, max(320, base))
    memory_budget_bytes: int
    budget_source: str  # "cuda:<device name>", "cpu" or "given"
    notes: tuple[str, ...] = ()

    @property
    def features_per_stage(self) -> tuple[int, ...]:
        """Features of each stage (nnU-Net: base doubled per stage, capped at 320)."""
        return features_per_stage(self.n_stages, self.base_features)

    @property
    def estimated_memory_bytes(self) -> int:
        """The memory estimate of this plan's patch, topology and batch (see `estimate_memory_bytes`)."""
        return estimate_memory_bytes(self.patch_size, self.strides, self.base_features, self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists for tuples); `from_dict` reads it back."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentationPlan:
        """The plan `to_dict` wrote (unknown keys are an error: a plan of another version should not load
        silently)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise PlanningError(f"unknown plan fields: {', '.join(unknown)}")
        return cls(
            target_spacing=_spacing(data["target_spacing"], "target_spacing"),
            median_shape_after_resampling=_triple(data["median_shape_after_resampling"], "median_shape_after_resampling"),
            patch_size=_triple(data["patch_size"], "patch_size"),
            batch_size=int(data["batch_size"]),
            pool_per_axis=_triple(data["pool_per_axis"], "pool_per_axis", minimum=0),
            strides=tuple(_triple(s, "strides") for s in data["strides"]),
            n_stages=int(data["n_stages"]),
            base_features=int(data["base_features"]),
            memory_budget_bytes=int(data["memory_budget_bytes"]),
            budget_source=str(data["budget_source"]),
            notes=tuple(str(n) for n in data.get("notes", ())),
        )


# --------------------------------------------------------------------------------------------- target spacing


def _target_spacing_with_notes(spacings: Sequence[Sequence[float]],
                               shapes: Sequence[Sequence[float]]) -> tuple[Spacing, list[str]]:
    """nnU-Net's `determine_fullres_target_spacing`, with a note saying which rule was used."""
    sp = np.asarray(spacings, dtype=np.float64)
    sh = np.asarray(shapes, dtype=np.float64)
    if sp.ndim != 2 or sp.shape[1] != 3 or sp.shape[0] == 0:
        raise PlanningError(f"spacings must be a non-empty list of (dz, dy, dx); got shape {sp.shape}")
    if sh.shape != sp.shape:
        raise PlanningError(f"shapes must be one (z, y, x) per spacing; got {sh.shape} for spacings {sp.shape}")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise PlanningError("spacings must be finite and > 0")
    target = np.percentile(sp, 50, axis=0)
    median_size = np.percentile(sh, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    other_spacing = max(target[i] for i in others)
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * other_spacing
    aniso_voxels = median_size[worst] * ANISOTROPY_THRESHOLD < min(median_size[i] for i in others)
    notes: list[str] = []
    if aniso_spacing and aniso_voxels:
        lowres = float(np.percentile(sp[:, worst], LOWRES_AXIS_PERCENTILE))
        if lowres < other_spacing:  # never finer than the other axes (nnU-Net)
            lowres = max(other_spacing, lowres) + 1e-5
        notes.append(f"anisotropic dataset: axis {'zyx'[worst]} median spacing {target[worst]:.4g} mm > "
                     f"{ANISOTROPY_THRESHOLD:g}x {other_spacing:.4g} mm with < 1/{ANISOTROPY_THRESHOLD:g} of the "
                     f"voxels; it gets the {LOWRES_AXIS_PERCENTILE:g}th percentile of its spacings, {lowres:.4g} mm")
        target[worst] = lowres
    else:
        notes.append("target spacing: median spacing per axis")
    return (float(target[0]), float(target[1]), float(target[2])), notes


def target_spacing(spacings: Sequence[tuple[float, float, float]],
                   shapes: Sequence[tuple[int, int, int]]) -> tuple[float, float, float]:
    """Target spacing (dz, dy, dx) of a dataset from its per-image spacings and (z, y, x) shapes.

    nnU-Net's rule: the median spacing per axis; when the dataset is anisotropic — the coarsest axis's median
    spacing is more than 3x the next coarsest AND that axis has fewer than 1/3 of the voxels of the others — that
    axis gets the 10th percentile of its spacings instead (never finer than the other axes), so fewer images are
    interpolated across many millimetres. `plan_segmentation` records which rule applied in its notes."""
    return _target_spacing_with_notes(spacings, shapes)[0]


def resampled_shape(shape: Sequence[float], spacing: Sequence[float], target: Sequence[float]) -> Triple:
    """The (z, y, x) shape of an image of `shape` at `spacing` once resampled to `target` (nnU-Net's
    `compute_new_shape`: round(shape * spacing / target), at least 1)."""
    z, y, x = (max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=True))
    return z, y, x


# ---------------------------------------------------------------------------------------------------- topology


def pooling_topology(spacing: Sequence[float], patch_size: Sequence[int],
                     max_pool_per_axis: Sequence[int] | None = None,
                     max_pool_stages: int | None = None) -> tuple[Triple, tuple[Triple, ...]]:
    """(pool_per_axis, strides) of a U-Net for a patch at `spacing` (nnU-Net's `get_pool_and_conv_props`).

    Stage by stage, an axis is pooled (stride 2) while its feature map keeps an edge >= 4 after pooling and its
    current spacing is < 2x the finest current spacing among the axes still poolable; an anisotropic axis thus
    waits (stride 1) until the others have caught up with its spacing. When a single axis is left it needs an
    edge >= 12. `strides[0]` is (1, 1, 1) (the full-resolution stage). `max_pool_per_axis` / `max_pool_stages`
    cap the poolings (used by overrides)."""
    current_spacing = [float(s) for s in spacing]
    current_size = [int(n) for n in patch_size]
    caps = list(max_pool_per_axis) if max_pool_per_axis is not None else [10**6] * 3
    pools = [0, 0, 0]
    strides: list[Triple] = [(1, 1, 1)]
    while max_pool_stages is None or len(strides) - 1 < max_pool_stages:
        valid = [i for i in range(3) if current_size[i] >= 2 * MIN_FEATURE_MAP_EDGE]
        if not valid:
            break
        finest = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / finest < MAX_SPACING_RATIO and pools[i] < caps[i]]
        if not valid or (len(valid) == 1 and current_size[valid[0]] < 3 * MIN_FEATURE_MAP_EDGE):
            break
        stride = [1, 1, 1]
        for i in valid:
            stride[i] = 2
            pools[i] += 1
            current_spacing[i] *= 2
            current_size[i] = math.ceil(current_size[i] / 2)
        strides.append((stride[0], stride[1], stride[2]))
    return (pools[0], pools[1], pools[2]), tuple(strides)


def pools_from_strides(strides: Sequence[Sequence[int]]) -> Triple:
    """Number of 2x poolings per axis of a list of per-stage strides."""
    z, y, x = (sum(int(round(math.log2(s[i]))) for s in strides) for i in range(3))
    return z, y, x


def features_per_stage(n_stages: int, base_features: int = BASE_FEATURES) -> tuple[int, ...]:
    """nnU-Net's features per stage: base * 2**s, capped at 320 (or at base when base is larger)."""
    cap = max(MAX_FEATURES, base_features)
    return tuple(min(cap, base_features * 2**s) for s in range(n_stages))


def _stage_shapes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[Triple]:
    shapes: list[Triple] = []
    size = [int(n) for n in patch_size]
    for stride in strides:
        size = [math.ceil(n / s) for n, s in zip(size, stride, strict=True)]
        shapes.append((size[0], size[1], size[2]))
    return shapes


def _unet_parameters(features: Sequence[int], strides: Sequence[Sequence[int]], in_channels: int,
                     num_classes: int) -> int:
    """Parameter count of a plain conv U-Net (two 3x3x3 convs per stage, transposed-conv upsampling): an upper
    bound, anisotropic 1x3x3 kernels have fewer."""
    k = 27
    total, previous = 0, in_channels
    for f in features:  # encoder
        total += k * (previous * f + f * f)
        previous = f
    for s in range(len(features) - 2, -1, -1):  # decoder: up from stage s+1 to s, concat skip, two convs
        f, deeper = features[s], features[s + 1]
        total += math.prod(strides[s + 1]) * deeper * f + k * (2 * f * f + f * f)
    return total + features[0] * num_classes


def estimate_memory_bytes(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                          base_features: int = BASE_FEATURES, batch_size: int = 1, in_channels: int = 1,
                          num_classes: int = 2) -> int:
    """Training memory of a U-Net on patches of `patch_size`, in bytes:

        batch * BYTES_PER_VALUE * (ACTIVATIONS_PER_STAGE * sum_s features_s * voxels_s
                                   + (in_channels + 3 * num_classes) * voxels_0)
        + OPTIMIZER_BYTES_PER_PARAMETER * parameters

    i.e. features x voxels x bytes x factor summed over the stages, plus the input and the logits, softmax and
    their gradient, plus weights, gradients and Adam moments. See the constants for the factor's derivation."""
    shapes = _stage_shapes(patch_size, strides)
    feats = features_per_stage(len(strides), base_features)
    stage_values = sum(f * math.prod(shape) for f, shape in zip(feats, shapes, strict=True))
    io_values = (in_channels + 3 * num_classes) * math.prod(shapes[0])
    per_sample = BYTES_PER_VALUE * (ACTIVATIONS_PER_STAGE * stage_values + io_values)
    weights = OPTIMIZER_BYTES_PER_PARAMETER * _unet_parameters(feats, strides, in_channels, num_classes)
    return int(batch_size * per_sample + weights)


# -------------------------------------------------------------------------------------------------- the budget


def default_memory_budget() -> tuple[int, str]:
    """(bytes, source): 80% of the free memory of the current CUDA device when torch sees one ("cuda:<name>"),
    else CPU_MEMORY_BUDGET ("cpu")."""
    try:
        import torch
    except ImportError:  # planning does not need torch
        return CPU_MEMORY_BUDGET, "cpu"
    if not torch.cuda.is_available():
        return CPU_MEMORY_BUDGET, "cpu"
    free, _total = torch.cuda.mem_get_info()
    return int(free * CUDA_FREE_FRACTION), f"cuda:{torch.cuda.get_device_name()}"


# ---------------------------------------------------------------------------------------------------- planning


_PLAN_FIELDS = frozenset(f.name for f in fields(SegmentationPlan))
_OVERRIDABLE = _PLAN_FIELDS - {"notes"}


def _triple(value: Any, name: str, minimum: int = 1) -> Triple:
    try:
        items = [int(v) for v in value]
        exact = all(float(v) == int(v) for v in value)
    except (TypeError, ValueError):
        raise PlanningError(f"{name} must be three integers (z, y, x), got {value!r}") from None
    if len(items) != 3 or not exact or min(items) < minimum:
        raise PlanningError(f"{name} must be three integers >= {minimum} (z, y, x), got {value!r}")
    return items[0], items[1], items[2]


def _spacing(value: Any, name: str) -> Spacing:
    try:
        items = [float(v) for v in value]
    except (TypeError, ValueError):
        raise PlanningError(f"{name} must be three numbers (dz, dy, dx), got {value!r}") from None
    if len(items) != 3 or not all(math.isfinite(v) and v > 0 for v in items):
        raise PlanningError(f"{name} must be three finite numbers > 0 (dz, dy, dx), got {value!r}")
    return items[0], items[1], items[2]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PlanningError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _spatial(shape: Sequence[Any], name: str) -> list[float]:
    """(z, y, x) of a fingerprint shape: (C, Z, Y, X) drops its channel axis."""
    values = [float(v) for v in shape]
    if len(values) == 4:
        values = values[1:]
    if len(values) != 3:
        raise PlanningError(f"{name}: 3D planning needs (z, y, x) or (c, z, y, x) shapes, got {list(shape)}")
    return values


def _dataset(fingerprint_entry: Mapping[str, Any] | None, spacings: Sequence[Sequence[float]] | None,
             shapes: Sequence[Sequence[int]] | None) -> tuple[list[list[float]], list[list[float]], str | None]:
    """Per-image spacings and (z, y, x) shapes, and a note when only the fingerprint's summary was available."""
    if fingerprint_entry is not None:
        if spacings is not None or shapes is not None:
            raise PlanningError("give a fingerprint entry or spacings and shapes, not both")
        entry = fingerprint_entry
        if "modalities" in entry:  # a whole fingerprint: fine when it holds one modality
            modalities = entry["modalities"]
            if len(modalities) != 1:
                raise PlanningError(f"the fingerprint has modalities {sorted(modalities)}: pass one entry, "
                                    "fingerprint['modalities'][name]")
            entry = next(iter(modalities.values()))
        if "spacings" in entry and "shapes" in entry:  # per-image lists, as nnU-Net's fingerprint has
            return ([list(map(float, s)) for s in entry["spacings"]],
                    [_spatial(s, "shapes") for s in entry["shapes"]], None)
        try:
            spacing, shape = entry["spacing_median"], entry["shape_median"]
        except KeyError as exc:
            raise PlanningError(f"fingerprint entry lacks {exc.args[0]!r}") from None
        count = int(entry.get("volumes") or entry.get("images") or 1)
        spacing = [float(s) for s in spacing]
        if len(spacing) != 3:
            raise PlanningError(f"3D planning needs (dz, dy, dx) spacings, got {spacing}")
        note = (f"planned from the fingerprint's median spacing and shape of {count} images (no per-image "
                "spacings: the 10th-percentile rule, if it applies, sees only the median)")
        return [spacing] * count, [_spatial(shape, "shape_median")] * count, note
    if spacings is None or shapes is None:
        raise PlanningError("plan_segmentation needs a fingerprint entry, or spacings and shapes")
    return [list(map(float, s)) for s in spacings], [_spatial(s, "shapes") for s in shapes], None


def _initial_patch(spacing: Spacing, median_shape: Triple) -> list[int]:
    """nnU-Net: a physically isotropic patch of 256^3 voxels' volume, capped at the median shape."""
    inverse = np.array([1.0 / s for s in spacing])
    scaled = inverse * (INITIAL_PATCH_VOXELS / np.prod(inverse)) ** (1 / 3)
    return [max(1, min(int(round(v)), m)) for v, m in zip(scaled, median_shape, strict=True)]


def _fit_topology(spacing: Spacing, patch: Sequence[int], max_pool_per_axis: Sequence[int] | None,
                  max_pool_stages: int | None) -> tuple[Triple, Triple, tuple[Triple, ...]]:
    """Topology of `patch`, and the patch rounded down to be divisible by 2**pools per axis (so it never grows
    past the median shape; rounding down can only remove poolings, and the rounded patch stays divisible)."""
    pools, _ = pooling_topology(spacing, patch, max_pool_per_axis, max_pool_stages)
    z, y, x = (max(2**p, n // 2**p * 2**p) for n, p in zip(patch, pools, strict=True))
    pools, strides = pooling_topology(spacing, (z, y, x), max_pool_per_axis, max_pool_stages)
    return (z, y, x), pools, strides


def _check_divisible(patch: Triple, pools: Triple) -> None:
    bad = [f"{'zyx'[i]}={patch[i]} (needs a multiple of {2**pools[i]})" for i in range(3) if patch[i] % 2**pools[i]]
    if bad:
        raise PlanningError(f"patch_size {list(patch)} is not divisible by its pooling: {', '.join(bad)}")


def plan_segmentation(fingerprint_entry: Mapping[str, Any] | None = None, *,
                      spacings: Sequence[Sequence[float]] | None = None,
                      shapes: Sequence[Sequence[int]] | None = None,
                      memory_budget_bytes: int | None = None,
                      overrides: Mapping[str, Any] | None = None,
                      in_channels: int = 1, num_classes: int = 2) -> SegmentationPlan:
    """Plan a patch-based 3D U-Net for a dataset (see docs/planning.md for every rule).

    The dataset is one fingerprint entry (`fingerprint["modalities"][name]`: its median spacing and shape stand
    for every image; per-image `spacings` and `shapes` lists are used when the entry has them) or `spacings`
    (dz, dy, dx) and `shapes` ((z, y, x) or (c, z, y, x)) per image. `memory_budget_bytes=None` asks
    `default_memory_budget()`. `overrides` maps plan fields to values that win over the planner's (validated;
    each is noted); `num_classes` counts output channels (background included)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - _OVERRIDABLE)
    if unknown:
        raise PlanningError(f"cannot override {', '.join(unknown)}; plan fields: {', '.join(sorted(_OVERRIDABLE))}")
    in_channels = _positive_int(in_channels, "in_channels")
    num_classes = _positive_int(num_classes, "num_classes")
    notes: list[str] = [f"override {k}={overrides[k]!r}" for k in sorted(overrides)]

    all_spacings, all_shapes, summary_note = _dataset(fingerprint_entry, spacings, shapes)
    if summary_note:
        notes.append(summary_note)
    if "target_spacing" in overrides:
        spacing = _spacing(overrides["target_spacing"], "target_spacing")
    else:
        spacing, spacing_notes = _target_spacing_with_notes(all_spacings, all_shapes)
        notes += spacing_notes
    if "median_shape_after_resampling" in overrides:
        median_shape = _triple(overrides["median_shape_after_resampling"], "median_shape_after_resampling")
    else:
        new_shapes = [resampled_shape(sh, sp, spacing) for sh, sp in zip(all_shapes, all_spacings, strict=True)]
        mz, my, mx = (max(1, int(round(v))) for v in np.median(np.array(new_shapes, dtype=np.float64), axis=0))
        median_shape = (mz, my, mx)
    dataset_voxels = float(math.prod(median_shape)) * len(all_shapes)

    # budget
    if "memory_budget_bytes" in overrides:
        memory_budget_bytes = overrides["memory_budget_bytes"]
    if memory_budget_bytes is None:
        budget, source = default_memory_budget()
    else:
        budget, source = _positive_int(memory_budget_bytes, "memory_budget_bytes"), "given"
    source = str(overrides.get("budget_source", source))
    base = _positive_int(overrides.get("base_features", BASE_FEATURES), "base_features")

    # topology constraints from overrides
    fixed_strides: tuple[Triple, ...] | None = None
    max_pools: Triple | None = None
    max_stages: int | None = None
    if "strides" in overrides:
        fixed_strides = tuple(_triple(s, "strides") for s in overrides["strides"])
        if not fixed_strides or any(v not in (1, 2) for s in fixed_strides for v in s):
            raise PlanningError(f"strides must be a non-empty list of (z, y, x) strides of 1 or 2, got "
                                f"{overrides['strides']!r}")
    if "pool_per_axis" in overrides:
        max_pools = _triple(overrides["pool_per_axis"], "pool_per_axis", minimum=0)
    if "n_stages" in overrides:
        max_stages = _positive_int(overrides["n_stages"], "n_stages") - 1

    if fixed_strides is not None:
        fixed_pools = pools_from_strides(fixed_strides)
        if max_pools is not None and max_pools != fixed_pools:
            raise PlanningError(f"pool_per_axis {list(max_pools)} disagrees with strides (pools {list(fixed_pools)})")
        if max_stages is not None and max_stages + 1 != len(fixed_strides):
            raise PlanningError(f"n_stages {max_stages + 1} disagrees with strides ({len(fixed_strides)} stages)")

    def pools_of(patch: Sequence[int]) -> tuple[Triple, tuple[Triple, ...]]:
        if fixed_strides is not None:
            return fixed_pools, fixed_strides
        return pooling_topology(spacing, patch, max_pools, max_stages)

    def topology(patch: Sequence[int]) -> tuple[Triple, Triple, tuple[Triple, ...]]:
        if fixed_strides is not None:
            z, y, x = (max(2**p, n // 2**p * 2**p) for n, p in zip(patch, fixed_pools, strict=True))
            return (z, y, x), fixed_pools, fixed_strides
        return _fit_topology(spacing, patch, max_pools, max_stages)

    def estimate(patch: Sequence[int], strides: Sequence[Triple], batch: int) -> int:
        return estimate_memory_bytes(patch, strides, base, batch, in_channels, num_classes)

    # patch size: from the median shape (capped), shrunk until batch MIN_BATCH_SIZE fits the budget
    if "patch_size" in overrides:
        patch = _triple(overrides["patch_size"], "patch_size")  # as given: divisibility is checked, never fixed
        pools, strides = pools_of(patch)
    else:
        patch, pools, strides = topology(_initial_patch(spacing, median_shape))
        floor = [min(MIN_PATCH_EDGE, m) for m in median_shape]
        while estimate(patch, strides, MIN_BATCH_SIZE) > budget:
            # shrink the axis that is longest in millimetres (ties: the one with most voxels) by one step of its
            # divisor; nnU-Net's trick: take the divisor of the shrunk patch, so that e.g. 224 is not skipped
            order = sorted(range(3), key=lambda i: (patch[i] * spacing[i], patch[i]), reverse=True)
            axis = next((i for i in order if patch[i] > floor[i]), None)
            if axis is None:
                notes.append(f"the smallest patch {list(patch)} does not fit the budget of {budget} bytes at "
                             f"batch {MIN_BATCH_SIZE}: the estimate is {estimate(patch, strides, MIN_BATCH_SIZE)}")
                break
            trial = list(patch)
            trial[axis] = max(floor[axis], patch[axis] - 2**pools[axis])
            trial_pools, _ = pools_of(trial)
            shrunk = list(patch)
            shrunk[axis] = max(floor[axis], patch[axis] - 2**trial_pools[axis])
            new_patch, new_pools, new_strides = topology(shrunk)
            if new_patch == patch:  # this axis cannot shrink further under its pooling
                floor[axis] = patch[axis]
                continue
            patch, pools, strides = new_patch, new_pools, new_strides
    if fixed_strides is None and max_pools is not None and pools != max_pools:
        raise PlanningError(f"pool_per_axis {list(max_pools)} does not fit patch {list(patch)} at spacing "
                            f"{list(spacing)}: at most {list(pools)} poolings keep feature maps >= "
                            f"{MIN_FEATURE_MAP_EDGE} voxels")
    _check_divisible(patch, pools)
    if fixed_strides is None and max_stages is not None and len(strides) != max_stages + 1:
        raise PlanningError(f"n_stages {max_stages + 1} does not fit patch {list(patch)}: at most {len(strides)} "
                            f"stages keep feature maps >= {MIN_FEATURE_MAP_EDGE} voxels")

    # batch size: as many patches as the budget holds, at least 2, at most 5% of the dataset's voxels
    if "batch_size" in overrides:
        batch = _positive_int(overrides["batch_size"], "batch_size")
    else:
        per_sample = estimate(patch, strides, 1) - estimate(patch, strides, 0)
        fits = (budget - estimate(patch, strides, 0)) // per_sample
        covered = max(1, int(round(dataset_voxels * MAX_DATASET_COVERED / math.prod(patch))))
        batch = max(MIN_BATCH_SIZE, min(fits, covered))
        if covered < fits:
            notes.append(f"batch size {batch} although the budget holds {fits}: one step sees at most "
                         f"{MAX_DATASET_COVERED:.0%} of the dataset's voxels ({covered} patches; never below "
                         f"{MIN_BATCH_SIZE})")
    used = estimate(patch, strides, batch)
    if used > budget:
        notes.append(f"estimated memory {used} bytes exceeds the budget of {budget} bytes")

    return SegmentationPlan(
        target_spacing=spacing,
        median_shape_after_resampling=median_shape,
        patch_size=patch,
        batch_size=batch,
        pool_per_axis=pools,
        strides=strides,
        n_stages=len(strides),
        base_features=base,
        memory_budget_bytes=int(budget),
        budget_source=source,
        notes=tuple(notes),
    )
