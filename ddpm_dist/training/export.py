"""Consolidated single-file export: EMA and raw weights in safetensors, the model config in its metadata.
Loading needs no unpickling at all."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "ddpm_dist.export/1"


def save_export(path: str, ema: dict[str, torch.Tensor], raw: Optional[dict[str, torch.Tensor]], model_config,
                info: dict) -> str:
    tensors = {f"ema.{k}": v.contiguous() for k, v in ema.items()}
    if raw is not None:
        tensors.update({f"model.{k}": v.contiguous() for k, v in raw.items()})
    cfg = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else dict(model_config)
    meta = {"format": FORMAT, "model_config": json.dumps(cfg), "info": json.dumps(info)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # safetensors creates 0600 files; an export is meant to be shared
    os.replace(tmp, path)
    return path


def load_export(path: str, which: str = "ema") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, model_config dict, info) from an export; which = 'ema' or 'model'."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"export '{path}' does not exist")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"'{path}' is not a ddpm_dist export (format {meta.get('format')!r})")
        prefix = which + "."
        weights = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"export '{path}' has no '{which}' weights")
    return weights, json.loads(meta["model_config"]), json.loads(meta.get("info", "{}"))


def load_for_sampling(source: str, which: str = "ema"):
    """(UNet with weights, diffusion config dict, sample config dict, description) from an export file or a
    run directory (newest committed checkpoint)."""
    import yaml

    from ..models import UNet, resolve_model_config

    if os.path.isfile(source):
        weights, model_cfg, info = load_export(source, which)
        diffusion, sample = info.get("diffusion", {}), info.get("sample", {})
        desc = f"{source} ({which})"
    else:
        config_path = os.path.join(source, "config.yaml")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"'{source}' is neither an export file nor a run directory (no config.yaml)")
        with open(config_path) as f:
            run_cfg = yaml.safe_load(f)
        from .checkpoint import load_checkpoint_weights
        weights, meta = load_checkpoint_weights(source, which)
        model_cfg, diffusion, sample = meta["model_config"], run_cfg.get("diffusion", {}), run_cfg.get("sample", {})
        desc = f"{source} step {meta['step']} ({which})"
    model = UNet(resolve_model_config(model_cfg))
    model.load_state_dict(weights)
    return model.eval(), diffusion, sample, desc
