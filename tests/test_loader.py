"""Sampler (resumable, sharded), dataset reproducibility, collate, evaluation clip datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from themask.data.config import DataConfig
from themask.data.loader import (
    ClipMeta,
    ClipSample,
    InfiniteClipSampler,
    VSPWTrainDataset,
    batch_to_device,
    build_train_loader,
    collate,
)
from themask.data.toy import make_toy_dataset
from themask.data.transforms import MEAN, STD, TrainTransform
from themask.data.video_io import iter_input_frames, read_video_frames
from themask.data.vspw import VSPWIndex


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_dataset(
        tmp_path_factory.mktemp("toy"), seed=3, num_train=4, num_val=2, num_frames=12, size=(32, 48)
    )


def _cfg(root, **kw):
    return DataConfig(root=str(root), scale=(48, 32), crop_size=(32, 32), num_workers=0, **kw)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_sampler_resumes_the_same_stream():
    full = _take(iter(InfiniteClipSampler(7, batch_size=3, seed=5, rank=1, world_size=2)), 30)
    resumed = _take(
        iter(InfiniteClipSampler(7, batch_size=3, seed=5, rank=1, world_size=2, start_batch=4)), 18
    )
    assert resumed == full[12:]
    other_seed = _take(iter(InfiniteClipSampler(7, batch_size=3, seed=6, rank=1, world_size=2)), 30)
    assert [k[0] for k in other_seed] != [k[0] for k in full]


def test_sampler_shards_ranks_disjointly_and_each_epoch_visits_every_video_once():
    num_videos, world = 5, 3
    keys = {}
    for rank in range(world):
        for video, position in _take(
            iter(
                InfiniteClipSampler(num_videos, batch_size=2, seed=0, rank=rank, world_size=world)
            ),
            20,
        ):
            assert position % world == rank and position not in keys
            keys[position] = video
    assert sorted(keys) == list(range(60))
    for epoch in range(12):
        assert sorted(keys[p] for p in range(epoch * 5, epoch * 5 + 5)) == list(range(5))


def test_training_sample_is_a_pure_function_of_the_key(toy_root):
    videos = VSPWIndex(toy_root, "train").videos
    transform = TrainTransform(scale=(48, 32), crop_size=(24, 24))
    first = VSPWTrainDataset(videos, dilation=[-3], transform=transform, seed=1)
    second = VSPWTrainDataset(videos, dilation=[-3], transform=transform, seed=1)
    a, b = first[(2, 17)], second[(2, 17)]
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels) and a.meta == b.meta
    c = VSPWTrainDataset(videos, dilation=[-3], transform=transform, seed=2)[(2, 17)]
    assert not torch.equal(a.frames, c.frames)
    assert a.frames.shape == (2, 3, 24, 24) and a.labels.dtype == torch.int64
    i0, i1 = a.meta.frame_indices
    assert abs(i1 - i0) == 3  # dilation [-3], possibly reversed


def test_loader_is_independent_of_workers_and_resumes(toy_root):
    cfg = _cfg(toy_root)
    serial = _take(iter(build_train_loader(cfg, batch_size=2, num_workers=0, seed=4)), 4)
    resumed = _take(
        iter(build_train_loader(cfg, batch_size=2, num_workers=0, seed=4, start_batch=2)), 2
    )
    for x, y in zip(serial[2:], resumed):
        assert torch.equal(x.frames, y.frames) and torch.equal(x.labels, y.labels)
    parallel = _take(iter(build_train_loader(cfg, batch_size=2, num_workers=2, seed=4)), 4)
    for x, y in zip(serial, parallel):
        assert torch.equal(x.frames, y.frames) and torch.equal(x.labels, y.labels)
        assert [m.video for m in x.meta] == [m.video for m in y.meta]
    batch = serial[0]
    assert batch.frames.shape == (2, 2, 3, 32, 32) and batch.labels.shape == (2, 2, 32, 32)
    assert batch.frames.dtype == torch.uint8 and batch.labels.dtype == torch.int64
    assert set(batch.labels.unique().tolist()) <= set(range(8)) | {255}


def test_uint8_frames_normalised_on_the_device_equal_normalising_in_the_worker(toy_root):
    """The loader ships uint8 frames; ``batch_to_device`` must give exactly the tensors of the
    float path (normalise, then pad with 0), padding included."""
    videos = VSPWIndex(toy_root, "train").videos
    kwargs = dict(scale=(48, 32), ratio_range=(0.5, 0.8), crop_size=(32, 32))
    by_kind = {}
    for normalize in (True, False):
        dataset = VSPWTrainDataset(
            videos, transform=TrainTransform(normalize=normalize, **kwargs), seed=5
        )
        by_kind[normalize] = collate([dataset[(v, 10 + v)] for v in range(4)])
    worker, device = by_kind[True], by_kind[False]
    assert worker.frames.dtype == torch.float32 and device.frames.dtype == torch.uint8
    padded = [m.image_size for m in device.meta if m.image_size != (32, 32)]
    assert padded, "the test needs clips smaller than the crop"
    frames, labels = batch_to_device(device, torch.device("cpu"))
    assert torch.equal(frames, worker.frames) and torch.equal(labels, worker.labels)
    # and both equal a hand computation: (x - mean) / std inside the image, 0 outside
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for clip, raw, meta in zip(frames, device.frames, device.meta):
        h, w = meta.image_size
        expected = torch.zeros_like(clip)
        expected[..., :h, :w] = (raw[..., :h, :w].float() - mean) / std
        assert torch.equal(clip, expected)


def test_clips_with_only_ignored_labels_are_redrawn(tmp_path):
    for name, value in (("void", 0), ("ok", 3)):
        for t in range(5):
            for sub, suffix, array in (
                ("origin", ".jpg", np.zeros((8, 8, 3), np.uint8)),
                ("mask", ".png", np.full((8, 8), value, np.uint8)),
            ):
                path = tmp_path / "data" / name / sub / f"{t:08d}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
    (tmp_path / "train.txt").write_text("void\nok\n")
    transform = TrainTransform(
        scale=(8, 8), ratio_range=(1, 1), crop_size=(8, 8), photometric=False
    )
    dataset = VSPWTrainDataset(
        VSPWIndex(tmp_path, "train").videos, dilation=[-3], transform=transform
    )
    for i in range(10):
        sample = dataset[(0, i)]
        assert sample.meta.video == "ok" and bool((sample.labels == 2).all())


def _sample(h, w, video="v"):
    return ClipSample(
        torch.zeros(2, 3, h, w),
        torch.zeros(2, h, w, dtype=torch.long),
        ClipMeta(video, ["a", "b"], (h, w)),
    )


def test_collate_stacks_and_rejects_mixed_sizes():
    batch = collate([_sample(4, 6, "x"), _sample(4, 6, "y")])
    assert batch.frames.shape == (2, 2, 3, 4, 6) and batch.labels.shape == (2, 2, 4, 6)
    assert [m.video for m in batch.meta] == ["x", "y"]
    with pytest.raises(ValueError, match="different sizes"):
        collate([_sample(4, 6), _sample(4, 8)])


def test_config_derives_clip_length_and_classes_and_validates():
    assert DataConfig().num_frames == 2 and DataConfig().num_classes == 124
    assert DataConfig(dilation=[-9, -6, -3]).num_frames == 4
    assert DataConfig(dilation=[0]).eval_clip_len == 1
    assert DataConfig(test_clip_len=4).eval_clip_len == 4
    assert DataConfig(crop_size=[64, 96]).crop_size == (64, 96)
    for bad in (
        dict(dilation=[3]),
        dict(ratio_range=(2.0, 1.0)),
        dict(flip_prob=1.5),
    ):
        with pytest.raises(ValueError):
            DataConfig(**bad)


def test_video_file_and_frame_folder_readers(toy_root, tmp_path):
    import av

    video = VSPWIndex(toy_root, "val").videos[0]
    folder = list(iter_input_frames(video.frame_paths[0].parent))
    assert [n for n, _ in folder] == [p.stem for p in video.frame_paths]
    assert len(folder) == len(video) and folder[0][1].shape == (32, 48, 3)

    path = tmp_path / "clip.mp4"
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for colour in colours:
            frame = av.VideoFrame.from_ndarray(
                np.full((32, 48, 3), colour, np.uint8), format="rgb24"
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    decoded = list(read_video_frames(path))
    assert len(decoded) == 3 and decoded[0].shape == (32, 48, 3) and decoded[0].dtype == np.uint8
    for frame, colour in zip(decoded, colours):
        assert int(np.argmax(frame.reshape(-1, 3).mean(0))) == int(np.argmax(colour))
    assert [n for n, _ in iter_input_frames(path)] == ["00000000", "00000001", "00000002"]
