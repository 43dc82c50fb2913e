"""Budget of host<->device transfers per training step and per evaluated frame, counted on CPU
with ``transfers.TransferCounter`` (which tensors would live on the GPU is tracked from the
model's parameters and the uploaded batch).

``python tests/test_host_transfers.py [preset]`` prints the counts (benchmarks/README.md).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfers import TransferCounter  # noqa: E402

from themask import data  # noqa: E402
from themask.config import load_config  # noqa: E402
from themask.data.loader import Batch, ClipMeta  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Per optimizer step of the tiny preset (B = 2, T = 2), leaving out AdamW's own step:
MODEL_STEP_BUDGET = {"h2d": 2, "d2h": 0}  # the batch upload (frames, labels); no read
LOG_FLUSH_BUDGET = {"h2d": 0, "d2h": 1}  # per log_interval: one read of all scalars
# The whole step with the real objective: + the assignments' upload and, on CPU, 2 reads (the
# matching's one transfer and the widest clip's class count; 1 read on accelerators).
CRITERION_STEP_BUDGET = {"h2d": 3, "d2h": 2}


def _cfg(steps, preset):
    return load_config(
        None,
        [
            f"preset={preset}",
            "loss.num_points=32",
            "data.dilation=[-3]",
            "train.batch_size=2",
            f"train.max_steps={steps}",
            f"train.log_interval={steps}",
            f"train.checkpoint_interval={steps}",
        ],
    )


def _batches(start_batch, size=32, image=(24, 28)):
    """Loader-like batches: uint8 frames padded beyond ``image`` (float32 for older code)."""
    uint8 = hasattr(data.loader, "batch_to_device")
    index = start_batch
    while True:
        g = torch.Generator().manual_seed(index)
        frames = torch.randint(0, 256, (2, 2, 3, size, size), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 8, (2, 2, size, size), generator=g)
        labels[..., image[0] :, :] = 255
        labels[..., image[1] :] = 255
        meta = [ClipMeta(f"v{i}", ["a", "b"], (size, size)) for i in range(2)]
        if uint8:
            for m in meta:
                m.image_size = image
        else:
            frames = (frames.float() - 120.0) / 58.0
        yield Batch(frames, labels, meta)
        index += 1


def _stand_in_loss(model, frames, labels, *, step):
    """Every output of the network, no criterion: what the model part of a step costs."""
    predictions = model(frames)
    total = frames.new_zeros(())
    for prediction_set in list(predictions.clip) + list(predictions.frame or []):
        total = total + prediction_set.mask_logits.float().mean()
        total = total + prediction_set.class_logits.float().pow(2).mean()
    return total, {}


def _resident(model) -> list[torch.Tensor]:
    """What lives on the GPU before a step: the model, and the normalisation constants that
    ``normalize_frames`` uploads once per device (if an earlier call cached them)."""
    from themask.data import transforms

    cached = getattr(transforms, "_STATS", {})
    return [*model.parameters(), *model.buffers(), *(t for pair in cached.values() for t in pair)]


def _by_direction(counts: Counter) -> dict[str, float]:
    return {d: sum(v for k, v in counts.items() if k.startswith(d)) for d in ("h2d", "d2h")}


def count_training_step(
    tmp_path, *, criterion: bool, steps: int = 3, preset: str = "themask_tiny_t2"
) -> dict[str, Counter]:
    """Transfers per optimizer step of the hot path (batch to device, forward, loss, backward,
    gradient clipping), leaving out the first step (one-time set-up) and ``optimizer.step``
    (AdamW's step counters live on the host); and those of all log flushes together."""
    from themask.engine import Trainer

    kwargs = {} if criterion else {"loss_fn": _stand_in_loss}
    trainer = Trainer(
        _cfg(steps, preset),
        tmp_path / f"run_{criterion}",
        device="cpu",
        batches=_batches,
        evaluate=False,
        progress=False,
        **kwargs,
    )
    counter = TransferCounter(_resident(trainer.model))
    buckets = {"step": Counter(), "flush": Counter()}

    def counted(method, bucket, sign=1, skip_first=True):
        def run(*args, **kw):
            before = Counter(counter.counts)
            try:
                return method(*args, **kw)
            finally:
                if not (skip_first and trainer.step == 0):
                    delta = Counter(counter.counts)
                    delta.subtract(before)
                    for key, value in delta.items():
                        buckets[bucket][key] += sign * value

        return run

    trainer._forward_backward = counted(trainer._forward_backward, "step")
    trainer._optimizer_step = counted(trainer._optimizer_step, "step")
    trainer.optimizer.step = counted(trainer.optimizer.step, "step", sign=-1)
    if hasattr(trainer, "_log_window"):
        trainer._log_window = counted(trainer._log_window, "flush", skip_first=False)
    with counter:
        trainer.train()
    per_step = Counter({k: v / (steps - 1) for k, v in buckets["step"].items() if v})
    return {"step": per_step, "flush": +buckets["flush"]}


def test_training_step_budget_without_the_criterion(tmp_path):
    counts = count_training_step(tmp_path, criterion=False)
    assert _by_direction(counts["step"]) == MODEL_STEP_BUDGET, counts["step"]
    assert _by_direction(counts["flush"]) == LOG_FLUSH_BUDGET, counts["flush"]


def test_training_step_budget_with_the_criterion(tmp_path):
    """The real objective adds the loss package's transfers (reworked on its own): a
    ceiling, so that these numbers can only go down."""
    counts = _by_direction(count_training_step(tmp_path, criterion=True)["step"])
    assert all(counts[d] <= CRITERION_STEP_BUDGET[d] for d in counts), counts


def test_metric_accumulation_reads_nothing_back_until_compute():
    from themask.evaluation.metrics import SegmentationAccumulator, VideoConsistencyAccumulator

    g = torch.Generator().manual_seed(0)
    seg = SegmentationAccumulator(num_classes=5)
    vc = VideoConsistencyAccumulator(2)
    frames = []
    for _ in range(4):
        pred = torch.randint(0, 5, (6, 7), generator=g)
        gt = torch.randint(0, 5, (6, 7), generator=g)
        gt[0, :3] = 255
        frames.append((pred, gt))
    with TransferCounter([seg.counts, vc.totals] + [x for pair in frames for x in pair]) as c:
        vc.start_video()
        for pred, gt in frames:
            seg.update(pred, gt)
            vc.update(pred, gt)
    assert not c.counts, c.counts
    vc.end_video()
    assert vc.totals[1] >= 1 and 0.0 <= seg.compute()["aAcc"] <= 1.0


def _count_evaluation(tmp_path, num_frames):
    from themask.data.toy import make_toy_dataset
    from themask.data.transforms import TestTransform
    from themask.data.vspw import VSPWIndex
    from themask.evaluation.evaluate import evaluate_split
    from themask.modeling.build import build_model

    root = make_toy_dataset(
        tmp_path / str(num_frames),
        num_train=1,
        num_val=2,
        num_frames=num_frames,
        val_frames=num_frames,
        size=(32, 48),
    )
    torch.manual_seed(0)
    model = build_model("themask_tiny_t2", num_classes=8)
    with TransferCounter(_resident(model)) as counter:
        evaluate_split(
            model,
            VSPWIndex(root, "val"),
            clip_len=2,
            transform=TestTransform(scale=(48, 32)),
            device="cpu",
            num_classes=8,
            progress=False,
        )
    return counter.counts


def test_evaluation_reads_back_per_split_not_per_frame(tmp_path):
    """Device reads happen once, in ``compute``: twice the frames, the same reads. Uploads
    (frames and masks: the data itself) grow with the frames."""
    short, long = _count_evaluation(tmp_path, 4), _count_evaluation(tmp_path, 8)
    assert _by_direction(short)["d2h"] == _by_direction(long)["d2h"], (short, long)
    assert _by_direction(long)["h2d"] > _by_direction(short)["h2d"]


def test_out_of_range_values_are_reported_by_compute():
    from themask.evaluation.metrics import SegmentationAccumulator

    seg = SegmentationAccumulator(num_classes=3)
    seg.update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="target values must be in \\[0, 3\\) or 255; 1 pixel"):
        seg.compute()
    seg = SegmentationAccumulator(num_classes=3)
    seg.update(torch.tensor([[0, 4]]), torch.tensor([[0, 255]]))  # bad prediction, ignored
    seg.update(torch.tensor([[5]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="predicted values must be in \\[0, 3\\); 1 pixel"):
        seg.compute()


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    name = sys.argv[1] if len(sys.argv) > 1 else "themask_tiny_t2"
    with tempfile.TemporaryDirectory() as tmp:
        for criterion in (False, True):
            counts = count_training_step(Path(tmp), criterion=criterion, preset=name)
            print(
                f"criterion={criterion}: per step {_by_direction(counts['step'])} "
                f"{dict(counts['step'])}; log flushes {dict(counts['flush'])}"
            )
        for frames in (4, 8):
            counts = _count_evaluation(Path(tmp), frames)
            print(f"evaluation of 2 videos x {frames} frames: {dict(counts)}")
