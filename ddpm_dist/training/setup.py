"""A training run's set-up: every component the loop drives, built once, checked and resumed, as one `Run`.

The loop (loop.py) reads the Run and never builds anything; what training writes besides checkpoints (outputs.py)
takes it too, instead of the same five arguments each time."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..artifacts import committed_time, read_meta
from ..config import Config, ConfigError, check_batch, dump_yaml, save_resolved, to_dict
from ..data import Layout, TrainStream, open_manifest
from ..diffusion import Schedule
from ..models import UNet, UNetConfig
from ..obs.metrics import Metrics
from ..parallel import parallelize, resolve_backend
from ..parallel.collectives import sum_across_ranks
from ..parallel.engine import Engine
from ..parallel.env import DistEnv
from ..parallel.faults import host_names
from ..parallel.seeding import seed_everything
from ..parallel.sharded_ema import ShardedEMA
from ..posthoc.power import PowerEMA
from ..posthoc.snapshots import SnapshotWriter
from .checkpoint import CheckpointManager
from .init_from import initial_model
from .preemption import Preemption
from .state import LRSchedule, Progress

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What one training process works with."""

    cfg: Config
    env: DistEnv
    backend: str
    micro: int  # images per micro-batch on this rank
    accum: int  # micro-batches per optimizer step
    model_cfg: UNetConfig
    schedule: Schedule
    num_params: int
    engine: Engine
    ema: ShardedEMA
    power: Optional[PowerEMA]  # post-hoc EMA profiles (EDM2), when ema.stds names any
    snapshots: Optional[SnapshotWriter]
    stream: TrainStream
    lr_schedule: LRSchedule
    progress: Progress
    ckpt: CheckpointManager
    resumed: Optional[dict]  # what restore_latest returned, None for a fresh run
    metrics: Metrics
    preemption: Preemption

    @property
    def is_main(self) -> bool:
        return self.env.is_main


