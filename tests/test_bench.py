"""benchmarks/bench.py: FLOP counting, matmul throughput, and the script's JSON report."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from themask.cli import SHAPE_CACHES
from themask.modeling import linear as linear_module
from themask.modeling.build import build_model
from themask.modeling.linear import Linear

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
count_flops, matmul_flops_per_second = bench.count_flops, bench.matmul_flops_per_second


def test_flop_count_of_known_ops_matches_the_hand_count():
    x, weight = torch.randn(4, 8), torch.randn(16, 8)
    assert count_flops(lambda: F.linear(x, weight)) == 2 * 4 * 8 * 16
    image, kernel = torch.randn(1, 3, 8, 8), torch.randn(5, 3, 3, 3)
    # every output pixel (padding 1 keeps 8×8) takes 3·3·3 multiply-adds per output channel
    assert count_flops(lambda: F.conv2d(image, kernel, padding=1)) == 2 * 5 * 8 * 8 * 27
    assert count_flops(lambda: x.relu()) == 0  # elementwise ops are not counted
    # themask's layers: oneDNN's inner product on CPU, counted like F.linear (3-D input too)
    layer = Linear(8, 16)
    with torch.no_grad():
        assert count_flops(lambda: layer(x[None].expand(3, -1, -1))) == 3 * 2 * 4 * 8 * 16


def test_matmul_throughput_is_positive_and_finite():
    rate = matmul_flops_per_second(torch.float32, "cpu", size=64, runs=1)
    assert 0 < rate < float("inf")


def _bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(BENCH), "--presets", "themask_tiny_t2", "--sizes", "64x96"]
    argv += ["--runs", "2", "--warmup", "0", "--threads", "1", *args, "--json", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def _check_efficiency(row):
    assert row["gflop"] > 0 and row["gflops_per_s"] > 0
    seconds = row["ms_per_call"] / 1000
    assert row["gflops_per_s"] == pytest.approx(row["gflop"] / seconds, rel=0.05)
    for dtype, fraction in row["fraction_of_matmul"].items():
        assert fraction == pytest.approx(
            row["gflops_per_s"] / row["matmul_gflops"][dtype], rel=0.05, abs=1e-3
        )
    assert "fp32" in row["fraction_of_matmul"]


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_bench_reports_each_setting(tmp_path, mode):
    report = _bench(tmp_path, "--mode", mode)
    assert report["mode"] == mode and report["threads"] == 1 and report["device"] == "cpu"
    (row,) = report["results"]
    expected = sum(p.numel() for p in build_model("themask_tiny_t2").parameters()) / 1e6
    assert row["parameters_m"] == pytest.approx(expected, abs=0.005)
    assert row["size"] == "64x96" and row["frames"] == 2 and len(row["runs_ms"]) == 2
    assert row["ms_per_frame"] == pytest.approx(row["ms_per_call"] / 2, abs=0.1)
    _check_efficiency(row)
    assert "ratio_to_official" not in row  # no constants from another machine


def test_bench_stream_has_a_pytorch_and_an_onnxruntime_row(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    report = _bench(tmp_path, "--mode", "stream")
    torch_row, ort_row = report["results"]
    assert (torch_row["engine"], ort_row["engine"]) == ("torch", "onnxruntime")
    for row in (torch_row, ort_row):
        assert row["ms_per_frame"] == row["ms_per_call"] > 0 and row["peak_mib"] > 0
        _check_efficiency(row)
    assert ort_row["gflop"] == torch_row["gflop"]  # the same work, counted once


INTERLEAVED = BENCH.with_name("interleaved.py")


def _interleaved(*args: str) -> subprocess.CompletedProcess:
    common = ["--preset", "themask_tiny_t2", "--size", "32x48", "--threads", "1", "--pairs", "2"]
    command = [sys.executable, str(INTERLEAVED), *common, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_interleaved_times_a_tree_in_fp32_and_under_bf16_autocast():
    here = str(BENCH.parents[1])
    done = _interleaved(
        "--mode", "infer", "--trees", f"fp32={here}", f"bf16={here}", "--bf16", "bf16"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["bf16"] == ["bf16"] and set(report["median_ms"]) == {"fp32", "bf16"}
    assert all(ms > 0 for ms in report["median_ms"].values())
    ratio = report["bf16/fp32"]
    assert 0 < ratio["q1"] <= ratio["median"] <= ratio["q3"]


def test_interleaved_rejects_a_bf16_name_that_is_not_a_tree():
    done = _interleaved("--trees", f"now={BENCH.parents[1]}", "--bf16", "nwo")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "interleaved.py: --bf16 nwo: not a tree of --trees"


def test_heap_layout_reports_where_each_calls_output_lands():
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    script = BENCH.with_name("heap_layout.py")
    argv = [sys.executable, str(script), "--preset", "themask_tiny_t2", "--size", "64x96"]
    done = subprocess.run([*argv, "--calls", "3", "--threads", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in done.stdout.splitlines()]
    assert [c["call"] for c in calls] == [0, 1, 2]
    classes = build_model("themask_tiny_t2").num_classes
    for c in calls:  # the (1, 2, K, 64, 96) float32 scores, counted by hand
        assert c["output_mib"] == round(2 * classes * 64 * 96 * 4 / 2**20, 1)
        assert 0 <= c["in_use_mib"] <= c["heap_mib"]
        assert 0 <= c["input_at_mib"] < c["heap_mib"] and c["output_at_mib"] >= 0
    peaks = [c["peak_rss_mib"] for c in calls]
    assert peaks == sorted(peaks)  # a peak never falls


@pytest.mark.skipif(not linear_module.ENABLED, reason="products on oneDNN only on x86 CPUs")
def test_the_cache_capacities_eval_and_predict_set_bound_the_heap_kept_per_size():
    """oneDNN's and ideep's caches keep ~250 KiB per input shape: 20 sizes of the tiny model keep
    about 200 MiB at their default 1024 entries, about 80 at the 256 that ``themask eval`` /
    ``predict`` set (tests/test_cli.py)."""
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    script = BENCH.with_name("shape_caches.py")
    kept = {}
    for entries in ("256", "1024"):
        env = {**os.environ, **dict.fromkeys(SHAPE_CACHES, entries)}
        argv = [sys.executable, str(script), "--preset", "themask_tiny_t2", "--sizes", "20"]
        done = subprocess.run([*argv, "--threads", "1"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        last = json.loads(done.stdout.splitlines()[-1])
        assert last["sizes"] == 20 and [last[name] for name in SHAPE_CACHES] == [entries] * 2
        kept[entries] = last["kept_mib"]
    if kept["1024"] < 20:
        pytest.skip(f"oneDNN kept only {kept['1024']:.0f} MiB for 20 sizes on this CPU")
    assert kept["256"] < 0.6 * kept["1024"]
