"""One typed config tree: YAML on disk, `section.key=value` overrides, validation, resolved copy.

Every error is a ConfigError whose message is one line naming the file or key and what was expected;
entry points turn it into `error: ...` and a non-zero exit.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .diffusion.options import SamplerOptions
from .models.unet import UNetConfig
from .redact import redact_data


class ConfigError(ValueError):
    """A bad config file, key or value (the message is one line, at most MAX_MESSAGE characters)."""

    def __init__(self, message: str):
        text = " ".join(str(message).split())
        super().__init__(text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "...")


MAX_MESSAGE = 400
# libyaml's parser when PyYAML has it: the pure-Python one takes seconds, quadratically, on a few thousand
# nested brackets before its RecursionError. Either way only plain data is constructed (safe_load's constructor).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel, _short.maxlist, _short.maxdict = 2, 4, 4


def _show(value: Any) -> str:
    """A bounded repr of a value from a config file: a YAML alias bomb or a megabyte string shows a prefix."""
    return _short.repr(value)


def _all_optional(cls) -> list:
    """Every field of `cls` as an optional, unset field (declared once, in the model's own config)."""
    hints = typing.get_type_hints(cls)
    return [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(cls)]


# A preset name (models.PRESETS) and any UNetConfig field set to override it.
ModelConfig = dataclasses.make_dataclass("ModelConfig", [("preset", Optional[str], field(default="tiny")),
                                                         *_all_optional(UNetConfig)])


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine | quadratic
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"  # eps | x0 | v
    loss_weighting: str = "none"  # none | min_snr
    min_snr_gamma: float = 5.0

    def make_schedule(self):
        from .diffusion import make_schedule
        return make_schedule(self.schedule, self.num_steps, self.beta_start, self.beta_end)


@dataclass
class DataConfig:
    source: str = "shards/digits/manifest.json"  # a manifest URL or a brace pattern of tar URLs
    random_flip: bool = False
    num_workers: int = 0
    max_skip_fraction: float = 0.01  # corrupt samples tolerated before the run stops
    shard_buffer_mb: int = 256  # a DataLoader worker's resident shard bytes, whatever the shard size
    audit: bool = False  # write data_audit/rank<r>.jsonl: the sample indices of every step (to check resumes)
    image_size: Optional[typing.Union[int, list[int]]] = None  # N or [H, W] to train at; None: the manifest's size
    resize: str = "none"  # none (exact size) | center_crop | random_crop | border | stretch (data/resize.py)

    def image_hw(self, manifest_size) -> tuple[int, int]:
        """(H, W) the stream delivers: data.image_size when set, else the manifest's image_size."""
        size = manifest_size if self.image_size is None else self.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


@dataclass
class TrainConfig:
    global_batch: int = 64
    micro_batch: Optional[int] = None  # None: global_batch / world_size (no accumulation)
    total_images: int = 64_000  # progress is counted in images (EDM); steps = total_images / global_batch
    lr: float = 2e-4
    lr_schedule: str = "constant"  # constant | cosine
    warmup_images: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # 0 disables
    ema_halflife_images: float = 50_000.0
    ema_warmup_ratio: float = 0.05  # half-life grows with images seen until it reaches the setting (EDM)
    bf16: bool = False
    compile: bool = False  # torch.compile: the whole model (single, DDP, ZeRO), each sharded block under FSDP2
    channels_last: bool = False  # NHWC weights and inputs (faster convolutions on some GPUs and CPUs)
    label_dropout: float = 0.1  # classifier-free guidance: drop labels to the null class
    log_every: int = 50  # steps
    sample_every_images: int = 0  # 0: only at the end
    sample_grid_classes: bool = True
    sample_grid_images: int = 64  # images in an unconditional grid (a class-conditional one has a row per class)
    overfit_batches: int = 0  # >0: train on that many fixed batches (pipeline check)
    sr_factor: int = 0  # >0: super-resolution; the model sees the x-factor low-res image as model.cond_channels
    max_wall_seconds: float = 0.0  # 0: no budget; else save and exit "requeue" before it runs out
    stop_check_every: int = 5  # steps between the ranks' agreement on a stop signal (one small all_reduce)
    eval_every_images: int = 0  # optional in-training Fréchet distance (same code as ddpm_dist.evaluate)
    eval_num_images: int = 256
    eval_batch_size: int = 64
    eval_extractor: str = "digits"  # digits (classifier trained on the shards' labels) | inception
    eval_inception: str = ""  # path to inception-2015-12-05.pt for eval_extractor=inception
    eval_reference: str = "train"  # the data split the in-training Fréchet distance compares with (validation: held out)


@dataclass
class EMAConfig:
    """Post-hoc EMA (EDM2), beside train.ema_halflife_images's EMA: power-function EMA profiles at these relative
    stds (e.g. [0.05, 0.10]; empty: off), snapshotted every snapshot_every_images for `python -m ddpm_dist.ema`."""
    stds: list[float] = field(default_factory=list)
    snapshot_every_images: int = 0


@dataclass
class ParallelConfig:
    backend: str = "auto"  # auto | single | ddp | fsdp | zero
    zero_stage: int = 2
    reshard_after_forward: bool = True
    hybrid_shard: bool = False  # FSDP2: shard within a node, replicate across nodes
    dist_timeout_s: int = 600


@dataclass
class CheckpointConfig:
    every_images: int = 0  # 0: only at the end and on preemption
    keep_last: int = 2
    keep_every_images: int = 0  # also keep every checkpoint at this period (0: none)
    async_save: bool = False
    resume: bool = True  # resume from the newest committed checkpoint in the run directory
    keep_best: bool = False  # also keep the checkpoint with the lowest in-training Fréchet distance (train.eval_every_images)


@dataclass
class MetricsConfig:
    prometheus: bool = False
    prometheus_port: int = 9400  # + local rank
    prometheus_addr: str = ""  # "": this host's address (its hostname resolved), which other hosts reach
    jsonl: bool = True
    job: str = ""  # label; defaults to SLURM_JOB_ID or "local"
    sd_dir: str = ""  # Prometheus file_sd folder: each rank writes its target there while it runs
    tensorboard: bool = False  # rank 0 writes TensorBoard events to run_dir/tensorboard (needs `pip install tensorboard`)


@dataclass
class Config:
    run_dir: str = "runs/default"
    name: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sample: SamplerOptions = field(default_factory=SamplerOptions)  # the run's sampler, also the default later


CHOICES = {
    "diffusion.schedule": ("linear", "cosine", "quadratic"),
    "diffusion.prediction": ("eps", "x0", "v"),
    "diffusion.loss_weighting": ("none", "min_snr"),
    "train.lr_schedule": ("constant", "cosine"),
    "parallel.backend": ("auto", "single", "ddp", "fsdp", "zero"),
    "model.time_conditioning": (None, "scale_shift", "add"),
    "model.activation_checkpointing": (None, "", "block", "level"),
    "train.eval_extractor": ("digits", "inception"),
    "train.eval_reference": ("train", "validation"),
    "data.resize": ("none", "center_crop", "random_crop", "border", "stretch"),  # = data.resize.RESIZE_MODES (tested)
}


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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return int(value)
    if annotation is float:
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
    """Defaults <- YAML file <- `a.b=c` overrides, then validation."""
    cfg = Config()
    if path:
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
        _merge(cfg, data, "")
    for text in overrides or []:
        parts, value = _parse_override(text)
        nested: dict = {}
        cursor = nested
        for p in parts[:-1]:
            cursor = cursor.setdefault(p, {})
        cursor[parts[-1]] = value
        _merge(cfg, nested, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            shown = ", ".join(a or "''" for a in allowed if a is not None)
            raise ConfigError(f"{dotted}: {_show(value)} is not one of {shown}")
    positive = {
        "diffusion.num_steps": cfg.diffusion.num_steps,
        "train.global_batch": cfg.train.global_batch,
        "train.total_images": cfg.train.total_images,
        "train.log_every": cfg.train.log_every,
        "train.stop_check_every": cfg.train.stop_check_every,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if cfg.train.micro_batch is not None and cfg.train.micro_batch <= 0:
        raise ConfigError(f"train.micro_batch: must be positive, got {cfg.train.micro_batch}")
    if not 0 < cfg.diffusion.beta_start < cfg.diffusion.beta_end < 1:
        raise ConfigError("diffusion.beta_start/beta_end: need 0 < beta_start < beta_end < 1")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr: must be positive, got {cfg.train.lr}")
    for key in ("label_dropout",):
        if not 0.0 <= getattr(cfg.train, key) < 1.0:
            raise ConfigError(f"train.{key}: must be in [0, 1), got {getattr(cfg.train, key)}")
    try:
        cfg.sample.validate()
    except ValueError as e:
        raise ConfigError(f"sample.{e}") from None
    if cfg.data.shard_buffer_mb < 1:
        raise ConfigError(f"data.shard_buffer_mb: must be at least 1, got {cfg.data.shard_buffer_mb}")
    if not 0.0 <= cfg.data.max_skip_fraction <= 1.0:
        raise ConfigError(f"data.max_skip_fraction: must be in [0, 1], got {cfg.data.max_skip_fraction}")
    _validate_image_size(cfg.data.image_size)
    if cfg.parallel.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: must be 1, 2 or 3, got {cfg.parallel.zero_stage}")
    if cfg.train.sr_factor and cfg.train.eval_every_images:
        raise ConfigError("train.eval_every_images: the in-training Frechet distance is for unconditioned generation, "
                          "not super-resolution (train.sr_factor); use `python -m ddpm_dist.evaluate recon`")
    if cfg.train.sr_factor and (cfg.model.cond_channels or 0) == 0:
        raise ConfigError("train.sr_factor needs model.cond_channels = the image channels (the low-res condition)")
    if cfg.metrics.tensorboard and not _importable("tensorboard"):
        raise ConfigError("metrics.tensorboard=true needs the tensorboard package: pip install tensorboard")
    if cfg.checkpoint.keep_best and not cfg.train.eval_every_images:
        raise ConfigError("checkpoint.keep_best needs train.eval_every_images > 0 (the Fréchet distance it keeps the best of)")
    _validate_ema(cfg.ema)
    if len(cfg.train.betas) != 2:
        raise ConfigError("train.betas: expected two numbers [beta1, beta2]")


def _validate_image_size(size) -> None:
    sides = [size] if isinstance(size, int) else size or []
    if isinstance(size, list) and len(size) not in (1, 2) or any(not 1 <= v <= 16384 for v in sides):
        raise ConfigError(f"data.image_size: expected N or [H, W] with sides in 1..16384, got {_show(size)}")


def _validate_ema(ema: EMAConfig) -> None:
    bad = [s for s in ema.stds if not 0 < s < 0.28]  # std -> 1/sqrt(12) = 0.2887 is a plain average (gamma -> 0)
    if bad:
        raise ConfigError(f"ema.stds: {_show(bad)} not in (0, 0.28) (relative standard deviations, e.g. [0.05, 0.10])")
    if len({round(s, 4) for s in ema.stds}) != len(ema.stds):
        raise ConfigError(f"ema.stds: {_show(ema.stds)} has profiles equal to 4 decimals")
    if ema.snapshot_every_images < 0 or (ema.stds and ema.snapshot_every_images == 0):
        raise ConfigError(f"ema.snapshot_every_images: must be positive with ema.stds set, got {ema.snapshot_every_images}")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


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
