"""The whole pipeline as one flow: ingest -> train -> evaluate -> augment -> retrain -> promote -> predict.

Each stage is an existing flow run as a subflow (ingest, train, evaluate, gan-augment) or a task (promote,
predict). A stage whose key (medpipe.pipeline.keys) is in OUTPUT's ledger with its outputs present is skipped;
ingest always runs (it is incremental: an unchanged source is a no-op, reported as skipped). Stages work in a
local scratch folder and publish to OUTPUT (local or s3://); OUTPUT/pipeline.json and a `pipeline` markdown
artifact tie the store's content hash to checkpoints, reports and predictions. See docs/pipeline.md.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from flows.augment import gan_augment_flow
from flows.evaluate import evaluate_flow
from flows.ingest import ingest_flow
from flows.runtime import crash_stale_run, shared_api_server
from flows.train import train_flow
from medpipe.errors import UserError
from medpipe.ingest.lock import new_run_id
from medpipe.pipeline import progress
from medpipe.pipeline.incremental import ingest_delta
from medpipe.pipeline.keys import DEPENDS_ON, lineage_config, stage_key
from medpipe.pipeline.ledger import LedgerEntry
from medpipe.pipeline.lineage import build_lineage
from medpipe.pipeline.lock import (acquire_output_lock, check_output_unlocked, release_output_lock,
                                   renew_output_lock)
from medpipe.pipeline.params import STAGES, PipelineParams, validate_params
from medpipe.pipeline.publish import join_url
from medpipe.pipeline.records import StageRecord
from medpipe.pipeline.summary import headline_metrics, pipeline_markdown
from tasks import pipeline as t

__all__ = ["STAGES", "pipeline_flow", "run_pipeline"]
CHECKPOINT_SUFFIXES = (".pt",)  # GAN/feature-classifier checkpoints stay in scratch; their sha256 is in the report


class PipelineStageError(UserError):
    """A stage cannot run: an input it needs is missing (one line saying which)."""


@dataclass(frozen=True)
class ModelRef:
    """A trained model available in scratch: which stage made it, its key, folder, published URL, sha256."""

    stage: str
    key: str
    local_dir: str
    url: str
    sha256: str


@dataclass
class PipelineRun:
    """The state of one run: parameters, scratch folder, stage keys and records so far."""

    params: PipelineParams
    work: Path
    run_id: str
    content_hash: str = ""
    keys: dict[str, str] = field(default_factory=dict)
    records: dict[str, StageRecord] = field(default_factory=dict)

    def url(self, *parts: str) -> str:
        return join_url(self.params.output, *parts)

    def key(self, stage: str) -> str:
        """The key of train/evaluate/augment/retrain (and ingest) from the store's content hash (memoised)."""
        if stage not in self.keys:
            deps = {d: self.key(d) for d in DEPENDS_ON[stage]}
            self.keys[stage] = stage_key(stage, self.content_hash, lineage_config(stage, self.params), deps)
        return self.keys[stage]


@flow(name="medpipe-pipeline", log_prints=False)
def pipeline_flow(store: str, output: str, source: str | None = None, stages: list[str] | None = None,
                  config: dict[str, Any] | None = None, scheduler: str | None = None, workers: int = 2,
                  key_secret: str | None = None, predict_source: str | None = None) -> dict[str, Any]:
    """Run the pipeline stages on STORE (ingesting SOURCE first), publishing results under OUTPUT."""
    params = validate_params({"store": store, "output": output, "source": source, "stages": stages,
                              "config": config or {}, "scheduler": scheduler, "workers": workers,
                              "key_secret": key_secret, "predict_source": predict_source})
    run_id = new_run_id()
    flow_run = FlowRunContext.get()
    # one pipeline per OUTPUT: a second run is refused in one line; a killed run's lock is taken over and its flow
    # run marked Crashed
    acquire_output_lock(params.output, run_id, flow_run_id=str(flow_run.flow_run.id) if flow_run and flow_run.flow_run
                        else None, on_stale=crash_stale_run)
    try:
        with _scratch(params.config.work_dir) as work:
            return _run(PipelineRun(params, work, run_id))
    finally:
        release_output_lock(params.output, run_id)


