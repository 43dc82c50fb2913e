"""Training data: clip dataset, resumable infinite sampler, ``Batch``/``collate``, loader; the
stream is a pure function of ``(seed, batch, rank)``, whatever the workers or resuming."""

from __future__ import annotations

import itertools
import logging
import signal
from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from themask.data.clips import clip_span, sample_train_clip
from themask.data.config import DataConfig
from themask.data.description import VSPW_DESCRIPTION, DatasetDescription
from themask.data.transforms import TrainTransform, normalize_frames, pad_clip
from themask.data.vspw import (
    CorruptFileError,
    DataError,
    Video,
    VSPWIndex,
    check_mask_size,
    read_frame,
)

logger = logging.getLogger(__name__)

MAX_REDRAWS = 10


@dataclass
class ClipMeta:
    """A clip's source: ``original_size`` (H, W), ``frame_indices`` into the sorted frames,
    ``image_size`` (h, w) the unpadded image at the top left (None: no padding)."""

    video: str
    frame_names: list[str]
    original_size: tuple[int, int]
    frame_indices: list[int] = field(default_factory=list)
    image_size: tuple[int, int] | None = None


@dataclass
class ClipSample:
    """One clip: frames (T, 3, H, W) uint8 RGB (or float32 normalised), labels (T, H, W) int64."""

    frames: torch.Tensor
    labels: torch.Tensor
    meta: ClipMeta


@dataclass
class Batch:
    """frames (B, T, 3, H, W) uint8 RGB (or float32 normalised); labels (B, T, H, W) int64."""

    frames: torch.Tensor
    labels: torch.Tensor
    meta: list[ClipMeta]

    def pin_memory(self) -> Batch:
        return Batch(self.frames.pin_memory(), self.labels.pin_memory(), self.meta)


