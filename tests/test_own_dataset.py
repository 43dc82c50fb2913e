"""One's own dataset end to end: a DAVIS-style folder with six named classes (label 0 a real
class, 255 ignored) and masks on every other frame only, described by ``dataset.yaml``."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from themask.cli import main
from themask.data.description import (
    DescriptionError,
    load_description,
    parse_description,
)
from themask.data.loader import VSPWTrainDataset
from themask.data.transforms import TrainTransform
from themask.data.vspw import DataError, VSPWIndex
from themask.evaluation.evaluate import evaluate_split
from themask.evaluation.metrics import PUBLISHED_VC_SKIP, VideoConsistencyAccumulator
from themask.modeling.build import build_model
from themask.weights import read_class_info, save_model

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent
H, W = 32, 32


@pytest.fixture(autouse=True)
def _fresh_log_handlers():
    """Drop the handlers of earlier CLI calls before and after each test (a run's log file is
    closed at once, and no handler outlives the test that made it)."""
    import logging

    def drop() -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, "_themask", False) or isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
                handler.close()

    drop()
    yield
    drop()


def _readme_block(marker: str) -> str:
    """The fenced block that follows ``<!-- marker`` in the README."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {marker}[^>]*-->\s*```\w*\n(.*?)```", text, re.S)
    assert found, f"README block {marker} not found"
    return found.group(1)


DESCRIPTION = yaml.safe_load(_readme_block("own-dataset-description"))


