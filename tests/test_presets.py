"""Presets: names, configuration switches, and parameter counts against docs/DESIGN.md §7."""

from __future__ import annotations

import pytest
import torch

from themask.loss.config import LossConfig
from themask.modeling import build

VARIANTS = [f"mit_b{i}" for i in range(6)]
EXPECTED_NAMES = (
    [f"themask_{v}_t1" for v in VARIANTS]
    + [f"themask_{v}_t2" for v in VARIANTS]
    + [f"mask2former_{v}" for v in VARIANTS]
    + ["themask_tiny_t1", "themask_tiny_t2", "mask2former_tiny"]
)
# docs/DESIGN.md §7: official counts (M) of the single-frame (t1) and TAD (t2) models;
# paper: B5 t = 2.
EXPECTED_MILLIONS = {
    "themask_mit_b0_t1": 23.03,
    "themask_mit_b1_t1": 32.99,
    "themask_mit_b2_t1": 44.03,
    "mask2former_mit_b0": 23.03,
    "mask2former_mit_b1": 32.99,
    "mask2former_mit_b2": 44.03,
    "themask_mit_b0_t2": 26.22,
    "themask_mit_b1_t2": 36.18,
    "themask_mit_b2_t2": 47.23,
}


def test_list_presets_names():
    assert build.list_presets() == sorted(EXPECTED_NAMES)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_preset_switches(name):
    config, loss = build.preset_config(name), build.preset_loss_config(name)
    assert config.num_classes == 124
    if name.endswith("_t2"):
        assert (config.decoder, config.num_frames) == ("temporal", 2)
        assert (loss.num_rounds, loss.second_round_loss) == (2, "soft")
        assert loss.second_round_cost == "full"
    elif name.endswith("_t1"):
        assert (config.decoder, config.num_frames) == ("single", 1)
        assert (loss.num_rounds, loss.second_round_loss) == (2, "soft")
        assert loss.second_round_cost == "bce"
    else:
        assert (config.decoder, config.num_frames) == ("single", 1)
        assert (loss.num_rounds, loss.second_round_loss) == (1, "hard")
    if "tiny" in name:
        assert loss.num_points < LossConfig().num_points
    else:
        assert config.backbone == name.split("_")[1] + "_" + name.split("_")[2]
        assert config.hidden_dim == 256 and config.num_queries == 100
        assert loss.num_points == 12544


def test_overrides_and_errors():
    config = build.preset_config("themask_mit_b1_t2", num_classes=7, num_frames=4)
    loss = build.preset_loss_config("themask_mit_b1_t2", num_rounds=1)
    assert (config.num_classes, config.num_frames, loss.num_rounds) == (7, 4, 1)
    assert loss.second_round_cost == "full"  # untouched preset loss field stays
    assert build.preset_config("themask_mit_b1_t2").num_frames == 2  # presets are not mutated
    assert build.preset_loss_config("themask_mit_b1_t2").num_rounds == 2
    # the network config describes the network: the baseline shares the stage-1 network
    assert build.preset_config("mask2former_tiny") == build.preset_config("themask_tiny_t1")
    with pytest.raises(ValueError, match="unknown preset"):
        build.preset_loss_config("themask_mit_b9")
    with pytest.raises(ValueError, match="unknown preset"):
        build.preset_config("themask_mit_b9")
    with pytest.raises(ValueError, match="hidden_dims"):
        build.preset_config("themask_tiny_t1", hidden_dims=3)


@pytest.mark.parametrize("name", ["themask_tiny_t1", "themask_tiny_t2", "mask2former_tiny"])
def test_tiny_presets_build(name):
    model = build.build_model(name, num_classes=5)
    assert model.is_temporal == name.endswith("_t2")
    assert model.config.num_classes == 5
    assert model.decoder.clip_head.class_embed.out_features == 6
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


@pytest.fixture(scope="module")
def parameter_counts():
    """(backbone, rest) parameter counts of every full-size preset, built on the meta device
    (shapes only: no memory, no initialisation cost)."""
    counts = {}
    for name in EXPECTED_NAMES:
        if "tiny" in name:
            continue
        with torch.device("meta"):
            model = build.build_model(name)
        backbone = sum(p.numel() for p in model.backbone.parameters())
        counts[name] = (backbone, sum(p.numel() for p in model.parameters()) - backbone)
    return counts


def test_parameter_counts_match_design(parameter_counts):
    for name, millions in EXPECTED_MILLIONS.items():
        backbone, heads = parameter_counts[name]
        assert abs((backbone + heads) / 1e6 - millions) <= 0.5, (name, backbone + heads)


def test_parameter_counts_are_consistent_across_presets(parameter_counts):
    # the TAD adds the same 3.19 M to every backbone; t1 and mask2former share one network
    for variant in VARIANTS:
        t1 = parameter_counts[f"themask_{variant}_t1"][1]
        t2 = parameter_counts[f"themask_{variant}_t2"][1]
        assert parameter_counts[f"mask2former_{variant}"][1] == t1
        assert abs((t2 - t1) / 1e6 - 3.19) < 0.01
    # B1..B5 share the stage widths, so their heads are identical; depth grows B1 → B5
    for suffix in ("t1", "t2"):
        assert len({parameter_counts[f"themask_{v}_{suffix}"][1] for v in VARIANTS[1:]}) == 1
    backbones = [parameter_counts[f"themask_{v}_t1"][0] for v in VARIANTS[1:]]
    assert backbones == sorted(backbones) and len(set(backbones)) == 5