def batch_to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames (B, T, 3, H, W) float32 normalised, labels) on ``device``; uint8 frames are
    normalised there, their padding (``ClipMeta.image_size``) set to 0 as if padded after."""
    frames, labels = (t.to(device, non_blocking=True) for t in (batch.frames, batch.labels))
    if frames.dtype == torch.uint8:
        frames = normalize_frames(frames)
        for clip, meta in zip(frames, batch.meta):
            if meta.image_size is not None:
                height, width = meta.image_size
                clip[..., height:, :].fill_(0)
                clip[..., :, width:].fill_(0)
    return frames, labels


def collate(samples: Sequence[ClipSample]) -> Batch:
    """Stack ``ClipSample``s of equal shapes into a ``Batch``."""
    shapes = {(tuple(s.frames.shape), tuple(s.labels.shape)) for s in samples}
    if len(shapes) > 1:
        videos = ", ".join(s.meta.video for s in samples)
        raise ValueError(f"clips of different sizes cannot share a batch ({videos}: {shapes})")
    return Batch(
        torch.stack([s.frames for s in samples]),
        torch.stack([s.labels for s in samples]),
        [s.meta for s in samples],
    )


class VSPWTrainDataset(Dataset):
    """Key ``(video_index, sample_id)`` -> training ``ClipSample`` at the crop size (docs/VSPW.md
    §2.1), drawn from ``(seed, sample_id)``; undecodable clips are redrawn from other videos."""

    def __init__(
        self,
        videos: Sequence[Video],
        *,
        dilation: Sequence[int] = (-3,),
        transform: TrainTransform,
        reverse_prob: float = 0.5,
        seed: int = 0,
        description: DatasetDescription = VSPW_DESCRIPTION,
    ) -> None:
        span = clip_span(dilation)
        short = [v for v in videos if len(v) < span]
        if short:
            listed = ", ".join(f"{v.frame_paths[0].parent} ({len(v)} frames)" for v in short[:10])
            needs = f"dilation {list(dilation)} needs at least {span} frames per video"
            raise DataError(f"{len(short)} video(s) shorter than the clip span: {needs}: {listed}")
        # a clip ends on a masked frame, read forwards or backwards
        ends = [[max(i, len(v) - 1 - i) for i in v.labelled_indices] for v in videos]
        unusable = [v.name for v, e in zip(videos, ends) if max(e, default=-1) < span - 1]
        if unusable:
            listed, why = ", ".join(unusable[:10]), "no masked frame can be a clip target"
            message = "%d training video(s) left out: %s (dilation %s): %s"
            logger.warning(message, len(unusable), why, list(dilation), listed)
        self.videos = [v for v in videos if v.name not in unusable]
        if not self.videos:
            raise DataError("no training video has a masked frame that can be a clip target")
        self.dilation, self.transform, self.reverse_prob = tuple(dilation), transform, reverse_prob
        self.seed, self.description, self.skipped = seed, description, 0
        self.ignore_index = transform.ignore_index

    def __len__(self) -> int:
        return len(self.videos)

    def _load(self, video_index: int, rng: np.random.Generator) -> ClipSample:
        video = self.videos[video_index]
        targets = video.labelled_indices
        indices = sample_train_clip(
            len(video), self.dilation, rng, reverse_prob=self.reverse_prob, targets=targets
        )
        frames = [read_frame(video.frame_paths[i]) for i in indices]
        labels = []
        for i, frame in zip(indices, frames):
            if frame.shape != frames[0].shape:
                raise DataError(
                    f"{video.frame_paths[i]}: frame size {frame.shape} differs from "
                    f"{frames[0].shape}"
                )
            mask_path = video.mask_path(i)
            if mask_path is None:  # sparse dataset: an unlabelled frame
                labels.append(np.full(frame.shape[:2], self.ignore_index, dtype=np.uint8))
                continue
            labels.append(self.description.read_label(mask_path, ignore_index=self.ignore_index))
            check_mask_size(mask_path, labels[-1].shape, video.frame_paths[i], frame.shape[:2])
        frame_t, label_t = self.transform(frames, labels, rng)
        image_size = (int(frame_t.shape[-2]), int(frame_t.shape[-1]))
        frame_t, label_t = pad_clip(  # no-op for a transform that pads itself
            frame_t, label_t, self.transform.crop_size, ignore_index=self.ignore_index
        )
        names = [video.frame_paths[i].stem for i in indices]
        original_size = (frames[0].shape[0], frames[0].shape[1])
        meta = ClipMeta(video.name, names, original_size, list(indices), image_size)
        return ClipSample(frame_t, label_t, meta)

    def __getitem__(self, key: tuple[int, int]) -> ClipSample:
        video_index, sample_id = key
        rng = np.random.default_rng([self.seed, sample_id])
        sample: ClipSample | None = None
        for _ in range(MAX_REDRAWS + 1):
            try:
                sample = self._load(video_index, rng)
                if bool((sample.labels != self.ignore_index).any()):
                    return sample
            except CorruptFileError as err:
                self.skipped += 1
                message = "skipping a clip of %s: %s (%d clip(s) skipped so far in this process)"
                logger.warning(message, self.videos[video_index].name, err, self.skipped)
            video_index = int(rng.integers(len(self.videos)))  # redraw from another video
        if sample is None:
            raise DataError(
                f"{MAX_REDRAWS + 1} clips in a row could not be decoded; see the warnings above"
            )
        message = "sample %d: every label is ignored after %d redraws; using it anyway"
        logger.warning(message, sample_id, MAX_REDRAWS)
        return sample


@dataclass(eq=False)
class InfiniteClipSampler(Sampler):
    """Endless ``(video_index, sample_id)`` keys: video permutations per epoch from ``(seed,
    epoch)``; rank r takes global positions r, r + W, ... after ``start_batch`` batches."""

    num_videos: int
    _: KW_ONLY
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    start_batch: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size: need >= 1 clip per process, got {self.batch_size}")

    def __iter__(self) -> Iterator[tuple[int, int]]:
        cached_epoch, order = -1, np.empty(0, dtype=np.int64)
        for k in itertools.count(self.start_batch * self.batch_size):
            position = k * self.world_size + self.rank
            epoch, offset = divmod(position, self.num_videos)
            if epoch != cached_epoch:
                cached_epoch = epoch
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_videos)
            yield int(order[offset]), position


def _ignore_signals(worker_id: int) -> None:
    """Workers ignore SIGINT/SIGTERM: the trainer finishes its step, they end with the loader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_train_loader(
    data_cfg: DataConfig,
    *,
    batch_size: int,
    num_workers: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Endless loader of one rank's training ``Batch``es (uint8 frames) after ``start_batch``."""
    index = VSPWIndex(data_cfg.root, data_cfg.train_split)
    dataset = VSPWTrainDataset(
        index.videos,
        dilation=data_cfg.dilation,
        transform=TrainTransform.from_config(data_cfg, normalize=False),  # normalised on the device
        reverse_prob=data_cfg.reverse_prob,
        seed=seed,
        description=index.description,
    )
    positions = {"seed": seed, "rank": rank, "world_size": world_size, "start_batch": start_batch}
    workers = data_cfg.num_workers if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InfiniteClipSampler(len(dataset), batch_size=batch_size, **positions),
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=_ignore_signals,
        generator=torch.Generator().manual_seed(seed * 1000003 + rank),
        persistent_workers=workers > 0,
        drop_last=True,
        pin_memory=pin_memory,
    )
