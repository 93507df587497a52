"""What training leaves behind, and how to read it: committed checkpoints in a run directory and the
single-file export. Sample, evaluate and viz load trained models through here, never through training/.

A checkpoint is a directory `step_XXXXXXXXX` with a COMMITTED marker (written last), meta.json (counters,
data cursor and the other JSON state, the run's identity, each component's storage format) and the
tensors: torch.distributed.checkpoint files for the portable components, a sub-folder per component that
keeps its own format (DeepSpeed). An export is one safetensors file: EMA and raw weights, the model config
and the run's diffusion and sampler settings in its metadata.

Checkpoints come from shared filesystems and buckets, so nothing read here is unpickled beyond DCP's own
metadata classes: every DCP read goes through `load_dcp` (safe_dcp.py). What is read proves itself first: the marker
lists every file with its size and digest, an export carries its tensors' digests (digests.py); a corrupt one is a
one-line CheckpointError naming the file, one written before digests loads unverified."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import yaml

from ..config import DiffusionConfig
from ..diffusion.options import SamplerOptions
from ..models import UNet, UNetConfig, resolve_model_config
from .diffusers_format import check_weights, is_diffusers_folder, read_diffusers
from .digests import EXPORT_DIGESTS, MARKER, check_export, export_digests, require_intact
from .errors import CheckpointError
from .safe_dcp import load_dcp

META = "meta.json"
CHECKPOINT_FORMAT = 2
EXPORT_FORMAT = "ddpm_dist.export/1"
log = logging.getLogger(__name__)
PORTABLE_FORMATS = ("dcp", "json")  # the CheckpointManager's own; anything else is a component's native format
# Where the weights sit inside a checkpoint's DCP state: the CheckpointManager's component names.
DCP_WEIGHTS = {"ema": ("ema",), "model": ("engine", "model")}


def step_name(step: int) -> str:
    return f"step_{step:09d}"


def committed_checkpoints(directory: str) -> list[str]:
    """Committed checkpoint paths, oldest first; uncommitted ones are skipped (with a warning)."""
    if not os.path.isdir(directory):
        return []
    out = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not name.startswith("step_") or not os.path.isdir(path):
            continue
        if os.path.exists(os.path.join(path, MARKER)):
            out.append(path)
        else:
            log.warning("ignoring uncommitted checkpoint %s", path)
    return out


def committed_time(path: str) -> float:
    """Unix time a checkpoint was committed (its marker's record)."""
    with open(os.path.join(path, MARKER)) as f:
        return float(json.load(f)["time"])


def read_meta(path: str) -> dict:
    """meta.json of a committed checkpoint; a clear error for one written by an older ddpm_dist."""
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    if meta.get("checkpoint_format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' has format {meta.get('checkpoint_format', 1)}, this ddpm_dist reads "
            f"{CHECKPOINT_FORMAT}: sample from the run's export.safetensors or start a new run_dir"
        )
    return meta


def eval_score(meta: dict) -> Optional[float]:
    """The in-training Fréchet distance measured on a checkpoint's EMA weights, if one was."""
    value = (meta.get("eval") or {}).get("frechet_distance")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def best_checkpoint(paths: list[str]) -> Optional[str]:
    """The checkpoint with the lowest in-training Fréchet distance (the oldest of equals), or None."""
    scored = [(score, i, p) for i, p in enumerate(paths) if (score := eval_score(read_meta(p))) is not None]
    return min(scored)[2] if scored else None


def newest_checkpoint(run_or_ckpt: str, choice: str = "latest") -> str:
    """A checkpoint directory itself, or under RUN/checkpoints the newest committed one ('latest') or the one
    with the best in-training Fréchet distance ('best', kept by checkpoint.keep_best)."""
    if os.path.exists(os.path.join(run_or_ckpt, MARKER)):
        return run_or_ckpt
    found = committed_checkpoints(os.path.join(run_or_ckpt, "checkpoints"))
    if not found:
        raise FileNotFoundError(f"no committed checkpoint under '{run_or_ckpt}'")
    if choice == "best":
        best = best_checkpoint(found)
        if best is None:
            raise FileNotFoundError(
                f"no checkpoint under '{run_or_ckpt}' has an in-training Fréchet distance "
                f"(train with eval.every_images and checkpoint.keep_best=true)"
            )
        return best
    if choice != "latest":
        raise ValueError(f"checkpoint choice '{choice}': expected latest or best")
    return found[-1]


def load_checkpoint_weights(
    run_or_ckpt: str, which: str = "ema", choice: str = "latest"
) -> tuple[dict[str, torch.Tensor], dict]:
    """EMA ('ema') or raw ('model') weights of a checkpoint (`choice`: latest or best), in one process without
    a process group: DCP reshards whatever world size wrote them."""
    path = newest_checkpoint(run_or_ckpt, choice)
    if require_intact(path).unverified:
        log.info("checkpoint '%s' has no digests (written before ddpm_dist recorded them): read unverified", path)
    meta = read_meta(path)
    keys = DCP_WEIGHTS[which]
    if meta["formats"].get(keys[0]) not in PORTABLE_FORMATS:
        raise ValueError(
            f"the {which} weights of '{path}' are in {meta['formats'].get(keys[0])} format: use the run's "
            f"export.safetensors"
        )
    template = {
        k: v.detach().clone().float() for k, v in UNet(resolve_model_config(meta["model_config"])).state_dict().items()
    }
    state: dict = template
    for key in reversed(keys):
        state = {key: state}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process"
        load_dcp(state, path, no_dist=True, verify=False)  # verified above
    return template, meta


def save_export(
    path: str, ema: dict[str, torch.Tensor], raw: Optional[dict[str, torch.Tensor]], model_config, info: dict
) -> str:
    """EMA (and raw) weights in one safetensors file, readable by everyone who may read the run (0666 & ~umask)."""
    from safetensors.torch import save_file

    tensors = {f"ema.{k}": v.contiguous() for k, v in ema.items()}
    if raw is not None:
        tensors.update({f"model.{k}": v.contiguous() for k, v in raw.items()})
    cfg = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else dict(model_config)
    meta = {"format": EXPORT_FORMAT, "model_config": json.dumps(cfg), "info": json.dumps(info)}
    meta[EXPORT_DIGESTS] = export_digests(tensors, meta)  # of the bytes safetensors writes: it writes them as they are
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # safetensors creates 0600 files; an export is meant to be shared
    os.replace(tmp, path)
    return path


def load_export(path: str, which: str = "ema") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, model_config dict, info) from an export; which = 'ema' or 'model' (None: both, keys prefixed), each
    tensor checked against the digest written with it."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"export '{path}' does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            if meta.get("format") != EXPORT_FORMAT:
                raise ValueError(f"'{path}' is not a ddpm_dist export (format {meta.get('format')!r})")
            prefix = "" if which is None else which + "."
            read = {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    except (ValueError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own error: a truncated or garbled header or buffer
        raise CheckpointError(f"corrupt export '{path}': {type(e).__name__}: {e}") from None
    if problem := check_export(path, meta, keys, read):
        raise CheckpointError(f"corrupt export: {problem}")
    weights = {k[len(prefix) :]: v for k, v in read.items()}
    if not weights:
        raise ValueError(f"export '{path}' has no '{which}' weights")
    return weights, json.loads(meta["model_config"]), json.loads(meta.get("info", "{}"))


def run_config(run_dir: str) -> dict:
    """The resolved config.yaml of a run directory, as plain data."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"'{run_dir}' is neither an export file, a run directory (no config.yaml) nor a diffusers folder"
        )
    with open(path) as f:
        return yaml.safe_load(f) or {}


def run_data_source(run_dir: Optional[str]) -> Optional[str]:
    """The training data of a run directory (its data.source), or None."""
    if run_dir and os.path.isfile(os.path.join(run_dir, "config.yaml")):
        return run_config(run_dir).get("data", {}).get("source")
    return None


def _known(cls, data: Optional[dict]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (data or {}).items() if k in names})


@dataclass
class TrainedModel:
    """A trained network (on the CPU, eval mode) with what it was trained with."""

    model: UNet
    diffusion: DiffusionConfig
    sampler: SamplerOptions  # the run's sample section: the default for sampling it
    source: str  # what it was read from, for logs and provenance

    @property
    def config(self) -> UNetConfig:
        return self.model.config


def load_trained(source: str, which: str = "ema", checkpoint: str = "latest") -> TrainedModel:
    """An export file, a run directory (its newest committed checkpoint, or with checkpoint='best' the one
    with the best in-training Fréchet distance; which = 'ema' or 'model') or a diffusers UNet2DModel folder."""
    if is_diffusers_folder(source):
        found = read_diffusers(source)
        model = UNet(found.model_config)
        check_weights(model.state_dict(), found.state, source)
        model.load_state_dict(found.state)
        return TrainedModel(model.eval(), found.diffusion, found.sampler, found.source)
    if os.path.isfile(source):
        weights, model_cfg, info = load_export(source, which)
        diffusion, sample = info.get("diffusion"), info.get("sample")
        desc = f"{source} ({which})"
    else:
        run_cfg = run_config(source)
        weights, meta = load_checkpoint_weights(source, which, checkpoint)
        model_cfg, diffusion, sample = meta["model_config"], run_cfg.get("diffusion"), run_cfg.get("sample")
        desc = f"{source} step {meta['step']} ({which})"
    model = UNet(resolve_model_config(model_cfg))
    model.load_state_dict(weights)
    return TrainedModel(model.eval(), _known(DiffusionConfig, diffusion), SamplerOptions.from_mapping(sample), desc)
