"""One typed config tree: YAML on disk, `section.key=value` overrides, validation, resolved copy.

The sections (sections.py) are one dataclass per component, each with its own validate(); validate() here runs
them and the checks that span sections. Keys renamed since a file was written load under their new names, with
a notice (legacy.py). Every error is a ConfigError whose message is one line naming the file or key and what was
expected; entry points turn it into `error: ...` and a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from typing import Any, Optional

import yaml

from ..redact import redact_data
from .legacy import RENAMED, upgrade
from .sections import (
    CHOICES,
    MAX_MESSAGE,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    EMAConfig,
    EvalConfig,
    MetricsConfig,
    ModelConfig,
    ParallelConfig,
    SamplerOptions,
    TrainConfig,
    _show,
)

# libyaml's parser when PyYAML has it: the pure-Python one takes seconds, quadratically, on a few thousand
# nested brackets before its RecursionError. Either way only plain data is constructed (safe_load's constructor).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SECTIONS = ("model", "diffusion", "data", "train", "eval", "ema", "parallel", "checkpoint", "metrics")  # + sample


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a dataclass field type; YAML scalars from the CLI arrive parsed."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X], or X | list[X] (a scalar or a list, e.g. data.image_size)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        listed = [a for a in inner if typing.get_origin(a) is list]
        pick = listed[0] if listed and isinstance(value, (list, tuple)) else [a for a in inner if a not in listed][0]
        return _coerce(value, pick, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    if annotation is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or int(value) != value
        ):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return int(value)
    if annotation is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-7 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {_show(value)} is too large for a number") from None
    if annotation is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. metrics.job=4242 (a SLURM job id)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _merge(obj: Any, data: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key {_show(dotted)} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of keys, got {_show(value)}")
            _merge(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_LOADER) if raw != "" else ""
    except Exception:  # noqa: BLE001 - not YAML (or a YAML value Python cannot hold): the text itself
        value = raw
    return key.strip().split("."), value


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML file <- `a.b=c` overrides, then validation; renamed keys are read under their new names."""
    cfg = Config()
    if path:
        _merge(cfg, upgrade(_read_yaml(path), f"config file '{path}'"), "")
    for text in overrides or []:
        parts, value = _parse_override(text)
        nested: dict = {}
        cursor = nested
        for p in parts[:-1]:
            cursor = cursor.setdefault(p, {})
        cursor[parts[-1]] = value
        _merge(cfg, upgrade(nested, f"override '{text}'"), "")
    validate(cfg)
    return cfg


def _read_yaml(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_LOADER) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}'{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except (ValueError, OverflowError, RecursionError) as e:  # not UTF-8, a bad date, nested too deeply
        raise ConfigError(f"config file '{path}': invalid YAML ({type(e).__name__}: {_show(str(e))})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping at the top level")
    return data


def validate(cfg: Config) -> None:
    """Each section checks itself; what is left here spans sections."""
    for name in SECTIONS:
        getattr(cfg, name).validate()
    try:
        cfg.sample.validate()
    except ValueError as e:
        raise ConfigError(f"sample.{e}") from None
    if cfg.train.sr_factor and cfg.eval.every_images:
        raise ConfigError(
            "eval.every_images: the in-training Frechet distance is for unconditioned generation, "
            "not super-resolution (train.sr_factor); use `python -m ddpm_dist.evaluate recon`"
        )
    if cfg.train.sr_factor and (cfg.model.cond_channels or 0) == 0:
        raise ConfigError("train.sr_factor needs model.cond_channels = the image channels (the low-res condition)")
    if cfg.checkpoint.keep_best and not cfg.eval.every_images:
        raise ConfigError(
            "checkpoint.keep_best needs eval.every_images > 0 (the Fréchet distance it keeps the best of)"
        )


def check_batch(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro_batch, accumulation_steps) with global = micro x world x accumulation, or a ConfigError."""
    g = cfg.train.global_batch
    if g % world_size:
        raise ConfigError(f"train.global_batch={g} is not divisible by the world size {world_size}")
    per_rank = g // world_size
    micro = cfg.train.micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch={micro} does not divide the per-rank batch {per_rank} (global {g} / world {world_size})"
        )
    return micro, per_rank // micro


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML, redacted: credentials in URLs never reach a file or a terminal."""
    return yaml.safe_dump(redact_data(to_dict(cfg)), sort_keys=False)


def save_resolved(cfg: Config, run_dir: str) -> str:
    """Write the resolved config into the run directory atomically."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(dump_yaml(cfg))
    os.replace(tmp, path)
    return path


__all__ = [
    "CHOICES",
    "MAX_MESSAGE",
    "RENAMED",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "EMAConfig",
    "EvalConfig",
    "MetricsConfig",
    "ModelConfig",
    "ParallelConfig",
    "SamplerOptions",
    "TrainConfig",
    "check_batch",
    "dump_yaml",
    "load_config",
    "save_resolved",
    "to_dict",
    "validate",
]
