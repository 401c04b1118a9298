"""One pydantic configuration for the whole pipeline (YAML file or CLI flags); `to_dict` is what lineage records."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medpipe.identifiers import looks_like_identifier


def check_class_names(value: list[str] | None) -> list[str] | None:
    """Declared class names: unique, and none that could name a person (they are stored as written)."""
    if value is not None and len(set(value)) != len(value):
        raise ValueError("class names must be unique")
    if value is not None and any(looks_like_identifier(v) for v in value):
        raise ValueError("a class name looks like a name, ID or date; class names are stored as written")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form, recorded in store attributes and checkpoints."""
        return self.model_dump(mode="json")


class PreprocessConfig(_Section):
    """How archive images become training samples: fixed-shape arrays (2D; 3D option) or whole per-case volumes
    (3D default, for patch-based segmentation)."""

    kind: Literal["2d", "3d"] = "2d"
    channels: Literal[1, 3] = 1
    shape: tuple[int, ...] = (64, 64)
    layout: Literal["auto", "fixed", "volumes"] = Field(
        default="auto", description="training layout: fixed = one (N, C, *shape) array (crop/pad or resize); "
        "volumes = each 3D case whole, resampled to the plan's spacing in RAS orientation (docs/store.md); "
        "auto = volumes for 3d, fixed for 2d. 3D classification needs fixed")
    target_spacing: tuple[float, float, float] | None = Field(
        default=None, description="3D only: (dz, dy, dx) mm; None = planned from the dataset (docs/planning.md)"
    )
    plan: dict[str, Any] = Field(
        default_factory=dict, description="volumes layout: overrides of the segmentation plan's fields "
        "(patch_size, batch_size, strides, n_stages, pool_per_axis, base_features, memory_budget_bytes)")
    normalization: dict[str, Any] | None = Field(
        default=None, description="intensity normalisation per modality used instead of this dataset's fingerprint "
        "(`medpipe predict` passes the training store's, so new studies are normalised as the training data were)")
    fit: Literal["resize", "crop_or_pad"] = Field(
        default="resize", description="2D: how images reach `shape` (3D always crops/pads after resampling)"
    )
    max_volume_voxels: int = Field(
        default=512**3, ge=1, description="volumes layout: a case larger than this after resampling is excluded")

    def effective_layout(self) -> Literal["fixed", "volumes"]:
        """The layout this config writes (resolves auto)."""
        if self.layout == "auto":
            return "volumes" if self.kind == "3d" else "fixed"
        return self.layout

    @model_validator(mode="after")
    def _shape_matches_kind(self) -> "PreprocessConfig":
        want = 2 if self.kind == "2d" else 3
        if len(self.shape) != want or min(self.shape) < 4:
            raise ValueError(f"shape must have {want} sizes >= 4 for kind={self.kind}, got {self.shape}")
        if self.layout == "volumes" and self.kind != "3d":
            raise ValueError("layout volumes is for kind 3d")
        return self


class StoreConfig(_Section):
    """Chunking and compression of the training arrays and archive."""

    chunk_bytes: int = Field(default=4 << 20, ge=1 << 12, description="target bytes of one training chunk (decoded: "
                             "uint8 images count as the float32 they are read as)")
    chunks_per_shard: int = Field(default=16, ge=1)
    codec: Literal["zstd", "lz4", "none"] = Field(
        default="zstd", description="Blosc compressor of the training arrays (fixed and volumes layouts)")
    level: int = Field(default=1, ge=0, le=9, description="Blosc level of the training arrays; 1 measured fastest "
                       "at ~equal ratio (docs/benchmarks.md)")
    training_dtype: Literal["float32", "float16", "uint8"] = Field(
        default="float32", description="dtype of the training images: float16 halves their bytes (normalised "
        "intensities keep ~3 significant digits); uint8 quarters them (2D stores whose images are scaled to 0..1, "
        "i.e. not CT or MR: steps of 1/255, at most half a grey level of an 8-bit source; read back as float32); "
        "zarr 3 has no bfloat16 data type, so bfloat16 is not offered")
    archive_codec: Literal["auto", "jpegls", "zstd", "lz4", "none"] = Field(
        default="auto", description="lossless codec of the archive images: auto = the measured choice per dtype "
        "(JPEG-LS for 8/16-bit integer images, Blosc zstd otherwise and for masks; medpipe/codecs.py)")
    archive_level: int = Field(default=3, ge=0, le=9, description="Blosc level of the archive when it uses Blosc")
    volume_chunk: int = Field(default=64, ge=8, le=512, description="volumes layout: chunk edge (voxels) of each "
                              "case's arrays; a patch read decodes only the chunks it touches")
    volume_codec: Literal["blosc", "jpegls"] = Field(
        default="blosc", description="volumes layout: codec of the case images that keep integer intensities (CT in "
        "HU): blosc (`codec`/`level`, decoded at ~1 GB/s) or jpegls (lossless; ~15 % smaller on natively sampled "
        "CT such as dcm_qa_ct's GE series, larger on volumes upsampled along z or phantoms in air; decoded at "
        "~120 MB/s per loader process; docs/benchmarks.md); float images always use Blosc")


