"""`medpipe predict`: a volumes store or a folder of NIfTI volumes -> one NIfTI per case on its source grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.ingest.records import ArchiveRecord
from medpipe.predict import ingest_config_for, load_volume_model, split_cases
from medpipe.store import open_store, read_archive_image, read_sample_table, store_attrs
from medpipe.volumes import ras_affine
from test_volume_eval import save_volume_checkpoint  # tests/ is on sys.path (no package)

runner = CliRunner()
SECRET_NAME = "Doe_Jane_19700101"  # a file name that must never reach an output


@pytest.fixture(scope="module")
def run_dir(volume_store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("predict-run")
    save_volume_checkpoint(volume_store[0], run / "best.pt")
    return run


def _errors_in_one_line(result) -> list[str]:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines


def test_predict_a_store_writes_each_case_on_its_source_grid(volume_store, run_dir, tmp_path):
    store, out = volume_store[0], tmp_path / "out"
    result = runner.invoke(app, ["predict", str(store), str(run_dir), str(out), "--device", "cpu", "--split", "test"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "predictions.json").read_text())
    table = read_sample_table(str(store))
    assert len(summary["cases"]) == int((np.asarray(table["split"]) == 2).sum()) == 2
    assert len(split_cases(table, None)) == int((np.asarray(table["split"]) >= 0).sum())  # the default: every case
    assert summary["warnings"] == [] and "WARNING" not in result.output  # the checkpoint's own store
    root = open_store(str(store))
    for entry in summary["cases"]:
        assert entry["file"] == f"{entry['unit']}.nii.gz" and entry["patient"].startswith("P-")
        image = nib.load(str(out / entry["file"]))
        pixels, _, attrs = read_archive_image(root, entry["unit"])
        assert image.shape == tuple(reversed(pixels.shape[1:])) and entry["source_shape"] == list(pixels.shape[1:])
        record = ArchiveRecord.from_attrs(attrs)
        np.testing.assert_allclose(image.affine, ras_affine(record.affine, "RAS", record.spacing)[0], atol=1e-5)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(e["file"] for e in summary["cases"])


def _nifti_volumes(folder: Path) -> dict[tuple[int, ...], np.ndarray]:
    """Two MR-like volumes with non-RAS affines (LPS; axes permuted and flipped) -> {shape: affine}."""
    rng = np.random.default_rng(0)
    lps = np.diag([-1.0, -1.0, 3.0, 1.0])
    lps[:3, 3] = [20.0, 18.0, -15.0]
    permuted = np.array([[0.0, 0.0, -1.1, 24.0], [0.0, 1.0, 0.0, -15.0], [2.0, 0.0, 0.0, -10.0], [0, 0, 0, 1]])
    volumes = {}
    for name, shape, affine in ((f"{SECRET_NAME}.nii.gz", (40, 36, 10), lps), ("b/scan.nii.gz", (12, 30, 44), permuted)):
        data = rng.normal(100, 10, shape).astype(np.int16)
        centre = np.array(shape) // 2
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
        data[((grid - centre[:, None, None, None]) ** 2).sum(axis=0) < 16] += 200  # a bright blob
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(path))
        volumes[shape] = affine
    return volumes


def test_predict_a_nifti_folder_ingests_with_the_checkpoint_preprocessing(prefect_api, deid_key, run_dir, tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    volumes = _nifti_volumes(source)
    result = runner.invoke(app, ["predict", str(source), str(run_dir), str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    # the model was trained on CT (and an XA cine, not a NIfTI modality): the NIfTI files are read as CT, normalised
    # with the training store's statistics, and nothing differs from the training preparation
    assert "WARNING" not in result.output
    assert {str(m) for m in read_sample_table(str(out / "store.zarr"))["modality"]} == {"CT"}
    summary = json.loads((out / "predictions.json").read_text())
    assert len(summary["cases"]) == 2 and summary["store"] == "store.zarr"
    for entry in summary["cases"]:
        image = nib.load(str(out / entry["file"]))
        assert image.shape in volumes  # the input's shape (X, Y, Z)
        np.testing.assert_allclose(image.affine, volumes[image.shape], atol=1e-5)
        assert entry["source_shape"] == list(reversed(image.shape))
    attrs = store_attrs(str(out / "store.zarr"))
    meta = load_volume_model(run_dir, "cpu").meta
    assert attrs["training_spacing"] == meta["training_spacing"] and attrs["normalization"] == meta["normalization"]
    assert attrs["plan"]["patch_size"] == meta["plan"]["patch_size"]
    written = (out / "predictions.json").read_text() + " ".join(p.name for p in out.iterdir())
    assert SECRET_NAME not in written and str(source) not in written


def test_ingest_config_follows_the_checkpoint(run_dir):
    meta = load_volume_model(run_dir, "cpu").meta
    ct_only = {**meta, "normalization": {"CT": meta["normalization"]["CT"]}}
    assert ingest_config_for(ct_only).nifti_modality == "CT"  # new NIfTI studies are normalised as the CT was
    assert ingest_config_for({**meta, "normalization": {"CT": None, "MR": None}}).nifti_modality == "MR"  # ambiguous
    config = ingest_config_for(meta).preprocess
    assert config.effective_layout() == "volumes" and config.kind == "3d" and config.channels == 1
    assert list(config.target_spacing or ()) == list(meta["training_spacing"])
    assert config.normalization == meta["normalization"]
    assert config.plan["patch_size"] == meta["plan"]["patch_size"] and config.plan["strides"] == meta["plan"]["strides"]


def test_bad_inputs_fail_in_one_line(volume_store, run_dir, tmp_path, monkeypatch):
    lines = _errors_in_one_line(runner.invoke(app, ["predict", str(volume_store[0]), str(tmp_path / "nope"),
                                                    str(tmp_path / "out")]))
    assert "no checkpoint" in lines[0]
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    _errors_in_one_line(runner.invoke(app, ["predict", str(volume_store[0]), str(tmp_path / "garbage.pt"),
                                            str(tmp_path / "out")]))
    monkeypatch.delenv("MEDPIPE_DEID_KEY", raising=False)
    (tmp_path / "folder").mkdir()
    lines = _errors_in_one_line(runner.invoke(app, ["predict", str(tmp_path / "folder"), str(run_dir),
                                                    str(tmp_path / "out")]))
    assert "MEDPIPE_DEID_KEY" in lines[0]


def test_a_store_prepared_otherwise_is_named_in_warnings():
    from medpipe.predict import preprocessing_warnings

    meta = {"store_content_hash": "a" * 64, "training_spacing": [2.5, 0.8, 0.8], "normalization": {"CT": {"mean": 1}}}
    alike = {"content_hash": "b" * 64, "training_spacing": [2.5, 0.8, 0.8], "normalization": {"CT": {"mean": 1}}}
    assert preprocessing_warnings(alike, meta, ["CT"], same_store=False) == []
    other = {"content_hash": "b" * 64, "training_spacing": [1.0, 1.0, 1.0], "normalization": {"MR": None}}
    notes = " ".join(preprocessing_warnings(other, meta, ["MR"], same_store=True))
    assert "another store" in notes and "spacing" in notes and "modality MR" in notes and "nifti_modality" in notes
