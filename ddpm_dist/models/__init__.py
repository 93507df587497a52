"""Single-device model code. `build_model` returns a plain nn.Module; parallel/ wraps it."""

from __future__ import annotations

import dataclasses
from typing import Any, Union

from .presets import PRESETS
from .unet import AC_MODES, RUNTIME_FIELDS, UNet, UNetConfig


def resolve_model_config(spec: Union[str, dict, Any, UNetConfig]) -> UNetConfig:
    """A UNetConfig from a preset name, a dict, or a config.ModelConfig (preset + overriding fields)."""
    if isinstance(spec, UNetConfig):
        return spec
    if isinstance(spec, str):
        spec = {"preset": spec}
    elif dataclasses.is_dataclass(spec):
        spec = dataclasses.asdict(spec)
    spec = dict(spec)
    preset = spec.pop("preset", None)
    fields = {}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"model.preset: unknown preset '{preset}' (known: {', '.join(PRESETS)})")
        fields.update(PRESETS[preset])
    fields.update({k: v for k, v in spec.items() if v is not None})
    known = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"model: unknown fields {sorted(unknown)}")
    cfg = UNetConfig(**fields)
    cfg.validate()
    return cfg


def build_model(spec: Union[str, dict, Any, UNetConfig]) -> UNet:
    return UNet(resolve_model_config(spec))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "AC_MODES",
    "PRESETS",
    "RUNTIME_FIELDS",
    "UNet",
    "UNetConfig",
    "build_model",
    "count_parameters",
    "resolve_model_config",
]