class SplitConfig(_Section):
    """Patient-level train/val/test fractions (stratified by label)."""

    train: float = Field(default=0.7, gt=0, le=1)
    val: float = Field(default=0.15, ge=0, lt=1)
    test: float = Field(default=0.15, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("split fractions train + val + test must sum to 1")
        return self


# Settings that change where and how fast ingestion runs, never what it produces.
INGEST_RUNTIME_FIELDS = frozenset({"workers", "scheduler", "files_per_shard"})


class IngestConfig(_Section):
    """Everything `medpipe ingest` needs besides SOURCE, STORE and the key."""

    preprocess: PreprocessConfig = PreprocessConfig()
    store: StoreConfig = StoreConfig()
    split: SplitConfig = SplitConfig()
    manifest: str | None = Field(default=None, description="labels CSV; default SOURCE/labels.csv when present")
    classes: list[str] | None = Field(default=None, description="declared class names; default: from the manifest")
    files_per_shard: int = Field(default=256, ge=1, description="files per parallel work unit, at least (larger "
                                 "when that makes more than 4 tasks per worker)")
    order_seed: int = Field(default=0, description="seed of the sample order in the training arrays")
    max_image_bytes: int = Field(
        default=4 << 30, ge=1 << 20, description="largest decoded image (bytes, from its header) medpipe decodes; "
        "larger files are quarantined as too_large before decoding (also capped at 1/4 of a Dask worker's memory)")
    nifti_modality: Literal["CT", "MR", "PT", "NM", "US", "OT"] = Field(
        default="MR", description="modality of NIfTI files (they record none): chooses the intensity normalisation "
        "(CT: dataset percentiles in HU; MR: per image). DICOM files use their header's Modality")
    patient_folder_depth: int | None = Field(
        default=None, ge=1, description="non-DICOM files without a manifest patient_id: how many leading folders of "
        "the path name the patient (1 for PATIENT/study/file); None = auto (see docs/store.md)")
    workers: int = Field(default=2, ge=1, description="LocalCluster workers when no scheduler is given")
    scheduler: str | None = Field(default=None, description="address of an existing Dask scheduler, tcp://host:8786")

    @model_validator(mode="after")
    def _uint8_is_2d(self) -> "IngestConfig":
        if self.store.training_dtype == "uint8" and self.preprocess.kind != "2d":
            raise ValueError("store.training_dtype uint8 is for 2D stores (3D volumes keep CT's int16 HU or float "
                             "intensities); use float16 to halve a 3D store's training bytes")
        return self

    def lineage_dict(self) -> dict[str, Any]:
        """What the data depends on (recorded in the store and its run fingerprint): no runtime settings, so
        `--workers 4` or another scheduler never re-ingests anything."""
        return {k: v for k, v in self.to_dict().items() if k not in INGEST_RUNTIME_FIELDS}

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str] | None) -> list[str] | None:
        return check_class_names(value)


def load_config(path: str | Path | None, schema: type[_Section] = IngestConfig, section: str | None = None,
                **overrides: Any) -> Any:
    """Read a YAML config (or defaults), then apply non-None CLI overrides given as dotted keys.

    With `section`, a file may hold several sections (`ingest:`, `train:`); that one is used when present."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must hold a mapping")
        data = loaded or {}
    if section and isinstance(data.get(section), dict):
        data = data[section]
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return schema.model_validate(data)
