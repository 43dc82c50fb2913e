"""Streaming evaluation on a tiny synthetic VSPW tree, with model stand-ins we control."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from naive import naive_sliding_windows
from PIL import Image
from torch import nn

from themask.data.vspw import VSPWIndex
from themask.evaluation.evaluate import evaluate_split
from themask.evaluation.metrics import scalar_metrics
from themask.evaluation.predict import StreamingPredictor

K = 4
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)


class ColourCodedModel(nn.Module):
    """Stand-in network: the red channel of the input encodes the class (value = 10 · class)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # (B, T, 3, H, W) → (B, T, K, H, W)
        assert not self.training
        self.calls += 1
        classes = (frames[:, :, 0] / 10).round().long().clamp(0, K - 1)
        return nn.functional.one_hot(classes, K).permute(0, 1, 4, 2, 3).float()


def identity_transform(frames):
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()


def _make_tree(root, rng, lengths=(10, 7, 3), size=(5, 6), void_flicker=False):
    """Videos whose predicted classes and raw GT both drift slowly over time.

    ``void_flicker``: the GT of the first row alternates between raw 0 and 255.
    """
    truth = {}
    names = []
    for v, num_frames in enumerate(lengths):
        name = f"{v}_vid"
        names.append(name)
        (root / "data" / name / "origin").mkdir(parents=True)
        (root / "data" / name / "mask").mkdir(parents=True)
        pred = rng.integers(0, K, size=size)
        raw = rng.choice([0, 1, 2, 3, 4, 255], size=size)
        preds, raws = [], []
        for t in range(num_frames):
            pred = pred.copy()
            raw = raw.copy()
            pred[rng.random(size) < 0.15] = rng.integers(0, K)
            raw[rng.random(size) < 0.1] = rng.choice([0, 1, 2, 3, 4, 255])
            if void_flicker:
                raw[0] = 255 if t % 2 else 0
            frame = np.zeros(size + (3,), dtype=np.uint8)
            frame[..., 0] = pred * 10
            frame[..., 1] = rng.integers(0, 255, size=size)  # noise the model ignores
            stem = f"{100 + t:08d}"
            Image.fromarray(frame).save(root / "data" / name / "origin" / f"{stem}.png")
            Image.fromarray(raw.astype(np.uint8), mode="L").save(
                root / "data" / name / "mask" / f"{stem}.png"
            )
            preds.append(pred)
            raws.append(raw)
        truth[name] = (preds, raws)
    (root / "val.txt").write_text("".join(n + "\n" for n in names))
    return truth


def _to_train_ids(raw):
    out = raw.astype(np.int64) - 1
    out[(raw == 0) | (raw == 255)] = 255
    return out


def _naive_vc(n, videos):
    values = []
    for gts, preds in videos:
        for i in range(len(gts) - n):  # N − n windows; none when N <= n
            g = np.stack(gts[i : i + n])
            p = np.stack(preds[i : i + n])
            stable_g = (g == g[0]).all(axis=0)
            stable_p = (p == p[0]).all(axis=0)
            if stable_g.sum():
                values.append((stable_g & stable_p).sum() / stable_g.sum())
    return sum(values) / len(values) if values else math.nan


@pytest.mark.parametrize("clip_len", [1, 2])
def test_evaluate_split_matches_independent_metrics(tmp_path, clip_len):
    truth = _make_tree(tmp_path / "vspw", np.random.default_rng(clip_len))
    index = VSPWIndex(tmp_path / "vspw", "val")
    model = ColourCodedModel().train()
    model.frozen = nn.Linear(1, 1).eval()  # as a trainer keeps frozen parts
    out_dir = tmp_path / "preds"
    results = evaluate_split(
        model,
        index,
        clip_len=clip_len,
        transform=identity_transform,
        device="cpu",
        num_classes=K,
        write_dir=out_dir,
        palette=PALETTE,
        vc_lengths=(3, 8),
        vc_rule="per_length",
        progress=False,
    )
    assert model.training and not model.frozen.training  # modes restored module by module
    conf = np.zeros((K, K), dtype=np.int64)
    for preds, raws in truth.values():
        for p, r in zip(preds, raws):
            g = _to_train_ids(r)
            valid = g != 255
            np.add.at(conf, (g[valid], p[valid]), 1)
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    present = conf.sum(1) > 0
    iou = inter / np.where(union > 0, union, 1)
    assert results["mIoU"] == pytest.approx(iou[union > 0].mean())
    assert results["mIoU_present"] == pytest.approx(iou[present].mean())
    freq = conf.sum(1) / conf.sum()
    assert results["WIoU"] == pytest.approx((freq * iou)[present].sum())
    assert results["aAcc"] == pytest.approx(inter.sum() / conf.sum())

    videos_train = [([_to_train_ids(r) for r in raws], preds) for preds, raws in truth.values()]
    assert results["mVC3"] == pytest.approx(_naive_vc(3, videos_train))
    assert results["mVC8"] == pytest.approx(_naive_vc(8, videos_train))
    assert results["num_videos"] == 3 and results["num_frames"] == 20

    for name, (preds, _) in truth.items():
        for t, p in enumerate(preds):
            written = Image.open(out_dir / name / f"{100 + t:08d}.png")
            assert written.mode == "P"
            np.testing.assert_array_equal(np.asarray(written), p)


