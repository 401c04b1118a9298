"""Evaluation: metrics, bootstrap confidence intervals, figures, Grad-CAM and the clinician-facing report.

Pure functions over numpy / torch; orchestration (Prefect tasks, CLI) lives elsewhere.
"""

from medpipe.evaluation.bootstrap import bootstrap_ci, with_confidence_intervals
from medpipe.evaluation.gradcam import find_last_conv_layer, grad_cam_maps
from medpipe.evaluation.metrics import classification_metrics, segmentation_metrics
from medpipe.evaluation.plots import (
    plot_confusion_matrix,
    plot_gradcam_grid,
    plot_roc_curves,
    plot_sample_predictions,
    plot_segmentation_samples,
    plot_training_curves,
)
from medpipe.evaluation.report import headline, markdown_summary, to_jsonable, write_report

__all__ = [
    "bootstrap_ci",
    "classification_metrics",
    "find_last_conv_layer",
    "grad_cam_maps",
    "headline",
    "markdown_summary",
    "plot_confusion_matrix",
    "plot_gradcam_grid",
    "plot_roc_curves",
    "plot_sample_predictions",
    "plot_segmentation_samples",
    "plot_training_curves",
    "segmentation_metrics",
    "to_jsonable",
    "with_confidence_intervals",
    "write_report",
]
