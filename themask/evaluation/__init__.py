"""Evaluation: VSPW metrics, streaming split evaluation, sliding-window prediction, overlays."""

from themask.evaluation.inference import (
    EvalReport,
    FramePrediction,
    StreamingPredictor,
    evaluate_data,
    evaluate_split,
    predict_video,
)
from themask.evaluation.metrics import (
    SegmentationAccumulator,
    VideoConsistencyAccumulator,
    confusion_matrix,
    format_metrics_table,
    metrics_to_json,
    segmentation_metrics,
)

__all__ = [
    "EvalReport",
    "FramePrediction",
    "SegmentationAccumulator",
    "StreamingPredictor",
    "VideoConsistencyAccumulator",
    "confusion_matrix",
    "evaluate_data",
    "evaluate_split",
    "format_metrics_table",
    "metrics_to_json",
    "predict_video",
    "segmentation_metrics",
]
