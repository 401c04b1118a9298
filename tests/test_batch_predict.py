"""Batch prediction of new studies with a classifier: pseudonymous CSV, probabilities, incremental reruns."""

from __future__ import annotations

import csv
import json
import shutil
import warnings

import numpy as np
import pytest

from medpipe.batch_predict import BatchPredictError, classifier_ingest_config, predict_new_studies
from medpipe.demo import DemoSpec, generate_demo_dataset
from medpipe.errors import UserError
from medpipe.training.checkpoints import load_checkpoint, save_checkpoint
from medpipe.training.config import TrainConfig
from medpipe.task import Task
from medpipe.training.engine import train
from medpipe.training.models import build_model
from training_store import make_2d_store, make_3d_store

SPEC = {"studies_per_patient": 1, "xray_per_study": 2, "png_per_study": 1, "ct_series_per_study": 0,
        "image_size": 32}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A small 2D classifier (32 x 32, classes none / lesion) trained one epoch on a synthetic store."""
    root = tmp_path_factory.mktemp("classifier")
    store = make_2d_store(str(root / "store.zarr"), n=48, size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(store, root / "run", TrainConfig(epochs=1, batch_size=16, early_stopping_patience=0, device="cpu"),
              progress=False)
    return str(root / "run")


@pytest.fixture()
def one_dask_cluster(monkeypatch):
    """One in-process Dask cluster on 127.0.0.1 for every ingest of a test (no LocalCluster start per run)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        monkeypatch.setenv("MEDPIPE_DASK_SCHEDULER", cluster.scheduler_address)
        yield cluster


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_new_studies_are_classified_once_with_pseudonyms_only(prefect_api, deid_key, classifier, one_dask_cluster,
                                                              tmp_path):
    source = tmp_path / "source"
    first = generate_demo_dataset(source, DemoSpec(patients=2, seed=3, **SPEC))
    out = tmp_path / "out"
    summary = predict_new_studies(str(source), classifier, str(out), device="cpu")
    rows = _rows(out / "predictions.csv")
    n_first = 2 * (SPEC["xray_per_study"] + SPEC["png_per_study"])
    assert summary["counts"]["new"] == len(rows) == n_first and summary["counts"]["already_predicted"] == 0
    probs = np.array([[float(r["p_none"]), float(r["p_lesion"])] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [r["predicted"] for r in rows] == [("none", "lesion")[int(np.argmax(p))] for p in probs]
    assert len({r["unit"] for r in rows}) == n_first
    assert sum(summary["predicted_classes"].values()) == n_first
    assert summary["model"]["checkpoint_sha256"] and summary["store_content_hash"]
    assert summary["ingest"]["accounting"].startswith(f"discovered {n_first} ")

    # the source gains the studies of two more patients
    more = generate_demo_dataset(tmp_path / "more", DemoSpec(patients=2, seed=11, **SPEC))
    for kind in ("xray", "png"):
        shutil.copytree(tmp_path / "more" / kind, source / "arrived" / kind)
    again = predict_new_studies(str(source), classifier, str(out), device="cpu")
    rows2 = _rows(out / "predictions.csv")
    assert again["counts"]["new"] == n_first and again["counts"]["already_predicted"] == n_first
    assert rows2[:n_first] == rows  # earlier predictions kept as they were, new ones appended
    assert len({r["unit"] for r in rows2}) == len(rows2) == 2 * n_first

    written = (out / "predictions.csv").read_text() + (out / "predictions.json").read_text()
    for summary_ in (first, more):
        for values in summary_.phi.values():
            for value in values:
                assert value not in written
                for part in value.replace("^", "_").split("_"):
                    assert len(part) < 4 or part not in written  # no name or ID fragment either
    assert str(source) not in written and "DOE" not in written
    assert json.loads((out / "predictions.json").read_text())["counts"]["predicted_total"] == 2 * n_first


def test_ingest_config_follows_the_training_store(classifier):
    meta = load_checkpoint(f"{classifier}/best.pt")
    config, notes = classifier_ingest_config(meta)
    assert config.preprocess.kind == "2d" and list(config.preprocess.shape) == [32, 32]
    assert config.classes == ["none", "lesion"] and notes
    attrs = {"content_hash": meta["store_content_hash"], "config": {
        "preprocess": {"kind": "2d", "shape": [64, 64], "fit": "crop_or_pad"}, "nifti_modality": "CT",
        "manifest": "old.csv", "classes": ["x", "y"]},
        "fingerprint": {"modalities": {"CT": {"intensity": {"mean": 1.0}}}}}
    config, notes = classifier_ingest_config(meta, attrs)
    assert config.preprocess.fit == "crop_or_pad" and list(config.preprocess.shape) == [32, 32]
    assert config.preprocess.normalization == {"CT": {"mean": 1.0}} and config.nifti_modality == "CT"
    assert config.manifest is None and config.classes == ["none", "lesion"] and not notes
    with pytest.raises(BatchPredictError, match="is not the one the model was trained on"):
        classifier_ingest_config(meta, {**attrs, "content_hash": "other"})


def test_bad_inputs_are_one_line_errors(classifier, tmp_path):
    source = tmp_path / "empty-source"
    source.mkdir()
    with pytest.raises(UserError) as no_model:
        predict_new_studies(str(source), str(tmp_path / "no-run"), str(tmp_path / "out"))
    seg_store = make_3d_store(str(tmp_path / "seg.zarr"), n=8, shape=(8, 16, 16))
    payload = load_checkpoint(f"{classifier}/best.pt")
    unet = build_model("small-unet", Task.segment, 2, 1, 2)
    save_checkpoint(tmp_path / "seg" / "best.pt", {**payload, "task": "segment", "model_name": "small-unet",
                                                    "model": unet.state_dict()})
    with pytest.raises(BatchPredictError, match="segmentation model") as other_kind:
        predict_new_studies(str(source), str(tmp_path / "seg"), str(tmp_path / "out"))
    with pytest.raises(BatchPredictError, match="not the one") as wrong_store:
        predict_new_studies(str(source), classifier, str(tmp_path / "out"), store=seg_store)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "predictions.csv").write_text("unit\n")
    (tmp_path / "taken" / "predictions.json").write_text(json.dumps({"model": {"checkpoint_sha256": "x"}}))
    with pytest.raises(BatchPredictError, match="another model") as taken:
        predict_new_studies(str(source), classifier, str(tmp_path / "taken"))
    for exc in (no_model, other_kind, wrong_store, taken):
        assert "\n" not in str(exc.value)