@contextmanager
def _scratch(work_dir: str | None) -> Iterator[Path]:
    if work_dir:
        path = Path(work_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="medpipe-pipeline-") as tmp:
            yield Path(tmp)


def _run(run: PipelineRun) -> dict[str, Any]:
    logger = get_run_logger()
    selected = run.params.selected()
    if "ingest" not in selected:
        run.content_hash = t.store_content_hash(run.params.store)
    for stage in selected:
        logger.info("stage %s: running", stage)
        progress.announce(stage, "running")
        record = STAGE_RUNNERS[stage](run)
        run.records[stage] = record
        logger.info("stage %s: %s (key %s)%s", stage, record.status, record.key[:12],
                    f": {record.reason}" if record.reason else "")
        progress.announce(stage, record.status, record.reason)
        renew_output_lock(run.params.output, run.run_id)
    promoted = t.read_json(run.url("promoted.json"))
    result = {"store_content_hash": run.content_hash,
              "stages": {name: r.to_dict() for name, r in run.records.items()},
              "lineage": build_lineage(run.content_hash, run.records, promoted), "promoted": promoted}
    t.write_json(run.url("pipeline.json"), result)
    create_markdown_artifact(key="pipeline", markdown=pipeline_markdown(result),
                             description="medpipe pipeline: stages, lineage from store to predictions")
    return result


# -- stages ------------------------------------------------------------------------------------------------------
def _skipped(entry: LedgerEntry, stage: str) -> StageRecord:
    refused = str(entry.summary.get("refused") or "")
    return StageRecord(stage, "refused" if refused else "skipped", entry.key, entry.outputs, entry.summary, refused)


def _ingest(run: PipelineRun) -> StageRecord:
    p = run.params
    cfg = p.ingest_config()
    assert p.source is not None  # PipelineParams requires it when ingest runs
    before = t.archive_tags(p.store)
    # the ingest flow runs on config["scheduler"] (else a LocalCluster of config["workers"]), decided at run time
    summary = ingest_flow(source=p.source, store=p.store, config=cfg.to_dict(), key_secret=p.key_secret)
    delta = ingest_delta(before, t.archive_tags(p.store))
    run.content_hash = str(summary["content_hash"])
    key = run.key("ingest")
    facts = {"accounting": summary.get("accounting"), "counts": summary.get("counts"), "samples": summary.get("samples"),
             "splits": summary.get("splits"), "noop": bool(summary.get("noop")), "new_units": delta.new,
             "reused_units": delta.reused, "removed_units": delta.removed, "content_hash": run.content_hash}
    t.record(p.output, "ingest", key, [p.store], facts)
    return StageRecord("ingest", "skipped" if summary.get("noop") else "ran", key, (p.store,), facts)


def _train(run: PipelineRun) -> StageRecord:
    return _train_stage(run, "train")


def _retrain(run: PipelineRun) -> StageRecord:
    augment = run.records.get("augment")
    if augment is not None and augment.status == "refused":
        return StageRecord("retrain", "refused", run.key("retrain"), reason=f"no synthetic set: {augment.reason}")
    return _train_stage(run, "retrain")


def _train_stage(run: PipelineRun, stage: str) -> StageRecord:
    """train / retrain: the train flow (retrain: with the synthetic set mixed in), published to models/<key>/;
    retrain also evaluates its model (reports/<key>/)."""
    key = run.key(stage)
    done = t.find_done(run.params.output, stage, key)
    if done is not None:
        return _skipped(done, stage)
    if stage == "retrain":
        missing = _synthetic_missing(run.params.store)
        if missing:
            return StageRecord(stage, "refused", key, reason=missing)
    section = run.params.config.train if stage == "train" else run.params.config.retrain
    local = run.work / "models" / key
    trained = train_flow(store=run.params.store, out_dir=str(local), config=section.to_dict(), overwrite=True)
    outputs = t.publish_dir(str(local), run.url("models", key))
    facts: dict[str, Any] = {"model": run.url("models", key, "best.pt"), "model_dir": run.url("models", key),
                             "sha256": t.checkpoint_sha256(str(local / "best.pt")),
                             "epochs": trained.get("epochs_completed"), "validation": trained.get("validation"),
                             "testing": trained.get("testing"), "test_metrics": trained.get("test_metrics")}
    published = [run.url("models", key)]
    if stage == "retrain":
        report = _evaluate_into(run, str(local), key)
        facts.update(report)
        published.append(run.url("reports", key))
    facts["files"] = len(outputs)
    t.record(run.params.output, stage, key, published, facts)
    return StageRecord(stage, "ran", key, tuple(published), facts)