def _make_dataset(root: Path, *, num_classes: int = 6, frames: int = 8, videos=None) -> Path:
    """DAVIS-style folder: vid0, vid1 (train), vid2 (val) of ``frames`` frames; masks on even
    frames only; class c (stored value c, 0 included) fills a band, 255 a thin border."""
    videos = videos or {"train": ["vid0", "vid1"], "val": ["vid2"]}
    (root / "ImageSets").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, names in videos.items():
        (root / "ImageSets" / f"{split}.txt").write_text("".join(n + "\n" for n in names))
        for v, name in enumerate(names):
            (root / "JPEGImages" / name).mkdir(parents=True)
            (root / "Annotations" / name).mkdir(parents=True)
            for t in range(frames):
                label = np.zeros((H, W), np.uint8)
                for c in range(num_classes):
                    label[:, (c * W) // num_classes : ((c + 1) * W) // num_classes] = c
                label = np.roll(label, t + v, axis=1)
                label[0] = 255
                frame = np.stack([label * 40, rng.integers(0, 255, (H, W)), label], -1) % 256
                stem = f"{t:05d}"
                Image.fromarray(frame.astype(np.uint8)).save(
                    root / "JPEGImages" / name / f"{stem}.jpg"
                )
                if t % 2 == 0:
                    Image.fromarray(label).save(root / "Annotations" / name / f"{stem}.png")
    values = dict(DESCRIPTION)
    if num_classes != 6:
        values["classes"] = [f"c{i}" for i in range(num_classes)]
        values["palette"] = None
    (root / "dataset.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    return root


@pytest.fixture
def my_data(tmp_path):
    return _make_dataset(tmp_path / "my_data")


def _set_field(root: Path, **fields) -> None:
    values = yaml.safe_load((root / "dataset.yaml").read_text())
    values.update(fields)
    (root / "dataset.yaml").write_text(yaml.safe_dump(values, sort_keys=False))


def test_check_data_passes_and_prints_the_class_names(my_data, capsys):
    assert main(["check-data", str(my_data)]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out
    assert (
        "train: 2 videos, 16 frames, 8 masks" in out and "val: 1 videos, 8 frames, 4 masks" in out
    )
    for i, name in enumerate(DESCRIPTION["classes"]):
        # id, name, stored value, masks holding it (every mask holds every class)
        assert re.search(rf"^\s+{i}\s+{name}\s+{i}\s+12\s", out, re.M), name


def test_check_data_names_a_planted_value_and_its_mask(my_data, capsys):
    bad = my_data / "Annotations" / "vid1" / "00004.png"
    label = np.array(Image.open(bad))
    label[5, 5] = 9
    Image.fromarray(label).save(bad)
    assert main(["check-data", str(my_data)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}: stored values must be classes 0..5 or ignored values (255), found 9" in out
    assert "(INVALID)" in out


def test_dense_description_refuses_the_missing_masks(my_data, capsys):
    _set_field(my_data, sparse=False)
    assert main(["check-data", str(my_data)]) == 1
    out = capsys.readouterr().out
    missing = my_data / "Annotations" / "vid0" / "00001.png"
    assert f"{missing}: mask missing for frame 00001.jpg (dataset is not sparse)" in out
    with pytest.raises(DataError, match="mask missing"):
        VSPWIndex(my_data, "train")


def test_check_data_names_a_video_with_mixed_frame_sizes(my_data, capsys):
    Image.new("RGB", (48, 40)).save(my_data / "JPEGImages" / "vid2" / "00005.jpg")
    assert main(["check-data", str(my_data)]) == 1
    out = capsys.readouterr().out
    assert "video vid2 has frames of different sizes: 32x32" in out and "48x40" in out


def test_sparse_training_clips_target_labelled_frames_and_ignore_the_others(my_data):
    index = VSPWIndex(my_data, "train")
    assert index.videos[0].labelled_indices == [0, 2, 4, 6]
    transform = TrainTransform(scale=(32, 32), crop_size=(32, 32), photometric=False)
    dataset = VSPWTrainDataset(
        index.videos, dilation=[-3], transform=transform, description=index.description
    )
    targets = set()
    for sample_id in range(40):
        sample = dataset[(sample_id % 2, sample_id)]
        indices = sample.meta.frame_indices
        assert indices[-1] % 2 == 0  # the target frame (last) has a mask
        targets.add(indices[-1])
        for i, labels in zip(indices, sample.labels):
            assert bool((labels == 255).all()) == (i % 2 == 1)
    assert targets == {0, 2, 4, 6}  # frame 0 is a target of reversed clips


def _shipped_config(name: str) -> Path:
    """A README config argument: a checkout path or a shipped config's name."""
    for path in (REPO / name, REPO / "themask" / "configs" / name):
        for candidate in (path, path.with_name(path.name + ".yaml")):
            if candidate.is_file():
                return candidate
    raise AssertionError(f"README config {name} not found")


def _run_readme_commands(root: Path, tmp_path: Path, capsys) -> dict[str, str]:
    """Run the README's commands on ``root`` (my_data) at test sizes; returns stdout by command."""
    tiny = [
        "preset=themask_tiny_t1",
        "data.scale=[32,32]",
        "data.crop_size=[32,32]",
        "data.num_workers=0",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.eval_interval=0",
        "train.eval_at_end=false",
        "loss.num_points=32",
    ]
    outputs = {}
    for line in _readme_block("own-dataset-commands").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        argv = shlex.split(line)
        assert argv[0] == "themask"
        argv = [re.sub(r"^(data\.root=)?my_data", rf"\g<1>{root}", a) for a in argv[1:]]
        argv = [str(tmp_path / a) if a.startswith(("runs/", "pred/")) else a for a in argv]
        if argv[0] in ("train", "eval"):
            argv[1] = str(_shipped_config(argv[1]))
            argv[2:2] = tiny
        if argv[0] == "eval":
            argv += ["--json", str(tmp_path / "metrics.json")]
        assert main(argv) == 0, argv
        outputs[argv[0]] = capsys.readouterr().out
    return outputs


def test_readme_worked_example_trains_evaluates_and_predicts(my_data, tmp_path, capsys):
    outputs = _run_readme_commands(my_data, tmp_path, capsys)
    assert set(outputs) == {"check-data", "train", "eval", "predict"}
    weights = tmp_path / "runs" / "my_data" / "model.safetensors"
    names, palette = read_class_info(weights)
    assert names == DESCRIPTION["classes"] and palette.tolist() == DESCRIPTION["palette"]

    # eval scores exactly the labelled frames (4 of the 8 frames of vid2)
    metrics = yaml.safe_load((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["num_frames"] == 4 and metrics["num_videos"] == 1
    assert sorted(metrics["per_class"]) == sorted(DESCRIPTION["classes"])
    assert "4 frames scored" in outputs["eval"] and "tree" in outputs["eval"]

    # predict (no config) writes every frame with the dataset's palette
    pred = tmp_path / "pred"
    labels = sorted((pred / "labels").glob("*.png"))
    assert [p.stem for p in labels] == [f"{t:05d}" for t in range(8)]
    assert len(list((pred / "overlays").iterdir())) == 8
    written = Image.open(labels[0])
    assert written.mode == "P"
    stored = np.array(written.getpalette()[: 3 * 6]).reshape(6, 3)
    assert stored.tolist() == DESCRIPTION["palette"]


def test_weights_of_another_class_count_are_refused_by_eval_and_fine_tune(tmp_path, capsys):
    data4 = _make_dataset(tmp_path / "four", num_classes=4)
    assert load_description(data4).num_classes == 4
    source = build_model("themask_tiny_t1", num_classes=6)
    weights6 = tmp_path / "six.safetensors"
    save_model(source, weights6, class_names=DESCRIPTION["classes"])
    config = tmp_path / "run.yaml"
    config.write_text(
        "preset: themask_tiny_t1\nloss: {num_points: 32}\n"
        "data: {dilation: [0], scale: [32, 32], crop_size: [32, 32], num_workers: 0}\n"
        "train: {max_steps: 1, batch_size: 1, eval_at_end: false}\n"
    )
    code = main(["eval", str(config), f"data.root={data4}", "--weights", str(weights6)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("themask eval:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1
    assert "predicts 6 classes" in errors[0] and "has 4" in errors[0] and str(data4) in errors[0]

    out = tmp_path / "tuned"
    argv = ["train", str(config), f"data.root={data4}", "--out", str(out)]
    assert main([*argv, "--init-from", str(weights6), "--no-eval"]) == 0
    log = (out / "train.log").read_text()
    assert "class layers re-initialised for 4 classes: decoder.clip_head.class_embed.bias" in log
    from themask.weights import load_model

    tuned = load_model(out / "model.safetensors")
    assert tuned.num_classes == 4
    assert read_class_info(out / "model.safetensors")[0] == ["c0", "c1", "c2", "c3"]


def _naive_vc(n: int, videos, skip_up_to: int) -> float:
    values = []
    for gts, preds in videos:
        if len(gts) <= skip_up_to:
            continue
        for i in range(len(gts) - n):
            g, p = np.stack(gts[i : i + n]), np.stack(preds[i : i + n])
            stable_g, stable_p = (g == g[0]).all(0), (p == p[0]).all(0)
            if stable_g.sum():
                values.append((stable_g & stable_p).sum() / stable_g.sum())
    return float(np.mean(values)) if values else math.nan


def test_mvc8_of_a_12_frame_video_follows_the_published_rule():
    rng = np.random.default_rng(3)

    def drifting(n: int, flips: int) -> list:  # each map = the previous one, a few pixels changed
        maps = [rng.integers(0, 3, (6, 6))]
        for _ in range(n - 1):
            nxt = maps[-1].copy()
            nxt.flat[rng.integers(0, 36, flips)] = rng.integers(0, 3, flips)
            maps.append(nxt)
        return maps

    videos = [(drifting(n, 1), drifting(n, 2)) for n in (12, 20)]
    results = {}
    for rule, skip in (("published", PUBLISHED_VC_SKIP), ("per_length", None)):
        accs = {n: VideoConsistencyAccumulator(n, skip_up_to=skip) for n in (8, 16)}
        for gts, preds in videos:
            for acc in accs.values():
                acc.start_video()
                for g, p in zip(gts, preds):
                    acc.update(p, g)
                acc.end_video()
        results[rule] = {n: acc.compute() for n, acc in accs.items()}
    # published (VSS-CFFM VC_perclip.py): the 12-frame video is left out of mVC8 and mVC16
    assert results["published"][8] == pytest.approx(_naive_vc(8, videos[1:], 0))
    assert results["published"][16] == pytest.approx(_naive_vc(16, videos[1:], 0))
    assert not math.isnan(results["published"][16])
    # per-length rule: the 12-frame video adds its 4 windows to mVC8
    assert results["per_length"][8] == pytest.approx(_naive_vc(8, videos, 8))
    assert results["per_length"][8] != pytest.approx(results["published"][8])
    assert results["per_length"][16] == pytest.approx(results["published"][16])


def test_init_description_drafts_a_description_from_the_masks(my_data, capsys):
    (my_data / "dataset.yaml").unlink()
    assert main(["check-data", str(my_data), "--init-description"]) == 0
    draft = my_data / "dataset.yaml"
    assert "Stored mask values found: 0" in draft.read_text()
    description = parse_description(yaml.safe_load(draft.read_text()), str(draft))
    assert description.classes == tuple(f"class_{v}" for v in range(6))
    assert description.ignore_values == (255,) and description.label_offset == 0
    assert description.frames == "JPEGImages/{video}" and description.sparse
    assert description.splits == {"train": "ImageSets/train.txt", "val": "ImageSets/val.txt"}
    capsys.readouterr()
    assert main(["check-data", str(my_data)]) == 0  # the draft validates as is
    assert main(["check-data", str(my_data), "--init-description"]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"classes": None}, "field 'classes': expected a list of 1..255 non-empty names"),
        ({"palette": [[0, 0, 0]]}, "field 'palette': expected 6 [R, G, B] triples"),
        ({"label_offset": 251}, "field 'label_offset': expected 0..250"),
        ({"ignore_values": [0]}, "field 'ignore_values': expected no class value (0..5)"),
        ({"frames": "JPEGImages"}, "field 'frames': expected a folder pattern containing {video}"),
        ({"sparse": "yes"}, "field 'sparse': expected true or false"),
        ({"colours": 3}, "unknown field(s) ['colours']"),
    ],
)
def test_a_malformed_description_names_the_file_and_the_field(my_data, fields, message):
    _set_field(my_data, **fields)
    with pytest.raises(DescriptionError) as err:
        load_description(my_data)
    assert str(err.value).startswith(f"{my_data / 'dataset.yaml'}: ") and message in str(err.value)


def test_train_refuses_a_malformed_description_in_one_line(my_data, tmp_path, capsys):
    values = yaml.safe_load((my_data / "dataset.yaml").read_text())
    del values["classes"]
    (my_data / "dataset.yaml").write_text(yaml.safe_dump(values))
    config = REPO / "configs" / "vspw" / "themask_mit_b1_t1.yaml"
    code = main(["train", str(config), f"data.root={my_data}", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "field 'classes' is missing" in err and not (tmp_path / "r").exists()


def test_make_toy_data_writes_its_description_and_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "toy"
    argv = ["make-toy-data", str(out), "--train-videos", "1", "--val-videos", "1"]
    argv += ["--frames", "4", "--height", "16", "--width", "16"]
    assert main(argv) == 0
    assert load_description(out).classes[0] == "stripes"
    (out / "train.txt").write_text("mine\n")
    assert main(argv) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "train.txt").read_text() == "mine\n"  # untouched
    assert main([*argv, "--force"]) == 0 and (out / "train.txt").read_text() != "mine\n"


class _RedChannelModel(torch.nn.Module):
    """Stand-in network: the red channel of the input is 10 x the predicted class."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # (B, T, 3, H, W) -> (B, T, K, H, W)
        classes = (frames[:, :, 0] / 10).round().long().clamp(0, 5)
        return torch.nn.functional.one_hot(classes, 6).permute(0, 1, 4, 2, 3).float()


def test_evaluation_scores_only_the_masked_frames_and_mvc_sees_only_them(tmp_path):
    """20 frames, masks on the even ones: the metrics equal a naive computation over the 10
    masked frames, whatever is predicted on the others (random there)."""
    root = tmp_path / "sparse"
    rng = np.random.default_rng(5)
    (root / "JPEGImages" / "v").mkdir(parents=True)
    (root / "Annotations" / "v").mkdir(parents=True)
    (root / "val.txt").write_text("v\n")
    (root / "dataset.yaml").write_text(yaml.safe_dump(dict(DESCRIPTION, splits={"val": "val.txt"})))
    gt, pred, gts, preds = rng.integers(0, 6, (6, 6)), rng.integers(0, 6, (6, 6)), [], []
    for t in range(20):
        gt, pred = gt.copy(), pred.copy()
        gt.flat[rng.integers(0, 36)] = rng.choice([0, 3, 255])
        pred.flat[rng.integers(0, 36, 2)] = rng.integers(0, 6, 2)
        shown = pred if t % 2 == 0 else rng.integers(0, 6, (6, 6))  # junk on unmasked frames
        frame = np.zeros((6, 6, 3), np.uint8)
        frame[..., 0] = shown * 10
        Image.fromarray(frame).save(root / "JPEGImages" / "v" / f"{t:05d}.png")
        if t % 2 == 0:
            Image.fromarray(gt.astype(np.uint8)).save(root / "Annotations" / "v" / f"{t:05d}.png")
            gts.append(gt)
            preds.append(pred)
    results = evaluate_split(
        _RedChannelModel(),
        VSPWIndex(root, "val"),
        clip_len=2,
        transform=lambda frames: torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float(),
        device="cpu",
        vc_lengths=(3,),
        vc_rule="per_length",
        progress=False,
    )
    assert results["num_frames"] == 10 and results["num_videos"] == 1
    g, p = np.stack(gts).ravel(), np.stack(preds).ravel()
    valid = g != 255
    assert results["aAcc"] == pytest.approx(float((g[valid] == p[valid]).mean()))
    # train ids = stored values here (offset 0); mVC over the masked frames as one sequence
    assert results["mVC3"] == pytest.approx(_naive_vc(3, [(gts, preds)], 3))
