"""Evaluation: metrics, bootstrap confidence intervals, figures, Grad-CAM and the clinician-facing report.

Pure functions over numpy / torch; orchestration (Prefect tasks, CLI) lives elsewhere.
"""

from medpipe.evaluation.baselines import classification_baselines, segmentation_baselines
from medpipe.evaluation.bootstrap import bootstrap_ci, with_confidence_intervals
from medpipe.evaluation.gradcam import find_last_conv_layer, grad_cam_maps
from medpipe.evaluation.metrics import classification_metrics, dice_iou, mean_foreground_dice, segmentation_metrics
from medpipe.evaluation.plots import (
    plot_confusion_matrix,
    plot_gradcam_grid,
    plot_roc_curves,
    plot_sample_predictions,
    plot_segmentation_samples,
    plot_training_curves,
)
from medpipe.evaluation.report import headline, markdown_summary, to_jsonable, write_report
from medpipe.evaluation.spacing import TrainingSpacing, training_spacing

__all__ = [
    "TrainingSpacing",
    "bootstrap_ci",
    "classification_baselines",
    "classification_metrics",
    "dice_iou",
    "find_last_conv_layer",
    "grad_cam_maps",
    "headline",
    "markdown_summary",
    "mean_foreground_dice",
    "plot_confusion_matrix",
    "plot_gradcam_grid",
    "plot_roc_curves",
    "plot_sample_predictions",
    "plot_segmentation_samples",
    "plot_training_curves",
    "segmentation_baselines",
    "segmentation_metrics",
    "to_jsonable",
    "training_spacing",
    "with_confidence_intervals",
    "write_report",
]
