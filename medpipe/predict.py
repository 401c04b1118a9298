"""Whole-volume prediction with a volumes-layout checkpoint (`medpipe predict`).

Each case of a volumes-layout store is predicted on its stored grid (sliding window, Gaussian blending, the
checkpoint's patch), its class probabilities are mapped back to the case's **source** grid (`to_source`,
"linear": probabilities are interpolated, never labels) and only then turned into labels, so a prediction lines up
voxel for voxel with the archived image and its mask. A folder of DICOM series or NIfTI files is first ingested into
OUT/store.zarr with the checkpoint's preprocessing (spacing, plan, normalisation, channels) and the same
de-identification key, so new studies are prepared exactly as the training data were.

Outputs carry pseudonyms only: OUT/<unit>.nii.gz (source affine) and OUT/predictions.json (unit, patient pseudonym,
source shape, spacing, file); no source path, store path or header text.
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import zarr

from medpipe import __version__
from medpipe.config import IngestConfig, PreprocessConfig
from medpipe.errors import UserError
from medpipe.inference import predict_volume
from medpipe.training.checkpoints import file_sha256
from medpipe.store import SPLIT_CODES, open_store, read_sample_table, store_attrs
from medpipe.volumes import CaseGeometry, VolumeCase, nifti_image, open_case, store_layout, to_source

__all__ = ["PredictError", "PredictionMismatchWarning", "VolumeModel", "checkpoint_lineage", "file_sha256",
           "ingest_config_for", "is_volumes_checkpoint", "iter_case_predictions", "load_volume_model",
           "predict_folder", "predict_store", "preprocessing_warnings", "source_labels", "split_cases", "write_nifti"]

OVERLAP = 0.5  # sliding-window overlap (nnU-Net's default)
PLAN_OVERRIDES = ("patch_size", "batch_size", "strides", "n_stages", "pool_per_axis", "base_features",
                  "memory_budget_bytes")  # plan fields a predict ingest takes from the checkpoint
INGESTED_STORE = "store.zarr"


class PredictError(UserError, ValueError):
    """A checkpoint or store that cannot be used for volume prediction (the message says why)."""


class PredictionMismatchWarning(UserWarning):
    """The data were not prepared as the checkpoint's training data (another store, spacing or normalisation)."""


@dataclass(frozen=True)
class VolumeModel:
    """A loaded volumes-layout checkpoint on its device, ready to predict cases."""

    model: torch.nn.Module
    meta: dict[str, Any]
    checkpoint: Path
    run_dir: Path
    device: torch.device

    @property
    def patch(self) -> tuple[int, int, int]:
        """Sliding-window size (z, y, x): the checkpoint's training patch."""
        z, y, x = (int(v) for v in (self.meta.get("patch_size") or self.meta["plan"]["patch_size"]))
        return z, y, x

    @property
    def num_classes(self) -> int:
        """Labels the predictions hold, background included (a single sigmoid output: 2)."""
        return max(2, int(self.meta["num_outputs"]))

    @property
    def in_channels(self) -> int:
        """Input channels the network expects."""
        return int(self.meta["sample_shape"][0])

    def probabilities(self, case: VolumeCase, tta: bool = False) -> np.ndarray:
        """Class probabilities (K, Z, Y, X) of a case on its stored grid."""
        image = np.asarray(case.image[...], dtype=np.float32)
        if image.shape[0] != self.in_channels:
            raise PredictError(f"case {case.unit} has {image.shape[0]} channel(s); the checkpoint expects "
                               f"{self.in_channels}")
        batch = int((self.meta.get("plan") or {}).get("batch_size", 2))
        return predict_volume(self.model, image, self.patch, overlap=OVERLAP, gaussian=True, tta_flips=tta,
                              device=self.device, batch_size=max(1, batch))

    def predict_case(self, case: VolumeCase, tta: bool = False) -> np.ndarray:
        """uint8 labels (Z, Y, X) of a case on its source grid (probabilities mapped back, then argmax)."""
        return source_labels(self.probabilities(case, tta), case.geometry)


def is_volumes_checkpoint(meta: Mapping[str, Any]) -> bool:
    """Whether checkpoint metadata is of a volumes-layout (3D, patch-trained) segmentation model."""
    from medpipe.training.models import PLAN_MODEL

    return meta.get("layout") == "volumes" or meta.get("model_name") == PLAN_MODEL


def load_volume_model(model_path: str | Path, device: str = "auto") -> VolumeModel:
    """A run folder (its best.pt) or checkpoint file of a volumes-layout segmentation model, on `device`."""
    from medpipe.evaluation.evaluate import resolve_checkpoint
    from medpipe.training.checkpoints import load_model
    from medpipe.training.engine import resolve_device

    checkpoint, run_dir = resolve_checkpoint(model_path)
    model, meta = load_model(checkpoint)
    if not is_volumes_checkpoint(meta):
        raise PredictError(f"{checkpoint.name} is a {meta.get('model_name')} checkpoint of a fixed-layout store; "
                           "`medpipe predict` needs a model trained on a volumes-layout (3D) store")
    missing = [k for k in ("plan", "training_spacing", "normalization") if meta.get(k) is None]
    if missing:
        raise PredictError(f"{checkpoint.name} lacks {', '.join(missing)}: not a volumes-layout checkpoint")
    dev = resolve_device(device)
    return VolumeModel(model.to(dev).eval(), meta, checkpoint, run_dir, dev)


