"""Per-case training volumes of a 3D store ("volumes" layout): canonical orientation, resampling to the plan's
spacing, chunked per-case arrays, and the exact way back to each case's source grid.

Canonical orientation is **RAS** (nibabel's closest canonical, MONAI's `Orientation` default): in an array
(C, Z, Y, X) the X index increases towards the patient's Right, Y towards Anterior, Z towards Superior. Reorienting
only permutes and flips axes (no interpolation), so it is undone exactly; DICOM geometry (LPS) and NIfTI geometry
(RAS) are both converted to an RAS affine first, so a DICOM series and its NIfTI export land on the same canonical
grid. Resampling averages along axes that shrink 2x or more and is trilinear otherwise; label maps are resampled
per label (one-hot, linear, >= 0.5), as nnU-Net resamples segmentations, so a mask keeps its volume and thin
structures survive where nearest neighbour drops them. Written on torch's interpolate rather than MONAI/SimpleITK
resamplers: it is the one call that does area + trilinear on (C, Z, Y, X) arrays without metadata round trips.

Layout (docs/store.md):
    training/volumes/<i>/image   float32 (C, Z, Y, X) canonical, resampled, normalised
    training/volumes/<i>/mask    uint8 (1, Z, Y, X), same grid (all zeros for a case without a mask)
    training/volumes/<i> attrs["medpipe"] = {"unit": ..., "geometry": CaseGeometry.to_dict()}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
import zarr

from medpipe.config import StoreConfig
from medpipe.codecs import codec_chain
from medpipe.store import ATTRS_KEY, attrs_of, get_array, get_group, sample_digest

if TYPE_CHECKING:
    from medpipe.training.chunk_reader import RegionArray

CANONICAL = "RAS"
VOLUMES = "training/volumes"
CHUNKS_PER_SHARD_EDGE = 4  # a shard holds up to 4 x 4 x 4 chunks of one case (64^3 chunks -> 256^3 shards)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

Triple = tuple[int, int, int]
Spacing = tuple[float, float, float]
Interpolation = Literal["linear", "labels", "nearest"]


@dataclass(frozen=True)
class CaseGeometry:
    """How a stored training volume relates to its source (archive) image; axis triples are (z, y, x).

    `to_canonical` is a nibabel orientation array (3 x 2) for the source index axes (x, y, z): reorienting the
    source array by it gives the canonical (RAS) array of `canonical_shape`, which was resampled to `shape` at
    `spacing` (the plan's target spacing up to the rounding of the shape). `source_affine` maps source index (x, y, z) to RAS mm (what a NIfTI of the source grid carries)."""

    source_shape: Triple
    source_affine: tuple[tuple[float, ...], ...]  # 4 x 4
    to_canonical: tuple[tuple[float, float], ...]  # 3 x 2
    canonical_shape: Triple
    canonical_spacing: Spacing
    shape: Triple
    spacing: Spacing
    geometry_known: bool = True  # False: the source had no affine; its axes were taken as already canonical

    @property
    def source_spacing(self) -> Spacing:
        """(dz, dy, dx) mm of the source grid (lengths of the affine's columns)."""
        norms = np.linalg.norm(np.asarray(self.source_affine)[:3, :3], axis=0)  # x, y, z
        return float(norms[2]), float(norms[1]), float(norms[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; `from_dict` reads it back."""
        return {"source_shape": list(self.source_shape), "source_affine": [list(r) for r in self.source_affine],
                "to_canonical": [list(r) for r in self.to_canonical], "canonical_shape": list(self.canonical_shape),
                "canonical_spacing": list(self.canonical_spacing), "shape": list(self.shape),
                "spacing": list(self.spacing), "geometry_known": self.geometry_known, "canonical": CANONICAL}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaseGeometry:
        def triple(v: Any) -> Triple:
            return int(v[0]), int(v[1]), int(v[2])

        def spacing(v: Any) -> Spacing:
            return float(v[0]), float(v[1]), float(v[2])

        return cls(source_shape=triple(data["source_shape"]),
                   source_affine=tuple(tuple(float(x) for x in r) for r in data["source_affine"]),
                   to_canonical=tuple((float(r[0]), float(r[1])) for r in data["to_canonical"]),
                   canonical_shape=triple(data["canonical_shape"]), canonical_spacing=spacing(data["canonical_spacing"]),
                   shape=triple(data["shape"]), spacing=spacing(data["spacing"]),
                   geometry_known=bool(data.get("geometry_known", True)))


def ras_affine(affine: Sequence[Sequence[float]] | np.ndarray | None, world: Literal["LPS", "RAS"],
               spacing: Sequence[float]) -> tuple[np.ndarray, bool]:
    """(4 x 4 RAS affine of index (x, y, z), known) from a reader's affine in `world` coordinates; without one
    (PNG/TIFF stacks, DICOM without geometry) a diagonal affine of `spacing` (dz, dy, dx), flagged unknown."""
    if affine is not None:
        a = np.asarray(affine, dtype=np.float64).reshape(4, 4)
        if np.all(np.isfinite(a)) and abs(np.linalg.det(a[:3, :3])) > 1e-12:
            return (LPS_TO_RAS @ a if world == "LPS" else a), True
    dz, dy, dx = (float(s) for s in spacing)
    return np.diag([dx, dy, dz, 1.0]), False


def canonical_ornt(affine_ras: np.ndarray) -> np.ndarray:
    """nibabel orientation (3 x 2) taking the source index axes (x, y, z) to the closest RAS axes."""
    return nib.orientations.io_orientation(np.asarray(affine_ras))


def inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation that undoes `ornt` (an axis permutation with flips)."""
    ornt = np.asarray(ornt)
    inverse = np.zeros_like(ornt)
    for source_axis, (target_axis, flip) in enumerate(ornt):
        inverse[int(target_axis)] = (source_axis, flip)
    return inverse


def reorient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply `ornt` (for index axes x, y, z) to a channel-first (C, Z, Y, X) array; exact (permute + flip)."""
    xyz = np.transpose(array, (3, 2, 1, 0))  # (X, Y, Z, C): nibabel's axis order, channels trailing
    return np.ascontiguousarray(np.transpose(nib.orientations.apply_orientation(xyz, ornt), (3, 2, 1, 0)))


def _reoriented_zyx(values: Sequence[float], ornt: np.ndarray) -> list[float]:
    """A per-axis (z, y, x) quantity (shape, spacing) after reorienting by `ornt`."""
    xyz = list(values)[::-1]
    out = [0.0] * 3
    for source_axis, (target_axis, _) in enumerate(np.asarray(ornt)):
        out[int(target_axis)] = xyz[source_axis]
    return out[::-1]


def resample(array: np.ndarray, shape: Sequence[int], mode: Interpolation) -> np.ndarray:
    """(C, Z, Y, X) -> (C, *shape). "linear": area averaging along axes that shrink 2x or more, then trilinear (images, probabilities); "labels": a label map resampled per label as nnU-Net does (each label's one-hot
    channel interpolated "linear", voxels >= 0.5 take the label); "nearest": nearest neighbour."""
    target = tuple(int(s) for s in shape)
    if tuple(array.shape[1:]) == target:
        return array
    if mode == "labels":
        labels = np.asarray(array[0])
        out = np.zeros(target, dtype=array.dtype)
        for value in np.unique(labels):
            if value != 0:
                out[_linear((labels == value)[None].astype(np.float32), target)[0] >= 0.5] = value
        return out[None]
    if mode == "nearest":
        return _interpolate(np.asarray(array, dtype=np.float32), target, "nearest").astype(array.dtype)
    return _linear(np.asarray(array, dtype=np.float32), target)


def _linear(array: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """Area-average the axes that shrink by 2x or more (no aliasing, volumes kept), then trilinear on the rest
    (area bins of a mild shrink overlap unevenly and distort small objects more than trilinear does)."""
    shrunk = tuple(t if t * 2 <= n else n for n, t in zip(array.shape[1:], target))
    if shrunk != tuple(array.shape[1:]):
        array = _interpolate(array, shrunk, "area")
    return _interpolate(array, target, "trilinear") if shrunk != target else array


def _interpolate(array: np.ndarray, shape: tuple[int, ...], mode: str) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    kwargs: dict[str, Any] = {"align_corners": False} if mode == "trilinear" else {}
    return torch.nn.functional.interpolate(tensor, size=shape, mode=mode, **kwargs)[0].numpy()


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> Triple:
    """Shape (z, y, x) covering the same extent at `target` spacing."""
    z, y, x = (max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))
    return z, y, x


def plan_geometry(source_shape: Sequence[int], affine_ras: np.ndarray, target_spacing: Sequence[float] | None,
                  geometry_known: bool = True) -> CaseGeometry:
    """The geometry of a case before any pixels move: canonical shape/spacing and the stored shape."""
    ornt = canonical_ornt(affine_ras)
    norms = np.linalg.norm(affine_ras[:3, :3], axis=0)
    src_spacing = (float(norms[2]), float(norms[1]), float(norms[0]))
    c_shape = tuple(int(v) for v in _reoriented_zyx(list(source_shape), ornt))
    c_spacing = tuple(float(v) for v in _reoriented_zyx(list(src_spacing), ornt))
    target = tuple(float(v) for v in (target_spacing if target_spacing is not None else c_spacing))
    shape = resampled_shape(c_shape, c_spacing, target)
    # the spacing the stored voxels really have: the whole extent over a whole number of voxels (the target up to
    # rounding of the shape, which matters for volumes of few slices)
    spacing = tuple(s * n / m for s, n, m in zip(c_spacing, c_shape, shape))
    return CaseGeometry(
        source_shape=(int(source_shape[0]), int(source_shape[1]), int(source_shape[2])),
        source_affine=tuple(tuple(float(x) for x in row) for row in affine_ras),
        to_canonical=tuple((float(a), float(f)) for a, f in ornt),
        canonical_shape=(c_shape[0], c_shape[1], c_shape[2]),
        canonical_spacing=(c_spacing[0], c_spacing[1], c_spacing[2]),
        shape=shape, spacing=(spacing[0], spacing[1], spacing[2]), geometry_known=geometry_known)


def to_stored(array: np.ndarray, geometry: CaseGeometry, mode: Interpolation) -> np.ndarray:
    """A source-grid array (C, *source_shape) -> the stored grid (C, *geometry.shape): reorient, then resample."""
    canonical = reorient(array, np.asarray(geometry.to_canonical))
    return resample(canonical, geometry.shape, mode)


def to_source(array: np.ndarray, geometry: CaseGeometry, mode: Interpolation) -> np.ndarray:
    """A stored-grid array (K, *geometry.shape) -> the source grid (K, *source_shape): resample to the canonical
    shape, then undo the reorientation. Use "linear" for probabilities/logits and "labels" for label maps."""
    canonical = resample(array, geometry.canonical_shape, mode)
    return reorient(canonical, inverse_ornt(np.asarray(geometry.to_canonical)))


def nifti_image(labels: np.ndarray, geometry: CaseGeometry) -> nib.Nifti1Image:
    """A (Z, Y, X) source-grid array as a NIfTI image with the source affine (RAS), header units mm."""
    data = np.ascontiguousarray(np.transpose(np.asarray(labels), (2, 1, 0)))  # (X, Y, Z)
    image = nib.Nifti1Image(data, np.asarray(geometry.source_affine))
    image.header.set_xyzt_units("mm")
    image.header.set_qform(np.asarray(geometry.source_affine), code=1)
    image.header.set_sform(np.asarray(geometry.source_affine), code=1)
    return image


def volume_chunks(shape: Sequence[int], chunk_edge: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, shards) for a (C, Z, Y, X) case array: chunk_edge^3 blocks (clipped to the case), shards of up to
    CHUNKS_PER_SHARD_EDGE chunks per axis (clipped to the case, rounded up to whole chunks)."""
    c, *spatial = (int(s) for s in shape)
    chunks = tuple(min(chunk_edge, n) for n in spatial)
    shards = tuple(min(k * CHUNKS_PER_SHARD_EDGE, -(-n // k) * k) for k, n in zip(chunks, spatial))
    return (c, *chunks), (c, *shards)


def write_case(root: zarr.Group, index: int, image: np.ndarray, mask: np.ndarray | None, geometry: CaseGeometry,
               unit: str, config: StoreConfig, raw_modality: str | None = None,
               raw_floor: float | None = None) -> dict[str, str]:
    """Write case `index` under training/volumes/ (overwriting it): image (C, Z, Y, X) in the store's training
    dtype (float32, or float16 when configured; raw integer intensities as they are), mask uint8 (1, Z, Y, X) (zeros when None), with dimension names
    and the case's geometry; codecs per layer (medpipe.codecs). Returns the digests of what it stored.
    `raw_modality`: the image keeps its raw intensities (CT in HU) and is normalised as it is read, with the
    store's `normalization` for that modality (see `open_case`); `raw_floor`: the value every raw intensity below it
    was raised to (CT: `medpipe.preprocess.floor_below_ct_foreground`), recorded in the case's attributes."""
    group = root.require_group(VOLUMES).create_group(str(index), overwrite=True)
    # raw integer intensities (CT in HU, not resampled) stay integers: exact, and half of float32
    dtype = image.dtype if image.dtype.kind in "iu" and raw_modality else np.dtype(config.training_dtype)
    chunks, shards = volume_chunks(image.shape, config.volume_chunk)
    arr = group.create_array("image", shape=image.shape, dtype=dtype, chunks=chunks, shards=shards,
                             fill_value=0.0, dimension_names=("c", "z", "y", "x"),
                             **codec_chain("volume_image", config, dtype))
    stored = image.astype(dtype, copy=False)
    arr[...] = stored
    mask = np.zeros((1, *image.shape[1:]), np.uint8) if mask is None else mask.astype(np.uint8, copy=False)
    m_chunks, m_shards = volume_chunks(mask.shape, config.volume_chunk)
    marr = group.create_array("mask", shape=mask.shape, dtype="uint8", chunks=m_chunks, shards=m_shards,
                              fill_value=0, dimension_names=("c", "z", "y", "x"),
                              **codec_chain("volume_mask", config, "uint8"))
    marr[...] = mask
    group.attrs[ATTRS_KEY] = {"unit": unit, "geometry": geometry.to_dict(),
                              **({"raw_intensities": raw_modality} if raw_modality else {}),
                              **({"raw_floor": raw_floor} if raw_floor is not None else {})}
    return {f"volumes/{index}/image": sample_digest(stored), f"volumes/{index}/mask": sample_digest(mask)}


@dataclass(frozen=True)
class NormalizedVolume:
    """A case image stored with raw intensities (CT in HU), normalised as it is read (clip and z-score with the
    dataset's statistics: elementwise, so any region reads as the slice of the normalised whole). Reads like the
    zarr array it wraps: `shape`, `ndim`, `chunks`, `dtype` (float32), `fill_value`, `[selection]`."""

    array: zarr.Array | RegionArray  # or the same array read chunk by chunk (3D patches)
    modality: str
    norm: Mapping[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def ndim(self) -> int:
        return len(self.array.shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.array.chunks)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(np.float32)

    @property
    def fill_value(self) -> float:
        return 0.0

    def __getitem__(self, selection: Any) -> np.ndarray:
        from medpipe.preprocess import normalize

        return normalize(np.asarray(self.array[selection]), self.modality, dict(self.norm))


@dataclass(frozen=True)
class VolumeCase:
    """One stored case: lazily read arrays and its geometry."""

    index: int
    unit: str
    image: zarr.Array | NormalizedVolume  # (C, Z, Y, X), read as float32 normalised intensities
    mask: zarr.Array  # uint8 (1, Z, Y, X)
    geometry: CaseGeometry


def open_case(root: zarr.Group, index: int) -> VolumeCase:
    """Case `index` of a volumes-layout store (arrays are not read; raw intensities normalised as read)."""
    group = get_group(root, f"{VOLUMES}/{int(index)}")
    attrs = attrs_of(group)
    stored = get_array(group, "image")
    image: zarr.Array | NormalizedVolume = stored
    modality = attrs.get("raw_intensities")
    if modality:
        norm = (attrs_of(root).get("normalization") or {}).get(modality)
        if not norm:
            raise ValueError(f"case {index} holds raw {modality} intensities but the store records no "
                             "normalisation for them: re-ingest the store")
        image = NormalizedVolume(stored, str(modality), norm)
    return VolumeCase(int(index), str(attrs.get("unit", "")), image, get_array(group, "mask"),
                      CaseGeometry.from_dict(attrs["geometry"]))


def store_layout(attrs: Mapping[str, Any]) -> str:
    """"volumes" or "fixed" from a store's medpipe attributes (stores written before layouts existed: fixed)."""
    return str(attrs.get("layout") or "fixed")


__all__ = ["CANONICAL", "VOLUMES", "CaseGeometry", "NormalizedVolume", "VolumeCase", "canonical_ornt", "inverse_ornt", "nifti_image",
           "open_case", "plan_geometry", "ras_affine", "reorient", "resample", "resampled_shape", "store_layout",
           "to_source", "to_stored", "volume_chunks", "write_case"]
