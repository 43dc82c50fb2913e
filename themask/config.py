"""Run configuration: model + loss + data + train + eval as nested dataclasses.

A run file (YAML) holds only the values that differ from the defaults. Loading order:

1. ``RunConfig()`` defaults;
2. the preset named by ``preset`` (top level; see ``themask.modeling.build``) fills
   ``model`` (the network), with the class count of the dataset (``<data.root>/dataset.yaml``,
   VSPW when the root has none), and ``loss`` (its default objective);
3. the YAML file's sections override fields;
4. dotted ``key=value`` overrides from the command line (values parsed as YAML scalars,
   e.g. ``train.lr=2e-4``, ``data.dilation=[-3]``, ``loss.num_rounds=1``).

Unknown keys, wrong types and inconsistent sections (a model whose class count or clip
length does not fit the data) raise a ``ConfigError`` naming the key and the valid values.
The resolved config is written to the run directory (``save_config``) and can be loaded
again unchanged.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from themask.data.config import DataConfig
from themask.io import PathLike, atomic_write
from themask.loss.config import LossConfig
from themask.modeling.config import ModelConfig

FREEZABLE_MODULES = ("backbone", "pixel_decoder")


_UnionType = getattr(types, "UnionType", None)  # ``X | Y`` annotations (Python 3.10+)


class ConfigError(ValueError):
    """A run configuration (file or override) is invalid."""


@dataclass
class TrainConfig:
    """Optimisation recipe (docs/DESIGN.md §6). Defaults are stage 1 on VSPW.

    ``batch_size`` is the *global* batch (clips per optimizer step over all processes); each
    process loads ``batch_size / (world_size * grad_accum)`` clips per forward pass.
    """

    max_steps: int = 160_000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    poly_power: float = 0.9
    clip_grad_norm: float = 0.01  # L2 norm; 0 disables clipping
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # themask.precision
    # recompute the pixel-decoder and decoder layers in backward: less memory, a slower step
    checkpoint_activations: bool = False
    seed: int = 0
    log_interval: int = 50
    checkpoint_interval: int = 4000
    eval_interval: int = 16_000  # 0: evaluate only at the end
    eval_at_end: bool = True
    freeze: list[str] = field(default_factory=list)  # subset of FREEZABLE_MODULES
    init_from: Optional[str] = None  # noqa: UP045 (get_type_hints on Python 3.9)
    head_init: Literal["official", "copy"] = "official"

    def per_process_batch(self, world_size: int) -> int:
        """Clips per forward pass on one process for ``world_size`` processes."""
        split = world_size * self.grad_accum
        if self.batch_size % split:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by world_size "
                f"({world_size}) x train.grad_accum ({self.grad_accum})"
            )
        return self.batch_size // split


@dataclass
class EvalConfig:
    """Evaluation settings (docs/VSPW.md §2-3).

    The split and the test clip length live in ``data`` (``data.val_split``,
    ``data.test_clip_len``), shared with the data pipeline.
    """

    max_videos: Optional[int] = None  # noqa: UP045 (first videos only: quick checks)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # themask.precision
    # mVC: "published" skips videos of <= 16 frames for mVC8 and mVC16 (VSS-CFFM VC_perclip.py,
    # the published tables); "per_length" skips videos of <= n frames for mVC_n
    vc_rule: Literal["published", "per_length"] = "published"


@dataclass
class RunConfig:
    """Everything a training run needs. ``model`` (the network) and ``loss`` (the objective)
    are the resolved preset + overrides."""

    preset: str = "themask_mit_b1_t1"
    pretrained_backbone: Optional[str] = None  # noqa: UP045 (MiT ImageNet weights)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with type checks


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; ``key`` is for messages."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or (_UnionType is not None and origin is _UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # Optional[X]: report X's own error
            return _coerce(value, options[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off / on as a bool
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return update_dataclass(tp(), value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def update_dataclass(obj: Any, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``values`` (a nested mapping, e.g. from YAML or
    JSON) applied, each value checked against its annotation (lists become tuples where the
    field is a tuple); ``ConfigError`` names the key (``prefix`` first) of a bad value."""
    types = _field_types(type(obj))
    changes = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in types:
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {sorted(types)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[name] = update_dataclass(current, value, key)
        else:
            changes[name] = _coerce(value, types[name], key)
    try:
        return dataclasses.replace(obj, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a section's own validation (__post_init__)
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (lists instead of tuples) of a dataclass config, YAML/JSON ready."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def from_dict(values: Mapping[str, Any]) -> RunConfig:
    """``RunConfig`` from a (possibly partial) nested dict, preset applied first. A ``model.loss``
    section (configs saved before the objective left the network config) becomes ``loss``."""
    values = dict(values)
    model = values.get("model")
    if isinstance(model, Mapping) and isinstance(model.get("loss"), Mapping):
        values["model"] = {k: v for k, v in model.items() if k != "loss"}
        values["loss"] = _deep_merge(dict(model["loss"]), values.get("loss") or {})
    from themask.modeling import build

    base = RunConfig()
    preset = values.get("preset", base.preset)
    if not isinstance(preset, str) or preset not in build.PRESETS:
        raise ConfigError(f"preset: unknown model preset {preset!r}; valid: {build.list_presets()}")
    # the preset's class count follows the dataset description, unless model.num_classes is set
    data = update_dataclass(base.data, values.get("data") or {}, "data")
    model = build.preset_config(preset, num_classes=data.num_classes)
    base = dataclasses.replace(
        base, preset=preset, model=model, loss=build.preset_loss_config(preset)
    )
    cfg = update_dataclass(base, values)
    check_consistency(cfg)
    return cfg


def check_consistency(cfg: RunConfig) -> None:
    """Cross-section checks: the model must fit the data it is trained on."""
    if cfg.model.num_classes != cfg.data.num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the dataset "
            f"({cfg.data.description.source}) has {cfg.data.num_classes} classes"
        )
    if cfg.model.decoder == "temporal" and cfg.model.num_frames != cfg.data.num_frames:
        raise ConfigError(
            f"model.num_frames={cfg.model.num_frames} but data.dilation={list(cfg.data.dilation)} "
            f"gives clips of {cfg.data.num_frames} frames"
        )
    unknown = [name for name in cfg.train.freeze if name not in FREEZABLE_MODULES]
    if unknown:
        raise ConfigError(f"train.freeze: unknown modules {unknown}; valid: {FREEZABLE_MODULES}")
    cfg.train.per_process_batch(1)  # batch_size divisible by grad_accum


# ---------------------------------------------------------------------------------------------
# overrides and files


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=2e-4", "data.dilation=[-3]"]`` → nested dict, values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': cannot parse value: {err}") from err
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
            node = child
        node[parts[-1]] = value
    return nested


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def list_shipped_configs() -> list[str]:
    """Names of the configs shipped in the package, e.g. ``vspw/themask_mit_b1_t1``."""
    return sorted(
        p.relative_to(SHIPPED_CONFIG_DIR).with_suffix("").as_posix()
        for p in SHIPPED_CONFIG_DIR.glob("*/*.yaml")
    )


def resolve_config_path(path: PathLike) -> Path:
    """``path`` if it is a file, else the shipped config of that name (``.yaml`` optional,
    a leading ``configs/`` ignored); ``ConfigError`` listing the shipped names otherwise."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.as_posix().removeprefix("configs/")
    for candidate in (SHIPPED_CONFIG_DIR / name, SHIPPED_CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"config file not found: {path} (neither a file nor a shipped config; shipped: "
        f"{', '.join(list_shipped_configs())})"
    )


def load_config(path: PathLike | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run file or shipped config name (``None``: defaults only) and apply dotted
    overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle)
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
    """Write the full resolved config as YAML (atomically)."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            yaml.safe_dump(to_dict(cfg), handle, sort_keys=False)