def source_labels(probabilities: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    """Stored-grid probabilities (K, Z, Y, X) -> uint8 labels (Z, Y, X) on the source grid: the probabilities are
    resampled and reoriented (`to_source`, linear), then argmax (K = 1: sigmoid, foreground at >= 0.5)."""
    source = to_source(np.asarray(probabilities, dtype=np.float32), geometry, "linear")
    if source.shape[0] == 1:
        return (source[0] >= 0.5).astype(np.uint8)
    return np.argmax(source, axis=0).astype(np.uint8)


def split_cases(table: Mapping[str, np.ndarray], split: str | None) -> np.ndarray:
    """Case indices of `split` (train/val/test), or of every split (None; excluded cases, split -1, left out)."""
    codes = np.asarray(table["split"])
    if split is None:
        return np.flatnonzero(codes >= 0)
    if split not in SPLIT_CODES:
        raise PredictError(f"unknown split {split!r}; use {', '.join(SPLIT_CODES)}")
    return np.flatnonzero(codes == SPLIT_CODES[split])


def iter_case_predictions(root: zarr.Group, indices: Sequence[int] | np.ndarray, model: VolumeModel,
                          tta: bool = False) -> Iterator[tuple[VolumeCase, np.ndarray]]:
    """(case, uint8 source-grid labels (Z, Y, X)) for each case index, one case in memory at a time."""
    for index in indices:
        case = open_case(root, int(index))
        yield case, model.predict_case(case, tta)


def write_nifti(labels: np.ndarray, geometry: CaseGeometry, folder: str | Path, unit: str) -> Path:
    """Write source-grid labels (Z, Y, X) as folder/<unit>.nii.gz with the source affine; returns the path."""
    path = Path(folder) / f"{unit}.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nifti_image(np.asarray(labels, dtype=np.uint8), geometry), str(path))
    return path


def checkpoint_lineage(model: VolumeModel, tta: bool) -> dict[str, Any]:
    """What a prediction depends on: the checkpoint's content hash (never its path), epoch, training store, code
    versions, plan and inference settings, and when it was made."""
    meta = model.meta
    return {"checkpoint_sha256": file_sha256(model.checkpoint), "epoch": meta.get("epoch"),
            "model_name": meta.get("model_name"), "trained_on_store": meta.get("store_content_hash"),
            "training_code_version": meta.get("code_version"), "code_version": __version__,
            "plan": meta.get("plan"), "patch_size": list(model.patch), "overlap": OVERLAP, "gaussian": True,
            "tta": bool(tta), "num_classes": model.num_classes,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _same_floats(a: Any, b: Any) -> bool:
    try:
        return a is not None and b is not None and bool(np.allclose(np.asarray(a, float), np.asarray(b, float)))
    except (TypeError, ValueError):
        return False


def preprocessing_warnings(attrs: Mapping[str, Any], meta: Mapping[str, Any], modalities: Sequence[str] = (),
                           same_store: bool = True) -> list[str]:
    """Ways a store's volumes (of `modalities`) differ from the checkpoint's training data (empty: prepared
    alike, e.g. the training store itself); `same_store`: also say that the store is not the training store."""
    if attrs.get("content_hash") == meta.get("store_content_hash"):
        return []
    out: list[str] = []
    if same_store:
        trained, here = str(meta.get("store_content_hash"))[:12], str(attrs.get("content_hash"))[:12]
        out.append(f"the checkpoint was trained on another store: its store_content_hash {trained}… is not this "
                   f"store's content_hash {here}…")
    if not _same_floats(attrs.get("training_spacing"), meta.get("training_spacing")):
        out.append(f"the store's volumes are at spacing {attrs.get('training_spacing')} mm but the model was trained "
                   f"at {meta.get('training_spacing')} mm: predictions may be poor")
    if attrs.get("normalization") != meta.get("normalization"):
        out.append("the store was normalised with other intensity statistics than the training store: "
                   "predictions may be poor (ingest with `medpipe predict FOLDER ...` to normalise alike)")
    fixed = set(meta.get("normalization") or {})
    other = sorted(set(modalities) - fixed)
    if fixed and other:
        out.append(f"cases of modality {', '.join(other)} were normalised per image, but the model was trained on "
                   f"{', '.join(sorted(fixed))} with fixed statistics (NIfTI files carry no modality: they are read as "
                   "the ingest config's nifti_modality): predictions may be poor")
    return out


def _volumes_store(store_url: str) -> dict[str, Any]:
    attrs = store_attrs(store_url)
    if not attrs:
        raise PredictError(f"{store_url} is not a medpipe store")
    if store_layout(attrs) != "volumes":
        raise PredictError(f"{store_url} has the {store_layout(attrs)} layout; prediction needs a volumes-layout "
                           "(3D) store or a folder of DICOM series / NIfTI files")
    return attrs


def predict_store(store_url: str, model: VolumeModel | str | Path, out: str | Path, split: str | None = None,
                  tta: bool = False, device: str = "auto", same_store: bool = True) -> dict[str, Any]:
    """Predict every case of a volumes-layout store (all splits, or `split`) to OUT/<unit>.nii.gz on its source
    grid and write OUT/predictions.json; returns that summary. Differences between the store's preparation and the
    checkpoint's are warned (PredictionMismatchWarning) and listed under "warnings" (`same_store=False`: a store
    made for prediction, so another content hash is expected)."""
    vm = model if isinstance(model, VolumeModel) else load_volume_model(model, device)
    attrs = _volumes_store(store_url)
    root = open_store(store_url)
    table = read_sample_table(root)
    indices = split_cases(table, split)
    modalities = sorted({str(m) for m in np.asarray(table["modality"])[indices]})
    notes = preprocessing_warnings(attrs, vm.meta, modalities, same_store)
    for note in notes:
        warnings.warn(note, PredictionMismatchWarning, stacklevel=2)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for case, labels in iter_case_predictions(root, indices, vm, tta):
        path = write_nifti(labels, case.geometry, out_dir, case.unit)
        cases.append({"unit": case.unit, "patient": str(table["patient"][case.index]),
                      "split": _split_name(int(table["split"][case.index])),
                      "source_shape": list(case.geometry.source_shape),
                      "spacing": list(case.geometry.source_spacing), "file": path.name,
                      "foreground_voxels": int(np.count_nonzero(labels))})
    skipped = [{"unit": str(table["unit"][i]), "reason": "excluded from the store's volumes (reports/excluded.json)"}
               for i in np.flatnonzero(np.asarray(table["split"]) < 0)] if split is None else []
    summary = {"cases": cases, "skipped": skipped, "store_content_hash": attrs.get("content_hash"),
               "split": split or "all", "model": checkpoint_lineage(vm, tta), "warnings": notes}
    (out_dir / "predictions.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _split_name(code: int) -> str:
    return next((name for name, c in SPLIT_CODES.items() if c == code), "excluded")


NIFTI_MODALITIES = ("CT", "MR", "PT", "NM", "US", "OT")


def ingest_config_for(meta: Mapping[str, Any]) -> IngestConfig:
    """An ingest config that prepares new studies as the checkpoint's training store was prepared: 3D volumes at
    its training spacing, its plan's patch and topology, its normalisation statistics and channel count."""
    plan = dict(meta.get("plan") or {})
    channels = int(meta["sample_shape"][0])
    if channels not in (1, 3):
        raise PredictError(f"the checkpoint takes {channels} channels; ingest supports 1 or 3")
    preprocess = PreprocessConfig.model_validate({
        "kind": "3d", "layout": "volumes", "channels": channels, "shape": [int(v) for v in plan["patch_size"]],
        "target_spacing": [float(v) for v in meta["training_spacing"]],
        "plan": {k: plan[k] for k in PLAN_OVERRIDES if k in plan}, "normalization": dict(meta["normalization"])})
    modalities = sorted(m for m in (meta.get("normalization") or {}) if m in NIFTI_MODALITIES)
    # NIfTI records no modality: a model trained on one modality reads new NIfTI studies as that modality
    return IngestConfig(preprocess=preprocess, **({"nifti_modality": modalities[0]} if len(modalities) == 1 else {}))


def predict_folder(source: str, model: VolumeModel | str | Path, out: str | Path, tta: bool = False,
                   device: str = "auto", key_secret: str | None = None, show_progress: bool = False
                   ) -> dict[str, Any]:
    """Ingest a folder of DICOM series / NIfTI files into OUT/store.zarr with the checkpoint's preprocessing and
    the de-identification key ($MEDPIPE_DEID_KEY, or the Prefect Secret `key_secret`), then predict every case
    (`predict_store`); the summary adds the ingest's accounting."""
    from flows.ingest import run_ingest

    vm = model if isinstance(model, VolumeModel) else load_volume_model(model, device)
    store = str(Path(out) / INGESTED_STORE)
    ingest = run_ingest(source, store, ingest_config_for(vm.meta), key_secret=key_secret,
                        show_progress=show_progress)
    attrs = store_attrs(store)
    if store_layout(attrs) != "volumes" or not int(attrs.get("samples") or 0):
        raise PredictError(f"no 3D volume could be ingested from SOURCE (see OUT/{INGESTED_STORE}/reports/ for why)")
    summary = predict_store(store, vm, out, tta=tta, same_store=False)
    summary["store"] = INGESTED_STORE
    summary["ingest"] = {"accounting": ingest.get("accounting"), "warnings": ingest.get("warnings", [])}
    Path(out, "predictions.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
