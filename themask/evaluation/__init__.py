"""Evaluation: VSPW metrics, streaming split evaluation, sliding-window prediction, overlays.

Names are imported lazily (PEP 562), so ``themask.evaluation.visualize`` works without torch.
"""

from __future__ import annotations

from themask.io import lazy_exports

_EXPORTS = {
    "StreamingPredictor": "predict",
    "evaluate_config": "evaluate",
    "evaluate_split": "evaluate",
    "predict_video": "predict",
    "SegmentationAccumulator": "metrics",
    "VideoConsistencyAccumulator": "metrics",
    "format_metrics_table": "metrics",
    "metrics_to_json": "metrics",
    "scalar_metrics": "metrics",
    "segmentation_metrics": "metrics",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("themask.evaluation", _EXPORTS)
