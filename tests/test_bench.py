import json

import pytest

from themask.cli import main
from themask.modeling.build import build_model


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_bench_reports_each_setting(tmp_path, mode):
    out = tmp_path / "bench.json"
    argv = ["bench", "--presets", "themask_tiny_t2", "--sizes", "64x96", "--runs", "2"]
    argv += ["--warmup", "0", "--threads", "1", "--mode", mode, "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == mode and report["threads"] == 1
    (row,) = report["results"]
    expected = sum(p.numel() for p in build_model("themask_tiny_t2").parameters()) / 1e6
    assert row["parameters_m"] == pytest.approx(expected, abs=0.005)
    assert row["size"] == "64x96" and row["frames"] == 2 and len(row["runs_ms"]) == 2
    assert row["ms_per_frame"] == pytest.approx(row["ms_per_clip"] / 2, abs=0.1)
    assert row["ratio_to_official"] is None  # no official number for the tiny preset

