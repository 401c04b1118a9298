"""Evaluate a trained checkpoint on a store split: predictions -> metrics with 95% CIs -> figures -> report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medpipe.evaluation.baselines import classification_baselines, segmentation_baselines
from medpipe.evaluation.bootstrap import with_confidence_intervals
from medpipe.evaluation.gradcam import grad_cam_maps
from medpipe.evaluation.metrics import classification_metrics, segmentation_metrics
from medpipe.evaluation.plots import (
    plot_confusion_matrix,
    plot_gradcam_grid,
    plot_roc_curves,
    plot_sample_predictions,
    plot_segmentation_samples,
    plot_training_curves,
)
from medpipe.evaluation.report import markdown_summary, write_report
from medpipe.evaluation.spacing import training_spacing
from medpipe.store import get_array, open_store, read_sample_table, store_attrs
from medpipe.task import Task
from medpipe.training import CheckpointMismatchError, TrainingError

SAMPLE_FIGURES = 16


def resolve_checkpoint(model: str | Path) -> tuple[Path, Path]:
    """(checkpoint file, run folder) from a run folder (its best.pt) or a checkpoint path."""
    path = Path(model)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path} (give a training run folder or a .pt file)")
    return path, path.parent


def load_checked_model(store_url: str, model_path: str | Path):
    """(model, metadata, checkpoint path, run folder, store attrs); raises when the checkpoint is not of this store."""
    from medpipe.training.checkpoints import load_model

    checkpoint, run_dir = resolve_checkpoint(model_path)
    attrs = store_attrs(store_url)
    model, meta = load_model(checkpoint)
    if attrs.get("content_hash") != meta.get("store_content_hash"):
        raise CheckpointMismatchError(
            f"{checkpoint} was trained on a different store (content hash {str(meta.get('store_content_hash'))[:12]}…, "
            f"this store {str(attrs.get('content_hash'))[:12]}…)")
    return model, meta, checkpoint, run_dir, attrs


def _sample_images(store_url: str, indices: np.ndarray) -> np.ndarray:
    images = get_array(open_store(store_url), "training/images")
    return np.stack([images[int(i)] for i in indices]) if len(indices) else np.zeros((0, *images.shape[1:]), np.float32)


def evaluate_checkpoint(store_url: str, model_path: str | Path, out_dir: str | Path, *, split: str = "test",
                        n_boot: int = 1000, device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Evaluate a checkpoint on `split` of the store it was trained on, beside simple baselines (same cases,
    metrics and bootstrap resamples); writes metrics.json (with a "baselines" section), PNGs and report.html.
    A volumes-layout store is evaluated on whole volumes in each case's source grid (`evaluate_volumes`)."""
    from medpipe.training.engine import predict
    from medpipe.volumes import store_layout

    if store_layout(store_attrs(store_url)) == "volumes":
        from medpipe.evaluation.volume_eval import evaluate_volumes

        return evaluate_volumes(store_url, model_path, out_dir, split=split, n_boot=n_boot, device=device, seed=seed)

    model, meta, checkpoint, run_dir, attrs = load_checked_model(store_url, model_path)
    task = Task(meta["task"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = predict(model, store_url, split, task=task, device=device)
    indices = np.asarray(result["indices"])
    table = read_sample_table(store_url)
    patients = len({str(p) for p in table["patient"][indices]}) if len(indices) else 0
    plots: dict[str, str] = {}
    if (run_dir / "metrics.csv").exists():
        plots["training_curves"] = plot_training_curves(run_dir / "metrics.csv", out / "training_curves.png")
    shown = indices[:SAMPLE_FIGURES]
    images = _sample_images(store_url, shown)
    ci_kw: dict[str, Any] = {"n_boot": n_boot, "seed": seed}
    if task == Task.classify:
        classes = list(meta.get("classes") or attrs.get("classes") or [])
        labelled = result["y_true"] >= 0
        y_true, y_prob = result["y_true"][labelled], result["y_prob"][labelled]
        metrics = with_confidence_intervals(classification_metrics(y_true, y_prob, classes), y_true, y_prob, **ci_kw)
        baselines = classification_baselines(store_url, indices[labelled], y_true, classes, model_prob=y_prob,
                                             **ci_kw)
        plots["roc"] = plot_roc_curves(y_true, y_prob, classes, out / "roc.png")
        plots["confusion_matrix"] = plot_confusion_matrix(metrics["confusion_matrix"], classes,
                                                          out / "confusion_matrix.png")
        plots["samples"] = plot_sample_predictions(images, result["y_true"][: len(shown)],
                                                   result["y_prob"][: len(shown)], classes, out / "samples.png")
        cams = grad_cam_maps(model.cpu(), torch.from_numpy(images[:8]))
        plots["gradcam"] = plot_gradcam_grid(images[:8], cams, out / "gradcam.png")
    else:
        num_classes = int(meta.get("num_outputs", 2))
        masks_true, masks_pred = result["masks_true"], result["masks_pred"]
        sp = training_spacing(attrs, masks_true.ndim - 2)
        metrics = segmentation_metrics(masks_pred, masks_true, spacing=sp.spacing, num_classes=num_classes)
        metrics["hd95_units"] = sp.units
        metrics["notes"].append(f"HD95 is in {sp.units} of the training arrays"
                                + (f" (spacing {', '.join(f'{v:g}' for v in sp.spacing)} mm)" if sp.spacing else "")
                                + f": {sp.source}.")
        metrics = with_confidence_intervals(metrics, **ci_kw)
        baselines = segmentation_baselines(store_url, indices, masks_true, num_classes, spacing=sp.spacing,
                                           model_pred=masks_pred, **ci_kw)
        plots["samples"] = plot_segmentation_samples(images, masks_true[: len(shown)], masks_pred[: len(shown)],
                                                     out / "samples.png")
    data_info = {"n_patients": patients, "unit": "volumes" if images.ndim == 5 else "images",
                 "content_hash": attrs.get("content_hash"), "split": split, "store_kind": attrs.get("kind")}
    model_info = {"model_name": meta.get("model_name"), "code_version": meta.get("code_version"),
                  "config": meta.get("config"), "epoch": meta.get("epoch"), "checkpoint": checkpoint.name}
    title = f"medpipe evaluation: {meta.get('model_name')} ({task}) on the {split} split"
    report = write_report(out, title=title, task=task, metrics=metrics, plots=plots, model_info=model_info,
                          data_info=data_info, baselines=baselines)
    return {"report": str(report), "metrics_json": str(out / "metrics.json"), "metrics": metrics,
            "baselines": baselines, "markdown": markdown_summary(metrics, task, baselines),
            "patients": patients, "samples": int(len(indices))}
