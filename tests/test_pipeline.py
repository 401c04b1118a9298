"""The pipeline flow (flows/pipeline.py): parameters, stage keys, ledger, an end-to-end ingest+train+evaluate run
through the Prefect API, skipping unchanged stages, the OUTPUT lock, and incremental ingest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medpipe.pipeline.params import PipelineParams, PipelineParamsError, load_params, validate_params

TINY = dict(studies_per_patient=1, xray_per_study=2, png_per_study=2, ct_series_per_study=0, image_size=32)
CONFIG = {"ingest": {"preprocess": {"kind": "2d", "shape": [32, 32]}, "classes": ["none", "lesion"]},
          "train": {"epochs": 1, "batch_size": 8, "model": "small-cnn", "device": "cpu"},
          "evaluate": {"n_boot": 20, "device": "cpu"}}


def _make_source(root: Path, patients: int, seed: int) -> Path:
    from medpipe.demo import DemoSpec, generate_demo_dataset

    generate_demo_dataset(root, DemoSpec(patients=patients, seed=seed, **TINY))
    return root


def _params(source: Path, store: Path, output: Path, **extra: object) -> PipelineParams:
    data = {"source": str(source), "store": str(store), "output": str(output), "stages": ["ingest", "train", "evaluate"],
            "config": CONFIG, "workers": 1, **extra}
    return validate_params(data)


# -- parameters ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, expect", [
    ({"config": {"train": {"epochs": 0}}}, "config.train.epochs: must be >= 1"),
    ({"stages": ["ingest", "tran"]}, "unknown stage(s) 'tran'"),
    ({"stages": []}, "give at least one stage"),
    ({"source": None}, "the ingest stage needs `source`"),
    ({"stages": ["train", "predict"]}, "the predict stage needs `predict_source`"),
    ({"scheduler": "localhost:8786"}, "scheduler: must be a Dask scheduler address"),
    ({"workers": 0}, "workers: must be >= 1"),
    ({"config": {"evaluate": {"split": "holdout"}}}, "config.evaluate.split"),
    ({"config": {"retrain": {"synthetic_ratio": 0}}}, "synthetic_ratio must be > 0"),
    ({"config": {"ingest": {"preprocess": {"shape": [2, 2]}}}}, "config.ingest.preprocess"),
    ({"config": {"trian": {}}}, "config.trian: unknown field"),
    ({"output": "STORE"}, "`output` must be another place than `store`"),
])
def test_bad_parameters_are_one_line_errors(tmp_path, change, expect):
    data = {"source": str(tmp_path / "src"), "store": str(tmp_path / "s.zarr"), "output": str(tmp_path / "out"),
            "stages": ["ingest", "train"]}
    data.update(change)
    if data["output"] == "STORE":
        data["output"] = str(tmp_path / "s.zarr") + "/"
    with pytest.raises(PipelineParamsError) as err:
        validate_params(data)
    message = str(err.value)
    assert expect in message and "\n" not in message and message.startswith("invalid pipeline parameters: ")


def test_parameters_defaults_and_order(tmp_path):
    params = validate_params({"store": "s3://bucket/s.zarr", "output": "s3://bucket/out", "stages": ["evaluate", "train"],
                              "config": {"train": {"epochs": 3}, "retrain": {"lr": 0.01}}})
    assert params.selected() == ("train", "evaluate")  # pipeline order, whatever the order given
    assert params.config.retrain.epochs == 3 and params.config.retrain.lr == 0.01  # retrain = train + overrides
    assert params.config.retrain.synthetic_ratio == 1.0
    assert validate_params(params.model_dump(mode="json")) == params  # what a deployment stores round-trips


def test_example_config_loads_and_bad_files_are_one_line(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "pipeline.yaml"
    params = load_params(example)
    assert params.source and params.config.ingest.preprocess.kind == "2d"
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: [unclosed\n")
    for path, expect in ((bad, "not valid YAML"), (tmp_path / "missing.yaml", "not found")):
        with pytest.raises(PipelineParamsError, match=expect) as err:
            load_params(path)
        assert "\n" not in str(err.value)


# -- stage keys and ledger -----------------------------------------------------------------------------------------
def _keys(params: PipelineParams, content_hash: str = "c" * 64) -> dict[str, str]:
    from medpipe.pipeline.keys import DEPENDS_ON, lineage_config, stage_key

    keys: dict[str, str] = {}
    for stage in ("ingest", "train", "evaluate", "augment", "retrain"):
        keys[stage] = stage_key(stage, content_hash, lineage_config(stage, params),
                                {d: keys[d] for d in DEPENDS_ON[stage]})
    return keys


def test_stage_keys_follow_inputs_not_identity(tmp_path):
    base = _params(tmp_path / "src", tmp_path / "s.zarr", tmp_path / "out")
    same = _params(tmp_path / "src", tmp_path / "s.zarr", tmp_path / "out")
    assert base is not same and _keys(base) == _keys(same)
    assert all(len(k) == 64 for k in _keys(base).values())
    # runtime settings are not lineage: workers, scheduler, device, scratch folder
    runtime = _params(tmp_path / "src", tmp_path / "s.zarr", tmp_path / "out", workers=4,
                      scheduler="tcp://127.0.0.1:8786",
                      config={**CONFIG, "work_dir": str(tmp_path / "w"), "train": {**CONFIG["train"], "device": "auto"}})
    assert _keys(runtime) == _keys(base)
    # a train config change re-keys train, evaluate (depends on it) and retrain (train's fields), not ingest/augment
    changed = _keys(_params(tmp_path / "src", tmp_path / "s.zarr", tmp_path / "out",
                            config={**CONFIG, "train": {**CONFIG["train"], "lr": 0.01}}))
    before = _keys(base)
    assert {s for s in before if before[s] != changed[s]} == {"train", "evaluate", "retrain"}
    # new data (content hash) re-keys every stage
    moved = _keys(base, "d" * 64)
    assert all(moved[s] != before[s] for s in before)


def test_ledger_skips_only_when_outputs_exist(tmp_path):
    from medpipe.pipeline.ledger import find_done, record

    out = str(tmp_path / "out")
    made = tmp_path / "out" / "models" / "k1"
    made.mkdir(parents=True)
    record(out, "train", "k1", [str(made)], {"sha256": "x"})
    record(out, "train", "k2", [str(tmp_path / "out" / "models" / "k2")], {})
    entry = find_done(out, "train", "k1")
    assert entry is not None and entry.summary == {"sha256": "x"} and entry.outputs == (str(made),)
    assert find_done(out, "train", "k2") is None  # listed, but its output is gone: run again
    assert find_done(out, "train", "k3") is None
    shutil.rmtree(made)
    assert find_done(out, "train", "k1") is None


def test_ingest_delta_counts_new_and_reused_units():
    from medpipe.pipeline.incremental import ingest_delta

    delta = ingest_delta({"a": "t1", "b": "t2", "c": "t3"}, {"a": "t1", "b": "t2-new", "d": "t4"})
    assert (delta.new, delta.reused, delta.removed) == (2, 1, 1)


# -- the flow ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scheduler():
    """One small Dask cluster on loopback for every ingest of this module (the `scheduler` parameter), instead of
    a LocalCluster started by each run."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def pipeline_runs(prefect_api, deid_key_module, scheduler, tmp_path_factory):
    """Two runs of ingest+train+evaluate over an unchanged source (the second skips), then train+evaluate alone
    after a train config change (the content hash read from the store)."""
    from flows.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    source = _make_source(root / "src", patients=6, seed=11)
    params = _params(source, root / "store.zarr", root / "out", scheduler=scheduler)
    first = run_pipeline(params)
    first["written"] = json.loads((root / "out" / "pipeline.json").read_text())  # before later runs rewrite it
    second = run_pipeline(params)
    changed = run_pipeline(_params(source, root / "store.zarr", root / "out", stages=["train", "evaluate"],
                                   config={**CONFIG, "train": {**CONFIG["train"], "seed": 1}}))
    return root, first, second, changed