def _synthetic_missing(store: str) -> str:
    """Why the store has no synthetic set made from its current content ("" when it has one)."""
    from medpipe.gan.synthetic import SyntheticSetError, check_synthetic_current

    try:
        check_synthetic_current(store)
    except SyntheticSetError as exc:
        return str(exc)
    return ""


def _evaluate_into(run: PipelineRun, model_dir: str, key: str) -> dict[str, Any]:
    """Evaluate a model (evaluate subflow) into reports/<key>/; returns the report's URLs and headline metrics."""
    cfg = run.params.config.evaluate
    local = run.work / "reports" / key
    result = evaluate_flow(store=run.params.store, model=model_dir, out_dir=str(local), split=cfg.split,
                           n_boot=cfg.n_boot, device=cfg.device)
    t.publish_dir(str(local), run.url("reports", key))
    return {"report": run.url("reports", key, Path(result["report"]).name),
            "metrics_json": run.url("reports", key, Path(result["metrics_json"]).name),
            "headline": headline_metrics(result["metrics"]), "split": cfg.split}


def _evaluate(run: PipelineRun) -> StageRecord:
    key = run.key("evaluate")
    done = t.find_done(run.params.output, "evaluate", key)
    if done is not None:
        return _skipped(done, "evaluate")
    model = _model(run, "train")
    if model is None:
        raise PipelineStageError("the evaluate stage needs the train stage's model for this store and config, and "
                                 "OUTPUT has none: run the train stage too")
    facts = {"model_key": model.key, **_evaluate_into(run, model.local_dir, key)}
    outputs = [run.url("reports", key)]
    t.record(run.params.output, "evaluate", key, outputs, facts)
    return StageRecord("evaluate", "ran", key, tuple(outputs), facts)


def _model(run: PipelineRun, stage: str) -> ModelRef | None:
    """The model of train/retrain: made by this run (in scratch), else published under its key (fetched)."""
    key = run.key(stage)
    record = run.records.get(stage)
    if record is not None and record.status == "ran":
        return ModelRef(stage, key, str(run.work / "models" / key), record.summary["model_dir"],
                        record.summary["sha256"])
    entry = t.find_done(run.params.output, stage, key)
    if entry is None or entry.summary.get("refused") or not entry.summary.get("model_dir"):
        return None
    local = t.fetch_dir(entry.summary["model_dir"], str(run.work / "fetched" / key))
    return ModelRef(stage, key, local, entry.summary["model_dir"], entry.summary["sha256"])


