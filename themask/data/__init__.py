"""Video data: dataset descriptions, video reader, clips, transforms, loaders, the toy dataset
and data checks.

Names are imported lazily (PEP 562), so the torch-free modules (``vspw``, ``clips``,
``video_io``, ``resize``) can be used without torch, e.g. by the ONNX Runtime predictor.
"""

from __future__ import annotations

from themask.io import lazy_exports

_EXPORTS = {
    "clip_offsets": "clips",
    "clip_span": "clips",
    "CausalWindows": "clips",
    "causal_window": "clips",
    "test_clips": "clips",
    "DataConfig": "config",
    "DatasetDescription": "description",
    "load_description": "description",
    "Batch": "loader",
    "ClipMeta": "loader",
    "ClipSample": "loader",
    "InfiniteClipSampler": "loader",
    "VSPWTrainDataset": "loader",
    "build_train_loader": "loader",
    "collate": "loader",
    "TOY_CLASS_NAMES": "toy",
    "TOY_DESCRIPTION": "toy",
    "TOY_PALETTE": "toy",
    "make_toy_dataset": "toy",
    "TestTransform": "transforms",
    "TrainTransform": "transforms",
    "CLASS_NAMES": "vspw",
    "PALETTE": "vspw",
    "CorruptFileError": "vspw",
    "DataError": "vspw",
    "Video": "vspw",
    "VSPWIndex": "vspw",
    "read_frame": "vspw",
    "read_label": "vspw",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("themask.data", _EXPORTS)
