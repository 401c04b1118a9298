"""`PipelineParams`: every parameter of a pipeline run, validated before any work starts (one-line errors)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medpipe.config import IngestConfig, _Section
from medpipe.errors import UserError
from medpipe.gan.augment import AugmentConfig
from medpipe.training.config import TrainConfig

STAGES = ("ingest", "train", "evaluate", "augment", "retrain", "promote", "predict")
DEFAULT_RETRAIN_RATIO = 1.0  # synthetic samples per real train sample when `retrain` does not say


_ENV_TEMPLATE = re.compile(r"{{\s*\$(\w+)\s*}}")


class PipelineParamsError(UserError):
    """Invalid pipeline parameters (one line naming the field)."""


class EvaluateStage(_Section):
    """How the evaluate stage (and the retrained model's evaluation) scores a model."""

    split: Literal["train", "val", "test"] = "test"
    n_boot: int = Field(default=1000, ge=10, description="bootstrap resamples for the 95% CIs")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PromoteStage(_Section):
    """How candidates are compared with the promoted model (medpipe.promotion.compare_models)."""

    split: Literal["train", "val", "test"] = "test"
    tolerance: float = Field(default=0.0, ge=0, description="how much worse than the current model still promotes")
    n_boot: int = Field(default=1000, ge=10, description="paired patient bootstrap resamples")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PredictStage(_Section):
    """How the predict stage runs the promoted model on `predict_source`."""

    device: Literal["auto", "cpu", "cuda"] = "auto"


class PipelineConfig(_Section):
    """`config`: one section per stage, and the local scratch folder (not lineage)."""

    work_dir: str | None = Field(default=None, description="local scratch folder; None = a temporary folder")
    ingest: IngestConfig = IngestConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateStage = EvaluateStage()
    augment: AugmentConfig = AugmentConfig()
    retrain: TrainConfig = Field(default=TrainConfig(synthetic_ratio=DEFAULT_RETRAIN_RATIO),
                                 description="TrainConfig fields that differ from `train` (default: synthetic_ratio 1)")
    promote: PromoteStage = PromoteStage()
    predict: PredictStage = PredictStage()

    @model_validator(mode="before")
    @classmethod
    def _retrain_over_train(cls, data: Any) -> Any:
        """`retrain` holds overrides of `train` (plus a synthetic ratio): resolve them into a full TrainConfig."""
        if not isinstance(data, dict):
            return data
        train = data.get("train") or {}
        retrain = data.get("retrain") or {}
        if isinstance(train, BaseModel):
            train = train.model_dump(mode="json")
        if isinstance(retrain, BaseModel):
            retrain = retrain.model_dump(mode="json", exclude_defaults=True)
        if isinstance(train, dict) and isinstance(retrain, dict):
            return {**data, "retrain": {**train, "synthetic_ratio": DEFAULT_RETRAIN_RATIO, **retrain}}
        return data

    @model_validator(mode="after")
    def _retrain_uses_synthetic(self) -> "PipelineConfig":
        if self.retrain.synthetic_ratio <= 0 and not self.retrain.synthetic_only:
            raise ValueError("retrain.synthetic_ratio must be > 0: retraining mixes in the synthetic set")
        return self


class PipelineParams(BaseModel):
    """The parameters of `medpipe-pipeline` (flow) and `medpipe run-pipeline` (CLI, YAML holding these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = Field(min_length=1, description="the Zarr store (local path or s3:// URL)")
    output: str = Field(min_length=1, description="where results are published (local path or s3:// URL)")
    source: str | None = Field(default=None, description="the images to ingest (needed by the ingest stage)")
    stages: list[str] | None = Field(default=None, description="stages to run; None = all, in order")
    config: PipelineConfig = PipelineConfig()
    scheduler: str | None = Field(default=None, description="Dask scheduler address for ingest (not lineage)")
    workers: int = Field(default=2, ge=1, description="LocalCluster workers for ingest when no scheduler")
    key_secret: str | None = Field(default=None, description="Prefect Secret block holding the de-id key")
    predict_source: str | None = Field(default=None, description="new studies to predict (needed by predict)")

    @field_validator("store", "output", "source", "predict_source", "scheduler", "key_secret")
    @classmethod
    def _no_unresolved_template(cls, value: str | None) -> str | None:
        """`prefect deploy` keeps `{{ $NAME }}` as written when NAME is unset where it runs."""
        match = _ENV_TEMPLATE.search(value or "")
        if match:
            raise ValueError(f"is the unresolved template {match.group(0)!r}: set {match.group(1)} in the environment "
                             "where `prefect deploy` runs (see prefect.yaml), or give the parameter")
        return value

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        unknown = [s for s in value if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown))}; stages are {', '.join(STAGES)}")
        if not value:
            raise ValueError("give at least one stage (or leave stages out for all)")
        return [s for s in STAGES if s in value]  # always run in pipeline order

    @field_validator("scheduler")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("tcp://", "tls://")):
            raise ValueError("must be a Dask scheduler address, tcp://host:port or tls://host:port")
        return value

    @model_validator(mode="after")
    def _inputs_present(self) -> "PipelineParams":
        stages = self.selected()
        if "ingest" in stages and not self.source:
            raise ValueError("the ingest stage needs `source` (the images to ingest); give it or leave ingest out")
        if "predict" in stages and not self.predict_source:
            raise ValueError("the predict stage needs `predict_source` (new studies); give it or leave predict out")
        if _same_place(self.store, self.output):
            raise ValueError("`output` must be another place than `store` (each holds its own lock)")
        return self

    def selected(self) -> tuple[str, ...]:
        """The stages this run runs, in pipeline order."""
        return tuple(self.stages) if self.stages is not None else STAGES

    def ingest_config(self) -> IngestConfig:
        """The ingest section with this run's scheduler and workers (runtime settings, never lineage)."""
        return self.config.ingest.model_copy(update={"scheduler": self.scheduler or self.config.ingest.scheduler,
                                                     "workers": self.workers})


def _same_place(a: str, b: str) -> bool:
    def norm(url: str) -> str:
        return url.rstrip("/") if "://" in url else str(Path(url).expanduser().resolve())

    return norm(a) == norm(b)


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _message(err: Any) -> str:
    """A short message for one pydantic error (`must be >= 1`, `unknown field`, ...)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()), "?")
        return f"must be {_BOUNDS[kind]} {bound}"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required"
    return str(err["msg"]).removeprefix("Value error, ")


def error_line(exc: ValidationError) -> str:
    """One line for a pydantic error: `invalid pipeline parameters: config.train.epochs: must be >= 1; ...`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {_message(err)}" if loc else _message(err))
    return " ".join(("invalid pipeline parameters: " + "; ".join(parts)).split())


def validate_params(data: dict[str, Any]) -> PipelineParams:
    """PipelineParams from plain data; PipelineParamsError (one line) when anything is wrong."""
    try:
        return PipelineParams.model_validate(data)
    except ValidationError as exc:
        raise PipelineParamsError(error_line(exc)) from None


def load_params(path: str | Path) -> PipelineParams:
    """PipelineParams from a YAML file holding its fields; PipelineParamsError (one line) on any problem."""
    file = Path(path)
    if not file.is_file():
        raise PipelineParamsError(f"pipeline config not found: {path}")
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PipelineParamsError(f"{path}: not valid YAML ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise PipelineParamsError(f"{path}: a pipeline config must hold a mapping of PipelineParams fields")
    return validate_params(data)
