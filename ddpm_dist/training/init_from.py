"""`train.init_from`: start a run (fine-tune) from a trained network, ours or a diffusers UNet2DModel folder.

The source decides the architecture; a model key the config sets must agree with it, except the ones that change
how the network trains, not its weights (dropout, activation checkpointing). The weights are loaded before the engine
wraps the network, so the EMA (and post-hoc EMA profiles) start from them too; a resumed run's checkpoint replaces
them as usual."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from ..artifacts import load_trained
from ..config import Config, ConfigError
from ..models import RUNTIME_FIELDS, UNetConfig, resolve_model_config

log = logging.getLogger(__name__)
FREE_FIELDS = ("dropout", *RUNTIME_FIELDS)  # a fine-tuning run may choose these


def initial_model(cfg: Config) -> tuple[UNetConfig, Optional[dict[str, torch.Tensor]]]:
    """The run's model config and, with train.init_from, the weights to start from."""
    if not cfg.train.init_from:
        return resolve_model_config(cfg.model), None
    try:
        trained = load_trained(cfg.train.init_from)
    except (ValueError, OSError) as e:
        raise ConfigError(f"train.init_from: {e}") from None
    source = trained.config
    chosen = {k: v for k, v in dataclasses.asdict(cfg.model).items() if v is not None and k != "preset"}
    for key, value in chosen.items():
        if key not in FREE_FIELDS and value != getattr(source, key):
            raise ConfigError(
                f"model.{key}={value} differs from train.init_from '{cfg.train.init_from}', which has "
                f"{getattr(source, key)}: leave model.{key} unset or equal"
            )
    model_cfg = dataclasses.replace(source, **{k: v for k, v in chosen.items() if k in FREE_FIELDS})
    if trained.diffusion != cfg.diffusion:
        log.warning(
            "train.init_from '%s' was trained with %s; this run uses %s",
            trained.source,
            trained.diffusion,
            cfg.diffusion,
        )
    log.info("model from train.init_from: %s (model.preset ignored)", trained.source)
    return model_cfg, trained.model.state_dict()