def test_pipeline_runs_stages_and_publishes(pipeline_runs):
    from medpipe.store import store_attrs
    from medpipe.training.checkpoints import file_sha256

    root, first, _, _ = pipeline_runs
    assert {s: e["status"] for s, e in first["stages"].items()} == {"ingest": "ran", "train": "ran",
                                                                     "evaluate": "ran"}
    assert first["store_content_hash"] == store_attrs(str(root / "store.zarr"))["content_hash"]
    for entry in first["stages"].values():
        assert entry["outputs"] and all(Path(url).exists() for url in entry["outputs"])
    train, evaluate = first["stages"]["train"], first["stages"]["evaluate"]
    model = Path(train["summary"]["model"])
    assert model == root / "out" / "models" / train["key"] / "best.pt"
    assert file_sha256(model) == train["summary"]["sha256"] == first["lineage"]["checkpoints"]["train"]["sha256"]
    assert Path(evaluate["summary"]["report"]) == root / "out" / "reports" / evaluate["key"] / "report.html"
    assert evaluate["summary"]["model_key"] == train["key"]
    headline = evaluate["summary"]["headline"]
    assert {"accuracy", "auroc"} <= set(headline) and headline["accuracy"]["low"] <= headline["accuracy"]["value"]
    ingest = first["stages"]["ingest"]["summary"]
    assert ingest["new_units"] == 6 * 4 and ingest["reused_units"] == 0
    written = first["written"]
    assert written["stages"] == first["stages"] and written["promoted"] is None
    assert written["lineage"] == first["lineage"]
    assert not (root / "out" / "medpipe.lock").exists()  # released