def build_run(cfg: Config, env: DistEnv, started: contextlib.ExitStack, progress: Progress) -> Run:
    """Check the config against the data, build the engine, EMAs, stream and managers, resume the newest committed
    checkpoint; what must be released (metrics sinks, signal handlers) is entered into `started`."""
    backend = resolve_backend(cfg.parallel.backend, env)
    micro, accum = check_batch(cfg, env.world_size)
    manifest = open_manifest(cfg.data.source)  # a missing manifest or shard fails here, before any work
    model_cfg, initial_weights = initial_model(cfg)  # the config's model, or train.init_from's
    _check_data_matches_model(manifest, model_cfg, cfg)
    if env.is_main:
        save_resolved(cfg, cfg.run_dir)
        os.makedirs(os.path.join(cfg.run_dir, "samples"), exist_ok=True)

    # Section: the model, its engine and EMAs.
    seed_everything(cfg.seed)  # identical initial weights on every rank
    module = UNet(model_cfg)
    if initial_weights is not None:
        module.load_state_dict(initial_weights)  # before the engine and EMAs copy or shard it
    num_params = sum(p.numel() for p in module.parameters())
    engine = parallelize(module, cfg.parallel, env, cfg.train, micro_batch=micro, accum_steps=accum)
    ema = ShardedEMA(engine)
    power = PowerEMA(engine, cfg.ema.stds) if cfg.ema.stds else None

    # Section: the data stream (a slice of the shard check per rank) and the LR schedule.
    stream = TrainStream(
        manifest,
        rank=env.rank,
        layout=Layout(env.world_size, micro, cfg.data.num_workers),
        seed=cfg.seed,
        random_flip=cfg.data.random_flip,
        max_skip_fraction=cfg.data.max_skip_fraction,
        buffer_bytes=cfg.data.shard_buffer_mb << 20,
        share=sum_across_ranks if env.distributed else None,
        image_size=cfg.data.image_hw(manifest.image_size),
        resize=cfg.data.resize,
    )
    lr_schedule = LRSchedule.from_config(cfg.train)

    # Section: checkpoints, and the resume.
    components = {"engine": engine, "ema": ema, "progress": progress, "data": stream, "lr_schedule": lr_schedule}
    if power:
        components["power_ema"] = power
    ckpt = CheckpointManager(
        os.path.join(cfg.run_dir, "checkpoints"),
        components,
        rank=env.rank,
        identity={
            "backend": backend,
            "world_size": env.world_size,
            "model_config": dataclasses.asdict(model_cfg),
            "config": to_dict(cfg),
        },
        keep_last=cfg.checkpoint.keep_last,
        keep_every_images=cfg.checkpoint.keep_every_images,
        keep_best=cfg.checkpoint.keep_best,
        async_save=cfg.checkpoint.async_save,
        pinned_staging=env.device.type == "cuda",
    )
    if cfg.checkpoint.resume and power and (newest := ckpt.latest()):  # verifies it (collective): once
        _check_same_profiles(cfg, read_meta(newest))
    resumed = ckpt.restore_latest() if cfg.checkpoint.resume else None
    if resumed:
        log.info(
            "resumed from %s (step %d, %d images, written by %d rank(s))",
            resumed["path"],
            progress.step,
            progress.images,
            resumed["world_size"],
        )
    snapshots = None
    if power:
        snapshots = SnapshotWriter(cfg.run_dir, env.rank, dataclasses.asdict(model_cfg))
        snapshots.discard_after(progress.images)  # written after the resumed checkpoint: the replay rewrites them

    # Section: metrics and the stop signals.
    metrics = started.enter_context(
        Metrics(
            cfg.metrics,
            rank=env.rank,
            local_rank=env.local_rank,
            world_size=env.world_size,
            run_dir=cfg.run_dir,
            log_every=cfg.train.log_every,
            run=cfg.name or os.path.basename(os.path.abspath(cfg.run_dir)),
            config_yaml=dump_yaml(cfg),
        )
    )
    if resumed:
        metrics.last_checkpoint_time = committed_time(resumed["path"])
    metrics.event(
        "start",
        world_size=env.world_size,
        backend=backend,
        hosts=host_names(),
        device=_device_name(env.device),
        torch=torch.__version__,
        num_params=num_params,
        step=progress.step,
        images=progress.images,
        resumed_from=resumed["path"] if resumed else None,
    )
    preemption = Preemption(env.device, cfg.train.max_wall_seconds)
    started.callback(preemption.restore)
    return Run(
        cfg,
        env,
        backend,
        micro,
        accum,
        model_cfg,
        cfg.diffusion.make_schedule(),
        num_params,
        engine,
        ema,
        power,
        snapshots,
        stream,
        lr_schedule,
        progress,
        ckpt,
        resumed,
        metrics,
        preemption,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _check_same_profiles(cfg: Config, meta: dict) -> None:
    """Power EMA profiles start at image 0: a resume may drop them (ema.stds=[]) but not add or change one."""
    old = sorted((meta.get("config") or {}).get("ema", {}).get("stds", []))
    if old != sorted(cfg.ema.stds):
        raise ConfigError(
            f"ema.stds={sorted(cfg.ema.stds)} but the run being resumed tracks {old} (power EMA profiles "
            f"start at image 0): keep ema.stds, set ema.stds=[] to stop them, or use a new run_dir"
        )


def _check_data_matches_model(manifest, model_cfg, cfg: Config) -> None:
    h, w = cfg.data.image_hw(manifest.image_size)  # data.image_size when set: the stream resizes to it
    shapes = manifest.extra.get("image_shapes") or {}  # a crawl indexed by `shards index` lists its image sizes
    if cfg.data.resize == "none" and len(shapes) > 1:
        raise ConfigError(
            f"data '{cfg.data.source}' has {len(shapes)} image sizes and data.resize is none: set "
            f"data.image_size and data.resize (center_crop, random_crop, border or stretch)"
        )
    mh, mw = manifest.image_size
    if cfg.data.resize == "none" and (h, w) != (mh, mw):
        raise ConfigError(
            f"data.image_size {h}x{w} differs from the {mh}x{mw} images of '{cfg.data.source}' but "
            f"data.resize is none: set data.resize=center_crop (or random_crop, border, stretch)"
        )
    if (h, w) != (model_cfg.image_size, model_cfg.image_size):
        what = (
            f"data.image_size is {h}x{w}"
            if cfg.data.image_size is not None
            else f"data '{cfg.data.source}' has {h}x{w} images"
        )
        raise ConfigError(f"{what} but model.image_size is {model_cfg.image_size}")
    if manifest.channels != model_cfg.in_channels:
        raise ConfigError(
            f"data '{cfg.data.source}' has {manifest.channels} channel(s) but model.in_channels is "
            f"{model_cfg.in_channels}"
        )
    if model_cfg.num_classes and manifest.num_classes > model_cfg.num_classes:
        raise ConfigError(f"data has {manifest.num_classes} classes but model.num_classes is {model_cfg.num_classes}")
