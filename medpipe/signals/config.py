"""How `medpipe ingest-signals` makes a signals store (one pydantic section, recorded in the store)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from medpipe.config import SplitConfig, StoreConfig, _Section, check_class_names


class SignalIngestConfig(_Section):
    """Resampling, windowing and checks of physiological signal records (ECG)."""

    rate_hz: float = Field(default=100.0, gt=0, le=20_000, description="common sampling rate of the store "
                           "(PTB-XL's low-resolution rate; records are resampled to it)")
    window_s: float = Field(default=5.0, gt=0, description="window length, seconds")
    overlap_s: float = Field(default=0.0, ge=0, description="overlap of consecutive windows, seconds (< window_s)")
    last_partial: Literal["drop", "pad"] = Field(
        default="drop", description="the last window of a record when it would run past the end: drop it, or "
        "keep it zero-padded")
    min_seconds: float | None = Field(
        default=None, gt=0, description="records shorter than this are quarantined (too_short); None = one window")
    leads: list[str] | None = Field(
        default=None, description="leads every record must have, in this order (others are dropped); None = the "
        "lead set most records share")
    table_rate_hz: float | None = Field(
        default=None, gt=0, description="sampling rate of CSV/Parquet tables that have no `time` column")
    max_nan_seconds: float = Field(default=0.5, ge=0, description="longest run of missing samples that is "
                                   "interpolated; a longer one quarantines the record (nan_run)")
    flat_seconds: float = Field(default=2.0, gt=0, description="a lead constant for this long is a flat lead "
                                "(electrode off): the record is quarantined (flat_lead)")
    manifest: str | None = Field(default=None, description="labels CSV (path,label[,patient_id]); default "
                                 "SOURCE/labels.csv when present")
    classes: list[str] | None = Field(default=None, description="declared class names; default: from the manifest")
    manifest_only: bool = Field(default=False, description="ingest only the records the manifest lists (others are "
                                "counted as skipped): e.g. PTB-XL's 100 Hz records without their 500 Hz copies")
    patient_folder_depth: int = Field(
        default=1, ge=0, description="a record without a patient ID in its header or the manifest belongs to the "
        "patient named by this many leading folders of its path (0: each record is its own patient)")
    files_per_shard: int = Field(default=64, ge=1, description="records per parallel read task, at least")
    split: SplitConfig = SplitConfig()
    store: StoreConfig = StoreConfig()
    workers: int = Field(default=2, ge=1, description="LocalCluster workers when no scheduler is given")
    scheduler: str | None = Field(default=None, description="address of an existing Dask scheduler, tcp://host:8786")

    @field_validator("classes")
    @classmethod
    def _class_names(cls, value: list[str] | None) -> list[str] | None:
        return check_class_names(value)

    @model_validator(mode="after")
    def _windows(self) -> "SignalIngestConfig":
        if self.overlap_s >= self.window_s:
            raise ValueError(f"overlap_s ({self.overlap_s}) must be less than window_s ({self.window_s})")
        if self.window_samples < 8:
            raise ValueError(f"window_s x rate_hz gives {self.window_samples} samples per window; need at least 8")
        if self.store.training_dtype == "uint8":
            raise ValueError("store.training_dtype uint8 is for 2D image stores; signal windows are stored as float32")
        return self

    @property
    def window_samples(self) -> int:
        """Samples per window at the store's rate."""
        return int(round(self.window_s * self.rate_hz))

    @property
    def stride_samples(self) -> int:
        """Samples between consecutive window starts (window minus overlap), at least one."""
        return max(1, self.window_samples - int(round(self.overlap_s * self.rate_hz)))

    @property
    def min_record_seconds(self) -> float:
        """Records shorter than this are quarantined."""
        return self.min_seconds if self.min_seconds is not None else self.window_s

    def lineage_dict(self) -> dict[str, Any]:
        """The config as the store records it: no runtime settings (workers, scheduler)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("workers", "scheduler")}
