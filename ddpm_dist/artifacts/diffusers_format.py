"""diffusers' pipeline folder, written and read without importing diffusers: `model_index.json`, `unet/config.json`
+ `unet/diffusion_pytorch_model.safetensors` and `scheduler/scheduler_config.json`, so `DDPMPipeline` and
`DDIMPipeline.from_pretrained(DIR)` load an export of ours, and a UNet2DModel someone published samples, scores and
fine-tunes here. Weights are read from safetensors only (a `.bin` is a pickle: refused). Our sampler defaults and
provenance ride along in `ddpm_dist.json`, which diffusers ignores."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Optional

import torch

from ..config import DiffusionConfig
from ..diffusion.options import SamplerOptions
from ..models import UNetConfig
from ..models.diffusers_unet import (
    DiffusersMappingError,
    from_diffusers_config,
    from_diffusers_state,
    to_diffusers_config,
    to_diffusers_state,
)

log = logging.getLogger(__name__)
WEIGHTS = "diffusion_pytorch_model.safetensors"
PROVENANCE = "ddpm_dist.json"
PROVENANCE_FORMAT = "ddpm_dist.diffusers/1"
SCHEDULES = {"linear": "linear", "quadratic": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCES = {"small": "fixed_small", "large": "fixed_large"}
PIPELINES = {"DDPMPipeline": "ddpm", "DDIMPipeline": "ddim"}  # the sampler a folder of that pipeline defaults to


def scheduler_config(diffusion: DiffusionConfig, sampler: SamplerOptions) -> dict:
    """DDPMScheduler's scheduler_config.json: the training schedule and prediction, our variance and clipping."""
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": diffusion.num_steps,
        "beta_start": diffusion.beta_start,
        "beta_end": diffusion.beta_end,
        "beta_schedule": SCHEDULES[diffusion.schedule],
        "trained_betas": None,
        "prediction_type": PREDICTIONS[diffusion.prediction],
        "variance_type": VARIANCES[sampler.var_type],
        "clip_sample": sampler.clip_x0,
        "clip_sample_range": 1.0,
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _inverse(table: dict, key: str, value, allowed_note: str = ""):
    for ours, theirs in table.items():
        if theirs == value:
            return ours
    raise DiffusersMappingError(f"scheduler {key}: {value!r} is not one of {', '.join(table.values())}{allowed_note}")


