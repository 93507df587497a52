"""The config tree's sections, one dataclass per component, each validating itself (`section.validate()`).

Every message is one line naming the key in full (`section.key: ...`); checks that span two sections are in
ddpm_dist.config.validate."""

from __future__ import annotations

import dataclasses
import importlib
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from ..diffusion.options import SamplerOptions
from ..models.unet import UNetConfig


class ConfigError(ValueError):
    """A bad config file, key or value (the message is one line, at most MAX_MESSAGE characters)."""

    def __init__(self, message: str):
        text = " ".join(str(message).split())
        super().__init__(text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "...")


MAX_MESSAGE = 400
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel, _short.maxlist, _short.maxdict = 2, 4, 4


def _show(value: Any) -> str:
    """A bounded repr of a value from a config file: a YAML alias bomb or a megabyte string shows a prefix."""
    return _short.repr(value)


CHOICES = {
    "diffusion.schedule": ("linear", "cosine", "quadratic"),
    "diffusion.prediction": ("eps", "x0", "v"),
    "diffusion.loss_weighting": ("none", "min_snr"),
    "train.lr_schedule": ("constant", "cosine"),
    "parallel.backend": ("auto", "single", "ddp", "fsdp", "zero"),
    "model.time_conditioning": (None, "scale_shift", "add"),
    "model.activation_checkpointing": (None, "", "block", "level"),
    "eval.extractor": ("digits", "inception"),
    "eval.reference": ("train", "validation"),
    "data.resize": ("none", "center_crop", "random_crop", "border", "stretch"),  # = data.resize.RESIZE_MODES (tested)
}


def _check_choices(obj: Any, section: str) -> None:
    """The section's keys that CHOICES lists hold one of the listed values."""
    for dotted, allowed in CHOICES.items():
        name, key = dotted.split(".")
        if name == section and getattr(obj, key) not in allowed:
            shown = ", ".join(a or "''" for a in allowed if a is not None)
            raise ConfigError(f"{dotted}: {_show(getattr(obj, key))} is not one of {shown}")


def _check_positive(obj: Any, section: str, *keys: str) -> None:
    for key in keys:
        if getattr(obj, key) <= 0:
            raise ConfigError(f"{section}.{key}: must be positive, got {getattr(obj, key)}")


def _all_optional(cls) -> list:
    """Every field of `cls` as an optional, unset field (declared once, in the model's own config)."""
    hints = typing.get_type_hints(cls)
    return [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(cls)]


def _validate_model(self) -> None:
    _check_choices(self, "model")


