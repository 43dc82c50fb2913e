"""Run configuration dataclasses: defaults, the preset's, a YAML file, then key=value overrides."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from themask.data.config import DataConfig
from themask.io import PathLike, atomic_write
from themask.loss.config import LossConfig
from themask.modeling.config import ModelConfig

_SCALARS = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


class ConfigError(ValueError):
    """A run configuration (file or override) is invalid."""


@dataclass
class TrainConfig:
    """Optimisation recipe (docs/DESIGN.md §6); ``batch_size`` is global (all processes)."""

    max_steps: int = 160_000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    poly_power: float = 0.9
    clip_grad_norm: float = 0.01  # L2 norm; 0 disables clipping
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # themask.precision
    checkpoint_activations: bool = False
    seed: int = 0
    log_interval: int = 50
    checkpoint_interval: int = 4000
    eval_interval: int = 16_000  # 0: evaluate only at the end
    eval_at_end: bool = True
    freeze: list[Literal["backbone", "pixel_decoder"]] = field(default_factory=list)
    init_from: str | None = None
    head_init: Literal["official", "copy"] = "official"

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            raise ConfigError(f"train.max_steps must be positive, got {self.max_steps}")
        self.per_process_batch(1)  # batch_size divisible by grad_accum

    def per_process_batch(self, world_size: int) -> int:
        split = world_size * self.grad_accum
        if self.batch_size % split:
            product = f"world_size ({world_size}) x train.grad_accum ({self.grad_accum})"
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by {product}")
        return self.batch_size // split


@dataclass
class EvalConfig:
    """Evaluation settings (docs/VSPW.md §2-3); split and clip length are in ``data``."""

    max_videos: int | None = None  # first videos only: quick checks
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # themask.precision
    # mVC leaves out videos of <= 16 frames ("published" tables) or of <= n ("per_length")
    vc_rule: Literal["published", "per_length"] = "published"


@dataclass
class RunConfig:
    """Everything a run needs; ``model`` and ``loss``: the resolved preset + overrides."""

    preset: str = "themask_mit_b1_t1"
    pretrained_backbone: str | None = None  # MiT ImageNet weights
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; ``key`` is for messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is types.UnionType:  # X | None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return None if value is None else _coerce(value, inner, key)
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off / on as a bool
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        fixed = origin is tuple and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        kinds = args if fixed else args[:1] * len(value)
        items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, kinds))]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # update_dataclass took mappings
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
        with contextlib.suppress(ValueError):
            return float(value)
    if tp in _SCALARS:
        accepted = (int, float) if tp is float else tp
        if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
            raise ConfigError(f"{key}: expected {_SCALARS[tp]}, got {value!r}")
        return float(value) if tp is float else value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def update_dataclass(obj: Any, values: Mapping[str, Any], prefix: str = "") -> Any:
    """A copy of dataclass ``obj`` with the nested ``values`` checked and applied."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: hints[f.name] for f in dataclasses.fields(obj)}
    changes = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {sorted(fields)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[name] = update_dataclass(current, value, key)
        else:
            changes[name] = _coerce(value, fields[name], key)
    try:
        return dataclasses.replace(obj, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a section's own validation (__post_init__)
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (lists for tuples) of a dataclass config, YAML/JSON ready."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(values: Mapping[str, Any]) -> RunConfig:
    """``RunConfig`` from a partial nested dict (an old ``model.loss`` section is ``loss``)."""
    values = dict(values)
    model = values.get("model")
    if isinstance(model, Mapping) and isinstance(model.get("loss"), Mapping):
        values["model"] = {k: v for k, v in model.items() if k != "loss"}
        values["loss"] = _deep_merge(model["loss"], values.get("loss") or {})
    from themask.modeling import build

    base = RunConfig()
    preset = values.get("preset", base.preset)
    if not isinstance(preset, str) or preset not in build.PRESETS:
        raise ConfigError(f"preset: unknown model preset {preset!r}; valid: {build.list_presets()}")
    # the preset's class count follows the dataset description, unless model.num_classes is set
    data = update_dataclass(base.data, values.get("data") or {}, "data")
    model = build.preset_config(preset, num_classes=data.num_classes)
    loss = build.preset_loss_config(preset)
    base = dataclasses.replace(base, preset=preset, model=model, loss=loss)
    cfg = update_dataclass(base, values)  # then: the model must fit the data
    if cfg.model.num_classes != cfg.data.num_classes:
        dataset = f"the dataset ({cfg.data.description.source}) has {cfg.data.num_classes} classes"
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {dataset}")
    if cfg.model.decoder == "temporal" and cfg.model.num_frames != cfg.data.num_frames:
        dilation = f"data.dilation={list(cfg.data.dilation)} gives clips of {cfg.data.num_frames}"
        raise ConfigError(f"model.num_frames={cfg.model.num_frames} but {dilation} frames")
    return cfg


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=2e-4", "data.dilation=[-3]"]`` → nested dict, values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if "" in parts:
            raise ConfigError(f"override '{item}': empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': cannot parse value: {err}") from err
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
            node = child
        node[parts[-1]] = value
    return nested


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, Mapping) and isinstance(merged.get(key), Mapping)
        merged[key] = _deep_merge(merged[key], value) if nested else value
    return merged


SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def list_shipped_configs() -> list[str]:
    """Names of the configs shipped in the package, e.g. ``vspw/themask_mit_b1_t1``."""
    return sorted(
        p.relative_to(SHIPPED_CONFIG_DIR).with_suffix("").as_posix()
        for p in SHIPPED_CONFIG_DIR.glob("*/*.yaml")
    )


def resolve_config_path(path: PathLike) -> Path:
    """``path`` if it is a file, else the shipped config of that name."""
    name = Path(path).as_posix().removeprefix("configs/")
    for candidate in (Path(path), SHIPPED_CONFIG_DIR / name, SHIPPED_CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = f"neither a file nor a shipped config; shipped: {', '.join(list_shipped_configs())}"
    raise ConfigError(f"config file not found: {path} ({shipped})")


def load_config(path: PathLike | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A YAML run file or shipped config name (``None``: defaults) with dotted overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        values = loaded or {}
    values = _deep_merge(values, parse_overrides(overrides))
    try:
        return from_dict(values)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def save_config(cfg: RunConfig, path: PathLike) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