def from_scheduler_config(config: dict) -> tuple[DiffusionConfig, dict]:
    """Our diffusion config and sampler settings (var_type, clip_x0) of a DDPM/DDIM scheduler_config.json."""
    for key, why in (
        ("trained_betas", "a table of betas; we map the named schedules"),
        ("thresholding", "dynamic thresholding is not a sampler of ours"),
        ("rescale_betas_zero_snr", "we do not rescale to zero terminal SNR"),
    ):
        if config.get(key):
            raise DiffusersMappingError(f"scheduler {key}: {_show(config[key])} ({why})")
    if config.get("clip_sample", True) and float(config.get("clip_sample_range", 1.0)) != 1.0:
        raise DiffusersMappingError(f"scheduler clip_sample_range: {config['clip_sample_range']} (ours clips at 1)")
    diffusion = DiffusionConfig(
        schedule=_inverse(SCHEDULES, "beta_schedule", config.get("beta_schedule", "linear")),
        num_steps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 1e-4)),
        beta_end=float(config.get("beta_end", 0.02)),
        prediction=_inverse(PREDICTIONS, "prediction_type", config.get("prediction_type", "epsilon")),
    )
    variance = config.get("variance_type", "fixed_small")
    sample = {"clip_x0": bool(config.get("clip_sample", True))}
    if variance in VARIANCES.values():  # DDIMScheduler's config has none: our default stays
        sample["var_type"] = _inverse(VARIANCES, "variance_type", variance)
    elif "variance_type" in config:
        raise DiffusersMappingError(f"scheduler variance_type: {variance!r} is not fixed_small or fixed_large")
    return diffusion, sample


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def save_diffusers(
    out: str,
    model_config: UNetConfig,
    state: dict[str, torch.Tensor],
    diffusion: DiffusionConfig,
    sampler: SamplerOptions,
    source: str,
) -> str:
    """A DDPMPipeline folder at `out` (which must not exist or be empty), written into a sibling temporary folder and
    renamed: a failed export leaves nothing half-written. DiffusersMappingError names what diffusers cannot express."""
    from safetensors.torch import save_file

    unet_config = to_diffusers_config(model_config)  # refuses before anything is written
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_diffusers_state(model_config, state).items()}
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"'{out}' exists and is not empty: nothing was written (choose a new folder)")
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_json(
            os.path.join(tmp, "model_index.json"),
            {
                "_class_name": "DDPMPipeline",
                "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            },
        )
        _write_json(os.path.join(tmp, "unet", "config.json"), unet_config)
        save_file(tensors, os.path.join(tmp, "unet", WEIGHTS), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), scheduler_config(diffusion, sampler))
        _write_json(
            os.path.join(tmp, PROVENANCE),
            {
                "format": PROVENANCE_FORMAT,
                "source": source,
                "diffusion": dataclasses.asdict(diffusion),
                "sample": sampler.to_dict(),
                "null_class": model_config.num_classes or None,
            },
        )
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_diffusers_folder(path: str) -> bool:
    """A pipeline folder (model_index.json) or a bare UNet2DModel folder (config.json)."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("model_index.json", "config.json")
    )


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"'{path}': {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' is not a JSON object")
    return data


def _read_weights(unet_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(unet_dir, WEIGHTS)
    if not os.path.isfile(path):
        bins = [f for f in sorted(os.listdir(unet_dir)) if f.endswith(".bin")]
        if bins:
            raise ValueError(
                f"'{unet_dir}' has only {bins[0]} (a pickle, which could run code): ddpm_dist reads {WEIGHTS} only "
                f"(diffusers' save_pretrained writes it; safe_serialization=True)"
            )
        raise FileNotFoundError(f"'{unet_dir}' has no {WEIGHTS}")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors' own error for a garbled header or buffer
        raise ValueError(f"'{path}': {type(e).__name__}: {e}") from None


def check_weights(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """One line naming the first missing, unexpected or misshapen weight (load_state_dict lists them all)."""
    for problem, names in (("is missing", expected.keys() - found), ("is not in our network", found.keys() - expected)):
        if names:
            raise DiffusersMappingError(f"'{source}': weight {sorted(names)[0]} {problem} ({len(names)} such)")
    for name, value in expected.items():
        if found[name].shape != value.shape:
            raise DiffusersMappingError(
                f"'{source}': weight {name} has shape {list(found[name].shape)}, the config gives {list(value.shape)}"
            )


@dataclasses.dataclass
class DiffusersModel:
    """What a diffusers folder holds, in our terms."""

    model_config: UNetConfig
    state: dict[str, torch.Tensor]
    diffusion: DiffusionConfig
    sampler: SamplerOptions
    source: str


def read_diffusers(path: str) -> DiffusersModel:
    """Our config, weights, diffusion and sampler defaults of a diffusers pipeline folder or bare UNet folder; a
    ValueError in one line names the file or field we cannot read."""
    index: Optional[dict] = None
    if os.path.isfile(os.path.join(path, "model_index.json")):
        index = _read_json(os.path.join(path, "model_index.json"))
        unet_dir, scheduler_dir = os.path.join(path, "unet"), os.path.join(path, "scheduler")
    else:
        unet_dir, scheduler_dir = path, None
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        raise FileNotFoundError(f"'{path}' is not a diffusers folder (no {unet_dir}/config.json)")
    try:
        model_config = from_diffusers_config(_read_json(os.path.join(unet_dir, "config.json")))
    except DiffusersMappingError as e:
        raise DiffusersMappingError(f"{unet_dir}/config.json: {e}") from None
    state = from_diffusers_state(model_config, _read_weights(unet_dir))
    sample = {"sampler": PIPELINES.get((index or {}).get("_class_name"), SamplerOptions.sampler)}
    scheduler_file = os.path.join(scheduler_dir or "", "scheduler_config.json")
    if scheduler_dir and os.path.isfile(scheduler_file):
        try:
            diffusion, scheduled = from_scheduler_config(_read_json(scheduler_file))
        except DiffusersMappingError as e:
            raise DiffusersMappingError(f"{scheduler_file}: {e}") from None
        sample.update(scheduled)
    else:
        diffusion = DiffusionConfig()
        log.info("'%s' has no scheduler config: the DDPM paper's linear schedule (1000 steps), eps prediction", path)
    provenance = os.path.join(path, PROVENANCE)
    if os.path.isfile(provenance):  # ours: the sampler settings the run chose, the training-only diffusion keys
        ours = _read_json(provenance)
        sample.update(ours.get("sample") or {})
        kept = {k: v for k, v in (ours.get("diffusion") or {}).items() if k in ("loss_weighting", "min_snr_gamma")}
        diffusion = dataclasses.replace(diffusion, **kept)
    diffusion.validate()
    return DiffusersModel(model_config, state, diffusion, SamplerOptions.from_mapping(sample), f"{path} (diffusers)")