def test_evaluate_split_raw_gt_mvc_differs_where_0_and_255_alternate(tmp_path):
    rng = np.random.default_rng(7)
    truth = _make_tree(tmp_path / "vspw", rng, lengths=(12,), void_flicker=True)
    index = VSPWIndex(tmp_path / "vspw", "val")
    results = evaluate_split(
        ColourCodedModel(),
        index,
        clip_len=1,
        transform=identity_transform,
        device="cpu",
        num_classes=K,
        vc_lengths=(3,),
        vc_rule="per_length",
        vc_gt="raw",
        progress=False,
    )
    videos_raw = [(raws, preds) for preds, raws in truth.values()]
    videos_train = [([_to_train_ids(r) for r in raws], preds) for preds, raws in truth.values()]
    assert results["mVC3"] == pytest.approx(_naive_vc(3, videos_raw))
    assert _naive_vc(3, videos_raw) != pytest.approx(_naive_vc(3, videos_train))


class _FeatureSpyModel(nn.Module):
    """Encode/decode stand-in: scores of a frame depend on every frame of its window."""

    is_temporal = True

    def __init__(self) -> None:
        super().__init__()
        self.encoded_frames = 0

    def encode(self, frames):  # (B, T, 3, H, W) → per-frame "features"
        self.encoded_frames += frames.shape[0] * frames.shape[1]
        return _Features(frames.flatten(0, 1) * 2.0)

    def decode(self, features, batch, frames):
        x = features.tensor.reshape(batch, frames, *features.tensor.shape[1:])
        return x + x.mean(dim=1, keepdim=True)  # mixes the window

    def semantic_scores(self, predictions, image_size):
        return predictions[..., : image_size[0], : image_size[1]]

    def forward(self, frames):
        return self.semantic_scores(
            self.decode(self.encode(frames), frames.shape[0], frames.shape[1]), frames.shape[-2:]
        )


class _Features:
    def __init__(self, tensor):
        self.tensor = tensor

    @staticmethod
    def cat(parts):
        return _Features(torch.cat([p.tensor for p in parts]))


@pytest.mark.parametrize("clip_len,step", [(1, 3), (2, 3), (3, 1)])
def test_streaming_predictor_windows_and_single_encoding(clip_len, step):
    torch.manual_seed(0)
    frames = torch.randn(9, 3, 4, 5)
    spy, reference = _FeatureSpyModel(), _FeatureSpyModel()
    predictor = StreamingPredictor(spy, clip_len=clip_len, step=step)
    windows = naive_sliding_windows(len(frames), clip_len, step=step)
    for t in range(len(frames)):
        scores = predictor.push(frames[t])
        expected = reference(frames[windows[t]][None])[0, -1]
        torch.testing.assert_close(scores, expected)
    assert spy.encoded_frames == len(frames)  # each frame encoded once


def test_eval_cli_reports_the_metrics_of_the_saved_model(tmp_path, capsys):
    import json

    from themask.cli import main
    from themask.config import load_config
    from themask.data.toy import make_toy_dataset
    from themask.evaluation.evaluate import evaluate_config
    from themask.modeling.build import build_model
    from themask.weights import load_model, save_model

    root = make_toy_dataset(tmp_path / "toy", num_train=1, num_val=2, num_frames=5, size=(32, 48))
    config = tmp_path / "run.yaml"
    config.write_text(
        "preset: themask_tiny_t2\n"
        f"data: {{root: {root}, scale: [48, 32], dilation: [-3], num_workers: 0}}\n"
    )
    torch.manual_seed(4)
    weights = tmp_path / "model.safetensors"
    save_model(build_model("themask_tiny_t2", num_classes=8), weights)
    out_json = tmp_path / "metrics.json"
    code = main(
        [
            "eval",
            str(config),
            "--weights",
            str(weights),
            "--json",
            str(out_json),
            "--device",
            "cpu",
            "--save-predictions",
            str(tmp_path / "preds"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Weighted IoU" in printed and "mVC8" in printed

    expected = evaluate_config(
        load_model(weights),
        load_config(config),
        split="val",
        clip_len=2,
        device="cpu",
        progress=False,
    )
    payload = json.loads(out_json.read_text())
    assert payload["clip_len"] == 2 and payload["split"] == "val"
    for key in ("mIoU", "mIoU_present", "WIoU", "aAcc", "mAcc"):
        assert payload["metrics"][key] == pytest.approx(expected[key])
    assert payload["metrics"]["num_frames"] == expected["num_frames"]
    written = list((tmp_path / "preds").glob("*/*.png"))
    assert len(written) == expected["num_frames"]


def _ddp_eval_worker(rank, world, init_file, root, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = evaluate_split(
            ColourCodedModel(),
            VSPWIndex(root, "val"),
            clip_len=2,
            transform=identity_transform,
            device="cpu",
            num_classes=K,
            vc_lengths=(3,),
            vc_rule="per_length",
            distributed=True,
            progress=False,
        )
        torch.save(scalar_metrics(results), f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_evaluation_splits_videos_and_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    _make_tree(tmp_path / "vspw", np.random.default_rng(3))
    single = evaluate_split(
        ColourCodedModel(),
        VSPWIndex(tmp_path / "vspw", "val"),
        clip_len=2,
        transform=identity_transform,
        device="cpu",
        num_classes=K,
        vc_lengths=(3,),
        vc_rule="per_length",
        progress=False,
    )
    args = (2, str(tmp_path / "init"), str(tmp_path / "vspw"), str(tmp_path))
    mp.spawn(_ddp_eval_worker, args=args, nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert got["num_frames"] == single["num_frames"] == 20
        assert got == pytest.approx(scalar_metrics(single))