def _augment(run: PipelineRun) -> StageRecord:
    from medpipe.cli import unwrap
    from medpipe.gan.augment import MemorisationGateError

    key = run.key("augment")
    done = t.find_done(run.params.output, "augment", key)
    if done is not None:
        return _skipped(done, "augment")
    local = run.work / "augment" / key
    synthetic = join_url(run.params.store, "synthetic", "zarr.json")
    try:
        result = gan_augment_flow(store=run.params.store, out_dir=str(local),
                                  config=run.params.config.augment.to_dict())
    except Exception as exc:  # noqa: BLE001 - the gate's refusal is an outcome; everything else is re-raised
        gate = unwrap(exc)
        if not isinstance(gate, MemorisationGateError):
            raise
        t.publish_dir(str(local), run.url("reports", key), CHECKPOINT_SUFFIXES)
        facts = {"published": False, "refused": str(gate), "report": run.url("reports", key, "augment_report.json")}
        t.record(run.params.output, "augment", key, [run.url("reports", key)], facts)
        return StageRecord("augment", "refused", key, (run.url("reports", key),), facts, str(gate))
    t.publish_dir(str(local), run.url("reports", key), CHECKPOINT_SUFFIXES)
    facts = {"published": True, "n_samples": result["n_samples"], "synthetic": synthetic,
             "report": run.url("reports", key, "augment_report.json"),
             "frechet_distance": result["frechet_distance"].get("fake")}
    outputs = [run.url("reports", key), synthetic]
    t.record(run.params.output, "augment", key, outputs, facts)
    return StageRecord("augment", "ran", key, tuple(outputs), facts)


