"""Evaluation: VSPW metrics, streaming split evaluation, sliding-window prediction, overlays."""

from themask.evaluation.metrics import (
    SegmentationAccumulator,
    VideoConsistencyAccumulator,
    confusion_matrix,
    format_metrics_table,
    metrics_to_json,
    segmentation_metrics,
)

__all__ = [
    "SegmentationAccumulator",
    "VideoConsistencyAccumulator",
    "confusion_matrix",
    "format_metrics_table",
    "metrics_to_json",
    "segmentation_metrics",
]
