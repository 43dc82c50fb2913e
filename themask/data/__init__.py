"""Video data: dataset descriptions, video reader, clips, transforms, loaders, the toy dataset
and data checks."""

from themask.data.clips import clip_offsets, clip_span, sliding_windows, test_clips
from themask.data.config import DataConfig
from themask.data.description import DatasetDescription, load_description
from themask.data.loader import (
    Batch,
    ClipMeta,
    ClipSample,
    InfiniteClipSampler,
    VSPWClipDataset,
    VSPWTrainDataset,
    build_eval_loader,
    build_train_loader,
    collate,
)
from themask.data.toy import TOY_CLASS_NAMES, TOY_DESCRIPTION, TOY_PALETTE, make_toy_dataset
from themask.data.transforms import TestTransform, TrainTransform
from themask.data.vspw import (
    CLASS_NAMES,
    PALETTE,
    CorruptFileError,
    DataError,
    Video,
    VSPWIndex,
    read_frame,
    read_label,
)

__all__ = [
    "Batch",
    "CLASS_NAMES",
    "ClipMeta",
    "ClipSample",
    "CorruptFileError",
    "DataConfig",
    "DatasetDescription",
    "DataError",
    "InfiniteClipSampler",
    "PALETTE",
    "TOY_CLASS_NAMES",
    "TOY_DESCRIPTION",
    "TOY_PALETTE",
    "TestTransform",
    "TrainTransform",
    "VSPWClipDataset",
    "VSPWIndex",
    "VSPWTrainDataset",
    "Video",
    "build_eval_loader",
    "build_train_loader",
    "clip_offsets",
    "clip_span",
    "collate",
    "load_description",
    "make_toy_dataset",
    "read_frame",
    "read_label",
    "sliding_windows",
    "test_clips",
]
