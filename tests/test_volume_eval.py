"""Whole-volume evaluation of 3D segmentation in the source grid (medpipe.evaluation.volume_eval)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr

from medpipe.evaluation.evaluate import evaluate_checkpoint
from medpipe.evaluation.volume_eval import evaluate_volumes
from medpipe.evaluation.volume_metrics import case_metrics
from medpipe.ingest.records import ArchiveRecord
from medpipe.planning import SegmentationPlan
from medpipe.predict import PredictionMismatchWarning, VolumeModel, file_sha256, source_labels
from medpipe.store import open_store, read_archive_image, read_sample_table, store_attrs
from medpipe.training.checkpoints import save_checkpoint
from medpipe.training.models import build_plan_unet
from medpipe.volumes import VolumeCase, open_case

N_BOOT = 50


def save_volume_checkpoint(store: str | Path, path: Path, **changes: object) -> Path:
    """An untrained plan-unet checkpoint of a volumes store (its plan, spacing, normalisation), as training saves."""
    attrs = store_attrs(str(store))
    plan = SegmentationPlan.from_dict(attrs["plan"])
    torch.manual_seed(0)
    model = build_plan_unet(plan, 1, 2)
    payload = {"layout": "volumes", "model_name": "plan-unet", "plan": attrs["plan"], "patch_size": list(plan.patch_size),
               "normalization": attrs["normalization"], "training_spacing": attrs["training_spacing"],
               "sample_shape": [1, *plan.patch_size], "num_outputs": 2, "classes": attrs["classes"],
               "store_content_hash": attrs["content_hash"], "config": {}, "code_version": "test", "epoch": 1,
               "task": "segment", "model": model.state_dict(), **changes}
    return save_checkpoint(path, payload)


@pytest.fixture(scope="module")
def run_dir(volume_store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("volume-run")
    save_volume_checkpoint(volume_store[0], run / "best.pt")
    return run


def _one_hot(case: VolumeCase) -> np.ndarray:
    """(2, Z, Y, X) probabilities of a perfect model: the one-hot of the stored mask."""
    mask = np.asarray(case.mask[0])
    return np.stack([mask == 0, mask == 1]).astype(np.float32)


def test_stored_mask_maps_back_to_the_archive_mask(volume_store):
    """The pipeline's way back (stored-grid probabilities -> source grid -> argmax) reproduces each archive mask, so
    a prediction equal to the truth scores Dice 1 / HD95 0 in the source spacing."""
    root = open_store(str(volume_store[0]))
    table = read_sample_table(root)
    checked = scored = 0
    for index in np.flatnonzero(np.asarray(table["has_mask"]) & (np.asarray(table["split"]) >= 0)):
        case = open_case(root, int(index))
        labels = source_labels(_one_hot(case), case.geometry)
        _, mask, attrs = read_archive_image(root, case.unit)
        assert mask is not None and labels.shape == mask.shape[1:]
        np.testing.assert_array_equal(labels, mask[0])
        if scored < 2 and mask.any():  # the metrics of two lesions (MONAI distances are the slow part)
            m = case_metrics(labels, mask[0], ArchiveRecord.from_attrs(attrs).spacing, 2)
            assert m["dice"] == 1.0 and m["hd95_mm"] == 0.0 and m["surface_dice"] == 1.0
            scored += 1
        checked += 1
    assert checked >= 10 and scored == 2


def test_perfect_predictions_score_one_in_the_source_grid(volume_store, run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(VolumeModel, "probabilities", lambda self, case, tta=False: _one_hot(case))
    result = evaluate_volumes(str(volume_store[0]), run_dir, tmp_path, n_boot=N_BOOT, device="cpu",
                              write_store=False)
    m = result["metrics"]
    assert m["n"] == 2 and m["hd95_units"] == "mm" and m["layout"] == "volumes"
    assert m["dice_mean"] == 1.0 and m["hd95_mean"] == 0.0 and m["surface_dice_mean"] == 1.0
    assert all(row["dice"] == 1.0 for row in result["per_case"])
    diff = result["baselines"]["otsu"]["difference"]["dice_mean"]
    assert diff["value"] > 0 and diff["low"] <= diff["value"] <= diff["high"]
    assert result["store_predictions"] is None


@pytest.fixture(scope="module")
def evaluated(volume_store, run_dir, tmp_path_factory):
    """A writable copy of the store evaluated through evaluate_checkpoint (dispatch on the layout)."""
    store = tmp_path_factory.mktemp("volume-eval") / "store.zarr"
    shutil.copytree(volume_store[0], store)
    out = store.parent / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PredictionMismatchWarning)  # the checkpoint is of this store: no warning
        result = evaluate_checkpoint(str(store), run_dir, out, n_boot=N_BOOT, device="cpu")
    return store, out, result


def test_nifti_predictions_have_the_source_shape_and_affine(evaluated):
    store, out, result = evaluated
    root = open_store(str(store))
    assert len(result["per_case"]) == 2
    for row in result["per_case"]:
        image = nib.load(str(out / row["prediction"]))
        pixels, _, attrs = read_archive_image(root, row["unit"])
        record = ArchiveRecord.from_attrs(attrs)
        assert image.shape == tuple(reversed(pixels.shape[1:]))  # NIfTI (X, Y, Z) of the source (C, Z, Y, X)
        assert record.affine is not None
        np.testing.assert_allclose(image.affine, np.asarray(record.affine), atol=1e-5)
        assert np.asarray(image.dataobj).dtype == np.uint8
        assert row["source_shape"] == list(pixels.shape[1:])


def test_report_has_the_case_table_and_overlays(evaluated):
    _, out, result = evaluated
    html = (out / "report.html").read_text()
    assert "Results per case" in html and "Mean surface Dice" in html and "Otsu threshold" in html
    for row in result["per_case"]:
        assert row["unit"] in html and row["patient"] not in html  # patients are numbers in the report
        assert f'alt="case {row["case"]} overlays" src="data:image/png;base64,' in html
        assert (out / row["overlay"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'src="http' not in html and "Sample predictions" not in html
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["cases"]) == 2 and saved["baselines"]["otsu"]["tuning"]["chosen_on"] == "train"
    assert saved["metrics"]["ci"]["dice_mean"]["n_boot"] == N_BOOT
    lines = (out / "per_case.csv").read_text().splitlines()
    assert lines[0].startswith("case,unit,patient,label,dice,hd95_mm") and len(lines) == 3


def test_store_predictions_carry_lineage_and_dimension_names(evaluated, run_dir):
    store, out, result = evaluated
    group = zarr.open_group(str(store), mode="r")[result["store_predictions"]]
    lineage = dict(group.attrs["medpipe"])
    assert lineage["checkpoint_sha256"] == file_sha256(run_dir / "best.pt") and lineage["epoch"] == 1
    assert lineage["store_content_hash"] == store_attrs(str(store))["content_hash"] == lineage["trained_on_store"]
    assert lineage["tta"] is False and lineage["plan"]["patch_size"] and lineage["created_at"]
    assert lineage["training_code_version"] == "test" and lineage["code_version"]
    assert str(run_dir) not in json.dumps(lineage)  # a content hash, never the path
    assert not (store / "medpipe.lock").exists()  # the lock was released
    for row in result["per_case"]:
        arr = group[row["unit"]]
        assert arr.dtype == np.uint8 and tuple(arr.metadata.dimension_names) == ("c", "z", "y", "x")
        assert arr.shape == (1, *row["source_shape"]) and arr.attrs["medpipe"]["grid"] == "source"
        nifti = np.asarray(nib.load(str(out / row["prediction"])).dataobj)
        np.testing.assert_array_equal(arr[0], np.transpose(nifti, (2, 1, 0)))


def test_a_checkpoint_of_another_store_is_evaluated_with_a_warning(volume_store, tmp_path):
    run = tmp_path / "other"
    save_volume_checkpoint(volume_store[0], run / "best.pt", store_content_hash="f" * 64)
    with pytest.warns(PredictionMismatchWarning, match="trained on another store"):
        result = evaluate_volumes(str(volume_store[0]), run, tmp_path / "out", n_boot=N_BOOT, device="cpu",
                                  write_store=False)
    assert any("trained on another store" in note for note in result["metrics"]["notes"])
    assert "trained on another store" in (tmp_path / "out" / "report.html").read_text()