def test_second_run_skips_unchanged_stages(pipeline_runs):
    _, first, second, changed = pipeline_runs
    assert {s: e["status"] for s, e in second["stages"].items()} == {"ingest": "skipped", "train": "skipped",
                                                                      "evaluate": "skipped"}
    assert {s: e["key"] for s, e in second["stages"].items()} == {s: e["key"] for s, e in first["stages"].items()}
    assert second["stages"]["ingest"]["summary"]["new_units"] == 0
    assert second["lineage"]["checkpoints"] == first["lineage"]["checkpoints"]
    # a train config change: train and evaluate run again under new keys
    assert {s: e["status"] for s, e in changed["stages"].items()} == {"train": "ran", "evaluate": "ran"}
    assert changed["store_content_hash"] == first["store_content_hash"]
    assert changed["stages"]["train"]["key"] != first["stages"]["train"]["key"]
    assert changed["stages"]["evaluate"]["summary"]["model_key"] == changed["stages"]["train"]["key"]


def test_summary_and_markdown_name_reports(pipeline_runs):
    from medpipe.pipeline.summary import pipeline_markdown, summary_rows

    _, first, _, _ = pipeline_runs
    rows = dict((stage, detail) for stage, _, detail in summary_rows(first))
    assert first["stages"]["evaluate"]["summary"]["report"] in rows["evaluate"] and "accuracy" in rows["evaluate"]
    markdown = pipeline_markdown(first)
    assert first["store_content_hash"] in markdown and first["stages"]["train"]["summary"]["sha256"] in markdown


def test_promote_then_predict_with_the_promoted_model(pipeline_runs, scheduler, tmp_path, monkeypatch):
    from flows.pipeline import run_pipeline

    root, first, _, _ = pipeline_runs
    monkeypatch.setenv("MEDPIPE_DASK_SCHEDULER", scheduler)  # the prediction's own ingest uses the module's cluster
    new_studies = _make_source(tmp_path / "new", patients=2, seed=31)
    params = _params(root / "src", root / "store.zarr", root / "out", stages=["promote", "predict"],
                     predict_source=str(new_studies), config={**CONFIG, "promote": {"n_boot": 20, "device": "cpu"}})
    result = run_pipeline(params)
    promote, predict = result["stages"]["promote"], result["stages"]["predict"]
    assert promote["status"] == "ran" and predict["status"] == "ran"
    promoted = json.loads((root / "out" / "promoted.json").read_text())
    train = first["stages"]["train"]
    assert promoted["key"] == train["key"] and promoted["sha256"] == train["summary"]["sha256"]
    assert promoted["store_content_hash"] == first["store_content_hash"] and result["promoted"] == promoted
    assert (Path(promote["summary"]["report"])).read_text().startswith("## train model vs nothing promoted")
    assert predict["summary"]["model_key"] == train["key"] and predict["summary"]["cases"] == 2 * 4
    assert (Path(predict["summary"]["predictions"]) / "predictions.csv").exists()
    assert result["lineage"]["predictions"]["model_sha256"] == train["summary"]["sha256"]
    again = run_pipeline(params)["stages"]
    assert again["promote"]["status"] == "skipped" and again["predict"]["status"] == "skipped"