def _promote(run: PipelineRun) -> StageRecord:
    """Compare train/retrain models with the promoted one (medpipe.promotion); promote the best not worse."""
    cfg = run.params.config.promote
    candidates = [m for m in (_model(run, s) for s in ("train", "retrain")) if m is not None]
    current = t.read_json(run.url("promoted.json")) or {}
    among = next((c for c in candidates if c.key == current.get("key")), None)  # a candidate is the promoted one
    outside = current.get("key") if current and among is None else None  # the promoted model is another one
    key = stage_key("promote", run.content_hash, lineage_config("promote", run.params),
                    {c.stage: c.key for c in candidates}, extra={"current": outside})
    if not candidates:
        return StageRecord("promote", "refused", key, reason="no trained model for this store and config: run train")
    done = t.find_done(run.params.output, "promote", key)
    if done is not None:
        return _skipped(done, "promote")
    local = run.work / "promote" / key
    current_dir = (among.local_dir if among is not None else
                   t.fetch_dir(current["model_dir"], str(run.work / "fetched" / str(outside))) if outside else None)

    def compare(candidate: ModelRef, against: str | None, name: str) -> dict[str, Any]:
        return t.compare_models(run.params.store, candidate.local_dir, against, str(local / name), cfg.split,
                                cfg.tolerance, cfg.n_boot, cfg.device)

    decisions = [(c, "promoted model" if current_dir else "nothing promoted", compare(c, current_dir, c.stage))
                 for c in candidates if c is not among]
    passing = [c for c, _, d in decisions if d["promote"]]
    winner = passing[0] if passing else None
    if len(passing) == 2:  # both beat the promoted model: the better of the two, as compare_models decides
        retrain, train = passing[1], passing[0]
        head_to_head = compare(retrain, train.local_dir, "retrain-vs-train")
        decisions.append((retrain, "train model", head_to_head))
        winner = retrain if head_to_head["promote"] else train
    markdown = "\n\n".join(f"## {c.stage} model vs {against}\n\n{d['markdown']}" for c, against, d in decisions)
    markdown = markdown or "the promoted model is already the best candidate: nothing to compare"
    local.mkdir(parents=True, exist_ok=True)
    (local / "promotion.md").write_text(markdown + "\n")
    create_markdown_artifact(key="promotion", markdown=markdown, description="medpipe promotion: candidate vs current")
    outputs = [run.url("reports", key)]
    t.publish_dir(str(local), run.url("reports", key))
    promoted = None
    if winner is not None:
        decision = next(d for c, _, d in decisions if c is winner)
        promoted = {"model": join_url(winner.url, "best.pt"), "model_dir": winner.url, "key": winner.key,
                    "stage": winner.stage, "sha256": winner.sha256, "store_content_hash": run.content_hash,
                    "metric": {"name": decision.get("metric"), "value": decision.get("candidate_score"),
                               "split": decision.get("split"), "n": decision.get("n"),
                               "evaluation": _headline_of(run, winner.stage)},
                    "decided_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        outputs.append(t.write_json(run.url("promoted.json"), promoted))
    facts = {"promoted": promoted, "report": run.url("reports", key, "promotion.md"),
             "reason": "; ".join(f"{c.stage}: {d['reason']}" for c, _, d in decisions),
             "decisions": [{"candidate": c.stage, "against": a, "promote": d["promote"], "reason": d["reason"]}
                           for c, a, d in decisions]}
    t.record(run.params.output, "promote", key, outputs, facts)
    return StageRecord("promote", "ran", key, tuple(outputs), facts)


def _headline_of(run: PipelineRun, stage: str) -> dict[str, Any] | None:
    """The evaluated headline metrics of a train/retrain model (evaluate's report, or retrain's own)."""
    report = run.records.get("evaluate" if stage == "train" else "retrain")
    return report.summary.get("headline") if report is not None else None


def _predict(run: PipelineRun) -> StageRecord:
    """The promoted model (else the freshly trained one) on `predict_source`, into predictions/<key>/."""
    p = run.params
    model = _promoted_model(run) or _model(run, "train") or _model(run, "retrain")
    if model is None:
        raise PipelineStageError("the predict stage needs a promoted model (OUTPUT/promoted.json) or one trained "
                                 "with this run's train config on this store, and OUTPUT has neither: run the "
                                 "train and promote stages first (weekly-retrain or on-demand)")
    assert p.predict_source is not None  # PipelineParams requires it when predict runs
    key = stage_key("predict", run.content_hash, lineage_config("predict", p), {"model": model.key},
                    extra={"source": t.listing_fingerprint(p.predict_source)})
    done = t.find_done(p.output, "predict", key)
    if done is not None:
        return _skipped(done, "predict")
    local = run.work / "predictions" / key
    earlier = t.latest_with(p.output, "predict", "model_key", model.key)
    if earlier is not None:  # continue from this model's last predictions: only new studies are predicted
        t.fetch_dir(earlier.summary["predictions"], str(local))
    result = t.predict_new_studies(p.predict_source, model.local_dir, str(local), p.store, p.key_secret,
                                   p.config.predict.device)
    t.publish_dir(str(local), run.url("predictions", key))
    counts = result.get("counts") or {}
    facts = {"model_key": model.key, "model_sha256": model.sha256, "model_stage": model.stage,
             "predictions": run.url("predictions", key), "new": counts.get("new"),
             "cases": counts.get("predicted_total", len(result.get("cases") or []))}
    outputs = [run.url("predictions", key)]
    t.record(p.output, "predict", key, outputs, facts)
    return StageRecord("predict", "ran", key, tuple(outputs), facts)


def _promoted_model(run: PipelineRun) -> ModelRef | None:
    current = t.read_json(run.url("promoted.json"))
    if not current:
        return None
    for stage in ("train", "retrain"):
        record = run.records.get(stage)
        if record is not None and record.status == "ran" and record.key == current["key"]:
            return ModelRef(stage, record.key, str(run.work / "models" / record.key), current["model_dir"],
                            current["sha256"])
    local = t.fetch_dir(current["model_dir"], str(run.work / "fetched" / current["key"]))
    return ModelRef(str(current.get("stage", "promoted")), current["key"], local, current["model_dir"],
                    current["sha256"])


STAGE_RUNNERS: dict[str, Callable[[PipelineRun], StageRecord]] = {
    "ingest": _ingest, "train": _train, "evaluate": _evaluate, "augment": _augment, "retrain": _retrain,
    "promote": _promote, "predict": _predict}


def flow_parameters(params: PipelineParams) -> dict[str, Any]:
    """The flow's keyword arguments for validated parameters (plain JSON: what a deployment stores)."""
    return params.model_dump(mode="json")


def run_pipeline(params: PipelineParams) -> dict[str, Any]:
    """Run the pipeline flow on Prefect's embedded server (or the configured API); refuses at once, in one line,
    when another run holds OUTPUT's lock."""
    check_output_unlocked(params.output)
    with shared_api_server():
        return pipeline_flow(**flow_parameters(params))


if __name__ == "__main__":
    import sys

    from medpipe.pipeline.params import load_params

    print(run_pipeline(load_params(sys.argv[1]))["stages"])
