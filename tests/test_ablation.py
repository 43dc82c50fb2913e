"""benchmarks/ablation.py: the study runner writes the table, JSON and plot with the right rows;
benchmarks/synthetic_videos.py writes a VSPW-layout data set the reader accepts."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ablation = _load("ablation")
synthetic = _load("synthetic_videos")


def test_synthetic_videos_layout_and_labels(tmp_path):
    from themask.data.description import VSPW_DESCRIPTION
    from themask.data.vspw import VSPWIndex

    synthetic.make_synthetic_videos(tmp_path, num_train=3, num_val=1, frames=(17, 19))
    index = VSPWIndex(tmp_path, "train")
    assert len(index.videos) == 3
    seen = set()
    for video in index.videos:
        assert 17 <= len(video.frame_paths) == len(video.mask_paths) <= 19
        stored = np.asarray(Image.open(video.mask_paths[0]))
        train_ids = VSPW_DESCRIPTION.read_label(video.mask_paths[0])
        assert set(np.unique(stored)) <= set(range(13)) | {255}
        # stored value = train id + 1; 0 and 255 are ignored (255)
        np.testing.assert_array_equal(
            train_ids, np.where((stored == 0) | (stored == 255), 255, stored.astype(int) - 1)
        )
        classes = set(np.unique(train_ids).tolist()) - {255}
        assert len(classes) >= 3  # several classes per clip
        seen |= classes
    assert max(seen) < len(synthetic.CLASS_NAMES)


def test_summarise_mean_and_sample_std():
    runs = {"a": {0: {"mIoU": 0.1}, 1: {"mIoU": 0.3}}, "b": {4: {"mIoU": 0.5}}}
    summary = ablation.summarise(runs)
    assert summary["a"]["seeds"] == [0, 1]
    assert ablation.late_miou([(100, 0.1), (200, 0.2), (300, 0.4), (500, 0.6)]) == 0.5
    assert summary["a"]["mIoU"]["mean"] == pytest.approx(0.2)
    assert summary["a"]["mIoU"]["std"] == pytest.approx(math.sqrt(0.02))  # (0.1² + 0.1²) / 1
    assert summary["b"]["mIoU"] == {"mean": 0.5, "std": 0.0}
    assert math.isnan(summary["b"]["WIoU"]["mean"])


def test_runner_two_steps_one_seed_two_variants(tmp_path, one_thread):
    data = synthetic.make_synthetic_videos(tmp_path / "data", num_train=2, num_val=1)
    out = tmp_path / "study"
    args = ["--out", str(out), "--data", str(data), "--variants", "mask2former", "themask",
            "--seeds", "3", "--steps", "2", "--eval-every", "2", "--workers", "0"]  # fmt: skip
    assert ablation.main(args) == 0

    payload = json.loads((out / "ablation.json").read_text())
    assert list(payload["summary"]) == ["mask2former_q50", "themask_q50"]
    for name in payload["summary"]:
        run = payload["runs"][name]["3"]
        # the run's final result is its last validation record
        records = [json.loads(line) for line in (out / "runs" / name / "seed3" / "metrics.jsonl")
                   .read_text().splitlines()]  # fmt: skip
        last_eval = [r for r in records if r["tag"] == "eval"][-1]
        assert last_eval["step"] == 2 and run["curve"][-1] == [2, last_eval["mIoU"]]
        assert run["mIoU"] == pytest.approx(last_eval["mIoU"])
        assert payload["summary"][name]["mIoU"] == {"mean": run["mIoU"], "std": 0.0}
    baseline, themask = (payload["runs"][n]["3"] for n in payload["summary"])
    assert baseline["matched_fraction_round2"] == 0.0 and themask["matched_fraction_round2"] > 0
    assert math.isnan(baseline["round2_empty_fraction"])
    assert 0.0 <= themask["round2_empty_fraction"] <= 1.0

    table = (out / "ablation.md").read_text().splitlines()
    assert table[0].startswith("| run | seeds | mIoU |")
    rows = table[2:]
    assert len(rows) == 2
    assert rows[0].startswith("| one round, hard (Mask2Former), 50 queries | 1 |")
    assert rows[1].startswith("| two rounds, hierarchical (THE-Mask T=1), 50 queries | 1 |")
    assert (out / "ablation.png").stat().st_size > 0

    # --only-finished trains nothing: the unfinished variant is left out, the others reused
    again = [*args[:5], "mask2former", "two_rounds_hard", "themask", *args[7:], "--only-finished"]
    assert ablation.main(again) == 0
    assert not (out / "runs" / "two_rounds_hard_q50").exists()
    rerun = json.loads((out / "ablation.json").read_text())
    assert list(rerun["summary"]) == ["mask2former_q50", "themask_q50"]
    assert rerun["runs"] == payload["runs"]


def test_runner_rejects_unknown_variant(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "ablation.py"), "--out", str(tmp_path),
         "--variants", "nope"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--variants" in result.stderr and "nope" in result.stderr