# A preset name (models.PRESETS) and any UNetConfig field set to override it.
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [("preset", Optional[str], field(default="tiny")), *_all_optional(UNetConfig)],
    namespace={"validate": _validate_model},
)


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
        from ..diffusion import make_schedule

        return make_schedule(self.schedule, self.num_steps, self.beta_start, self.beta_end)

    def validate(self) -> None:
        _check_choices(self, "diffusion")
        _check_positive(self, "diffusion", "num_steps")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError("diffusion.beta_start/beta_end: need 0 < beta_start < beta_end < 1")


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

    def validate(self) -> None:
        _check_choices(self, "data")
        if self.shard_buffer_mb < 1:
            raise ConfigError(f"data.shard_buffer_mb: must be at least 1, got {self.shard_buffer_mb}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"data.max_skip_fraction: must be in [0, 1], got {self.max_skip_fraction}")
        size = self.image_size
        sides = [size] if isinstance(size, int) else size or []
        if isinstance(size, list) and len(size) not in (1, 2) or any(not 1 <= v <= 16384 for v in sides):
            raise ConfigError(f"data.image_size: expected N or [H, W] with sides in 1..16384, got {_show(size)}")


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
    bf16: bool = False
    compile: bool = False  # torch.compile: the whole model (single, DDP, ZeRO), each sharded block under FSDP2
    channels_last: bool = False  # NHWC weights and inputs (faster convolutions on some GPUs and CPUs)
    label_dropout: float = 0.1  # classifier-free guidance: drop labels to the null class
    log_every: int = 50  # steps
    sample_every_images: int = 0  # 0: only at the end
    sample_grid_classes: bool = True
    sample_grid_images: int = 64  # images in an unconditional grid (a class-conditional one has a row per class)
    overfit_batches: int = 0  # >0: train on that many fixed batches (pipeline check)
    init_from: str = ""  # start from a trained network: a diffusers UNet2DModel/pipeline folder or an export file
    sr_factor: int = 0  # >0: super-resolution; the model sees the x-factor low-res image as model.cond_channels
    max_wall_seconds: float = 0.0  # 0: no budget; else save and exit "requeue" before it runs out
    stop_check_every: int = 5  # steps between the ranks' agreement on a stop signal (one small all_reduce)

    def validate(self) -> None:
        _check_choices(self, "train")
        _check_positive(self, "train", "global_batch", "total_images", "log_every", "stop_check_every")
        if self.micro_batch is not None and self.micro_batch <= 0:
            raise ConfigError(f"train.micro_batch: must be positive, got {self.micro_batch}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be positive, got {self.lr}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"train.label_dropout: must be in [0, 1), got {self.label_dropout}")
        if len(self.betas) != 2:
            raise ConfigError("train.betas: expected two numbers [beta1, beta2]")


@dataclass
class EvalConfig:
    """The optional in-training Fréchet distance (the same code as `python -m ddpm_dist.evaluate`)."""

    every_images: int = 0  # 0: off
    num_images: int = 256
    batch_size: int = 64
    extractor: str = "digits"  # digits (classifier trained on the shards' labels) | inception
    inception: str = ""  # path to inception-2015-12-05.pt for eval.extractor=inception
    reference: str = "train"  # the data split the generated images are compared with (validation: held out)

    def validate(self) -> None:
        _check_choices(self, "eval")
        _check_positive(self, "eval", "batch_size")


@dataclass
class EMAConfig:
    """Both EMAs of the weights. The half-life EMA (the `ema` checkpoint component, what sampling and the export read
    by default) and post-hoc EMA (EDM2): power-function EMA profiles at these relative stds (e.g. [0.05, 0.10];
    empty: off), snapshotted every snapshot_every_images for `python -m ddpm_dist.ema`."""

    halflife_images: float = 50_000.0
    warmup_ratio: float = 0.05  # half-life grows with images seen until it reaches the setting (EDM); 0: no ramp
    stds: list[float] = field(default_factory=list)
    snapshot_every_images: int = 0

    def validate(self) -> None:
        bad = [s for s in self.stds if not 0 < s < 0.28]  # std -> 1/sqrt(12) = 0.2887 is a plain average (gamma -> 0)
        if bad:
            raise ConfigError(
                f"ema.stds: {_show(bad)} not in (0, 0.28) (relative standard deviations, e.g. [0.05, 0.10])"
            )
        if len({round(s, 4) for s in self.stds}) != len(self.stds):
            raise ConfigError(f"ema.stds: {_show(self.stds)} has profiles equal to 4 decimals")
        if self.snapshot_every_images < 0 or (self.stds and self.snapshot_every_images == 0):
            raise ConfigError(
                f"ema.snapshot_every_images: must be positive with ema.stds set, got {self.snapshot_every_images}"
            )


@dataclass
class ParallelConfig:
    backend: str = "auto"  # auto | single | ddp | fsdp | zero
    zero_stage: int = 2
    reshard_after_forward: bool = True
    hybrid_shard: bool = False  # FSDP2: shard within a node, replicate across nodes
    dist_timeout_s: int = 600
    # A peer (or the rendezvous store's host) silent this long is lost: exit 2 naming its host (0: off; heartbeat.py)
    heartbeat_timeout_s: float = 45.0

    def validate(self) -> None:
        _check_choices(self, "parallel")
        if self.heartbeat_timeout_s < 0:
            raise ConfigError(f"parallel.heartbeat_timeout_s: must be >= 0 (0: off), got {self.heartbeat_timeout_s:g}")
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage: must be 1, 2 or 3, got {self.zero_stage}")


@dataclass
class CheckpointConfig:
    every_images: int = 0  # 0: only at the end and on preemption
    keep_last: int = 2
    keep_every_images: int = 0  # also keep every checkpoint at this period (0: none)
    async_save: bool = False
    resume: bool = True  # resume from the newest committed checkpoint in the run directory
    keep_best: bool = False  # also keep the checkpoint with the lowest in-training Fréchet distance (eval.every_images)

    def validate(self) -> None:
        _check_positive(self, "checkpoint", "keep_last")


@dataclass
class MetricsConfig:
    prometheus: bool = False
    prometheus_port: int = 9400  # + local rank
    prometheus_addr: str = ""  # "": this host's address (its hostname resolved), which other hosts reach
    jsonl: bool = True
    job: str = ""  # label; defaults to SLURM_JOB_ID or "local"
    sd_dir: str = ""  # Prometheus file_sd folder: each rank writes its target there while it runs
    tensorboard: bool = (
        False  # rank 0 writes TensorBoard events to run_dir/tensorboard (needs `pip install tensorboard`)
    )
    wandb: bool = False  # rank 0 logs the same to Weights & Biases, files in run_dir/wandb (`pip install wandb`)
    wandb_project: str = "ddpm_dist"
    wandb_entity: str = ""  # "": the W&B default entity of the logged-in user

    def validate(self) -> None:
        if self.tensorboard and not _importable("tensorboard"):
            raise ConfigError("metrics.tensorboard=true needs the tensorboard package: pip install tensorboard")
        if self.wandb and not _importable("wandb"):
            raise ConfigError("metrics.wandb=true needs the wandb package: pip install wandb")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclass
class Config:
    run_dir: str = "runs/default"
    name: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sample: SamplerOptions = field(default_factory=SamplerOptions)  # the run's sampler, also the default later
