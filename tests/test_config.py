from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from themask.config import (
    ConfigError,
    RunConfig,
    TrainConfig,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from themask.modeling.build import preset_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "themask" / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*/*.yaml"))


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_parse_overrides_yaml_scalars_and_nesting():
    parsed = parse_overrides(
        ["train.lr=2e-4", "data.dilation=[-3]", "loss.num_rounds=1", "eval.max_videos=null"]
    )
    assert parsed == {
        "train": {"lr": "2e-4"},  # PyYAML reads exponent-without-dot as a string...
        "data": {"dilation": [-3]},
        "loss": {"num_rounds": 1},
        "eval": {"max_videos": None},
    }
    cfg = load_config(None, ["train.lr=2e-4", "data.dilation=[-3]", "loss.num_rounds=1"])
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)  # ...the config converts it
    assert cfg.data.dilation == (-3,)
    assert cfg.loss.num_rounds == 1
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])
    # configs saved while the objective lived in the model section still load
    old = load_config(None, ["model.loss.num_rounds=1", "model.hidden_dim=128"])
    assert old.loss.num_rounds == 1 and old.model.hidden_dim == 128


def test_file_then_overrides_then_round_trip(tmp_path):
    path = _write(
        tmp_path,
        "preset: themask_tiny_t1\n"
        "model:\n  drop_path_rate: 0.0\nloss: {num_rounds: 1, second_round_loss: hard}\n"
        "data:\n  dilation: [0]\n  crop_size: [64, 64]\n"
        "train:\n  max_steps: 50\n  batch_size: 4\n  freeze: [backbone]\n",
    )
    cfg = load_config(path, ["train.max_steps=70", "train.amp=bf16"])
    assert cfg.preset == "themask_tiny_t1"
    preset = preset_config("themask_tiny_t1")
    assert cfg.model.hidden_dim == preset.hidden_dim  # preset fills the untouched fields
    assert cfg.model.drop_path_rate == 0.0 and cfg.loss.second_round_loss == "hard"
    assert cfg.data.crop_size == (64, 64)
    assert cfg.train.max_steps == 70 and cfg.train.batch_size == 4 and cfg.train.amp == "bf16"
    assert cfg.train.freeze == ["backbone"]
    assert cfg.train.lr == RunConfig().train.lr  # default kept

    saved = tmp_path / "out" / "config.yaml"
    save_config(cfg, saved)
    again = load_config(saved)
    assert again == cfg
    assert yaml.safe_load(saved.read_text()) == to_dict(cfg)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lrr=1", ["train.lrr", "'lr'", "max_steps"]),
        ("trian.lr=1", ["trian", "train"]),
        ("loss.rounds=1", ["loss.rounds", "num_rounds"]),
        ("train.max_steps=abc", ["train.max_steps", "integer"]),
        ("train.amp=fp32", ["train.amp", "bf16"]),
        ("train.freeze=[decoder]", ["train.freeze", "pixel_decoder"]),
        ("data.ratio_range=[2.0, 1.0]", ["data", "ratio_range"]),
        ("model.backbone_depths=[1, 1]", ["model.backbone_depths", "4 values"]),
        ("preset=no_such_model", ["preset", "no_such_model"]),
        ("model.num_classes=10", ["model.num_classes", "124"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for word in words:
        assert word in str(info.value)


def test_bad_file_mentions_the_file(tmp_path):
    path = _write(tmp_path, "train:\n  max_step: 5\n")
    with pytest.raises(ConfigError, match="run.yaml.*train.max_step"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_temporal_model_must_match_clip_length():
    with pytest.raises(ConfigError, match="num_frames"):
        load_config(None, ["preset=themask_tiny_t2", "data.dilation=[0]"])


def test_per_process_batch():
    train = TrainConfig(batch_size=8, grad_accum=1)
    assert [train.per_process_batch(w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert TrainConfig(batch_size=8, grad_accum=2).per_process_batch(2) == 2
    with pytest.raises(ConfigError, match="world_size"):
        train.per_process_batch(3)


def test_shipped_configs_exist():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in SHIPPED}
    for b in (0, 1, 2, 5):
        assert f"vspw/themask_mit_b{b}_t1.yaml" in names
        assert f"vspw/themask_mit_b{b}_t2.yaml" in names
    expected = {"vspw/mask2former_mit_b1.yaml", "toy/themask_toy.yaml", "toy/mask2former_toy.yaml"}
    assert expected <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.batch_size == 8 or path.parent.name == "toy"
    if path.parent.name == "vspw":
        assert cfg.preset == path.stem  # one config per preset
        stage2 = path.stem.endswith("_t2")
        assert cfg.data.num_frames == (2 if stage2 else 1)
        if stage2:  # docs/DESIGN.md §6: 12k steps from stage 1, decoder only, dilation [-3]
            assert cfg.train.max_steps == 12_000 and cfg.data.dilation == (-3,)
            assert cfg.train.freeze == ["backbone", "pixel_decoder"]
            assert cfg.train.init_from and cfg.train.head_init == "official"
        else:
            assert cfg.train.max_steps == 160_000 and not cfg.train.freeze
        assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.05
        assert cfg.train.backbone_lr_mult == 0.1 and cfg.train.clip_grad_norm == 0.01


def test_train_config_checks_itself_when_built_in_python():
    # not only when loaded from YAML: a TrainConfig made by hand for a Trainer is checked too
    with pytest.raises(ConfigError, match="max_steps must be positive"):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainConfig(batch_size=8, grad_accum=3)