def test_cli_runs_pipeline_and_prints_summary(pipeline_runs, scheduler, tmp_path):
    from typer.testing import CliRunner

    from medpipe.cli import app

    root, first, _, _ = pipeline_runs
    config = tmp_path / "pipeline.yaml"
    config.write_text(json.dumps({"source": str(root / "src"), "store": str(root / "store.zarr"),
                                  "output": str(root / "out"), "stages": ["ingest", "train", "evaluate"],
                                  "config": CONFIG, "scheduler": scheduler}))  # JSON is YAML
    result = CliRunner().invoke(app, ["run-pipeline", str(config)])
    assert result.exit_code == 0, result.output
    for text in ("ingest", "skipped", "evaluate", "accuracy", "pipeline.json", first["store_content_hash"]):
        assert text in result.output
    config.write_text("store: s.zarr\noutput: out\nstages: [train]\nconfig: {train: {epochs: 0}}\n")
    result = CliRunner().invoke(app, ["run-pipeline", str(config)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: invalid pipeline parameters: config.train.epochs: must be >= 1; config.retrain.epochs: must be >= 1"]


def test_second_pipeline_on_same_output_is_refused(prefect_api, tmp_path):
    from flows.pipeline import pipeline_flow, run_pipeline
    from medpipe.ingest.lock import acquire_lock, new_run_id, release_lock
    from medpipe.pipeline.lock import PipelineLockedError

    params = validate_params({"store": str(tmp_path / "s.zarr"), "output": str(tmp_path / "out"),
                              "stages": ["train"]})
    holder = new_run_id()
    acquire_lock(str(tmp_path / "out"), holder)  # another live run (this process) holds OUTPUT
    try:
        with pytest.raises(PipelineLockedError, match="another pipeline run is writing") as err:
            run_pipeline(params)  # refused before Prefect starts anything
        assert "\n" not in str(err.value)
        with pytest.raises(PipelineLockedError):
            pipeline_flow(**params.model_dump(mode="json"))  # the flow itself (a deployment's run) refuses too
    finally:
        release_lock(str(tmp_path / "out"), holder)


def test_incremental_ingest_archives_only_new_studies(prefect_api, deid_key_module, scheduler, tmp_path):
    from flows.pipeline import run_pipeline
    from medpipe.store import read_sample_table

    source = _make_source(tmp_path / "src", patients=4, seed=21)
    extra = _make_source(tmp_path / "extra", patients=2, seed=22)
    store, out = tmp_path / "store.zarr", tmp_path / "out"
    params = _params(source, store, out, stages=["ingest"], scheduler=scheduler)
    first = run_pipeline(params)["stages"]["ingest"]["summary"]
    assert first["new_units"] == 4 * 4
    before = read_sample_table(str(store))
    splits_before = dict(zip(before["patient"].tolist(), before["split"].tolist()))

    for kind in ("xray", "png"):  # the source gains two patients' studies
        for patient in (extra / kind).iterdir():
            shutil.copytree(patient, source / kind / patient.name)
    rows = (extra / "labels.csv").read_text().splitlines()[1:]
    with (source / "labels.csv").open("a") as manifest:
        manifest.write("\n".join(rows) + "\n")

    again = run_pipeline(params)["stages"]["ingest"]
    assert again["status"] == "ran"
    assert again["summary"]["new_units"] == 2 * 4  # only the added studies were archived
    assert again["summary"]["reused_units"] == 4 * 4
    after = read_sample_table(str(store))
    splits_after = dict(zip(after["patient"].tolist(), after["split"].tolist()))
    assert len(splits_after) == 6
    assert {p: splits_after[p] for p in splits_before} == splits_before  # nobody moved
    assert np.isin(before["unit"], after["unit"]).all()
