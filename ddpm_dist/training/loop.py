"""The training loop, top to bottom: set up, resume, step, log, sample, checkpoint, stop.

It drives an Engine (single, DDP, FSDP2 or ZeRO) without knowing which. The randomness of a step (timesteps,
label dropout, noise) is a function of (seed, step, global slot): each rank draws only its own slots
(randomness.py), and a resumed run draws exactly what the uninterrupted one would have."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time

import torch

from ..artifacts import committed_time, read_meta
from ..config import Config, ConfigError, check_batch, dump_yaml, save_resolved, to_dict
from ..data import Layout, TrainStream, open_manifest
from ..data.degrade import lowres_condition
from ..diffusion import diffusion_loss
from ..ema.power import PowerEMA
from ..ema.snapshots import SnapshotWriter
from ..images import model_range
from ..models import UNet, resolve_model_config
from ..obs.log import setup_logging
from ..obs.metrics import Metrics
from ..parallel import init_distributed, parallelize, read_env, resolve_backend
from ..parallel.collectives import all_gather_ints, all_reduce_mean, sum_across_ranks
from ..parallel.ema import ShardedEMA, ema_beta
from ..parallel.env import shutdown
from ..parallel.faults import PeerLost, describe_lost_peer, host_names
from ..parallel.seeding import seed_device_rng, seed_everything
from ..rng import mix_seed
from . import outputs
from .checkpoint import CheckpointManager
from .preemption import REQUEUE_EXIT_CODE, Preemption, record_exit, register_worker
from .randomness import rank_slots, slot_randomness
from .state import LRSchedule, Progress

log = logging.getLogger(__name__)


def run_step(engine, schedule, micro_batches: list[dict], *, step: int, rank: int, world_size: int, cfg: Config,
             num_classes: int, lr: float) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches; returns (mean loss on this rank, grad norm) as tensors
    on the device: nothing here waits for the GPU (the metrics read them every log_every steps)."""
    device = engine.device
    accum = len(micro_batches)
    micro = micro_batches[0]["image"].shape[0]
    total = torch.zeros((), device=device)
    dropout = getattr(getattr(engine.module, "config", None), "dropout", 1.0) > 0
    for i, batch in enumerate(micro_batches):
        x0 = batch["image"].to(device, non_blocking=True)
        if x0.dtype == torch.uint8:  # the stream ships uint8 (a quarter of the bytes); callers may pass [-1, 1] floats
            x0 = model_range(x0)
        t, drop, noise = slot_randomness(cfg.seed, step, rank_slots(i, rank, world_size, micro), schedule.num_steps,
                                         x0.shape[1:], cfg.train.label_dropout, device)
        kwargs = {}
        if num_classes:
            y = batch["label"].to(device)
            kwargs["y"] = torch.where(drop, torch.full_like(y, num_classes), y)
        if cfg.train.sr_factor:  # super-resolution: the condition is made from the batch itself
            kwargs["cond"] = lowres_condition(x0, cfg.train.sr_factor)
        if dropout:  # dropout masks from the global RNG: reseed per (step, micro-step, rank) for exact resume
            seed_device_rng(device, mix_seed(cfg.seed, step, i, rank))
        last = i == accum - 1
        with engine.sync_gradients(last):
            loss = diffusion_loss(engine.forward, schedule, x0, t, noise,
                                  prediction=cfg.diffusion.prediction, weighting=cfg.diffusion.loss_weighting,
                                  min_snr_gamma=cfg.diffusion.min_snr_gamma, model_kwargs=kwargs)
            engine.backward(loss, accum, last)
        total += loss.detach().float()
    grad_norm = engine.step(lr, cfg.train.grad_clip)
    return total / accum, grad_norm


def _batches(stream, cfg: Config):
    """The stream, or (train.overfit_batches > 0) the same first few batches over and over."""
    if not cfg.train.overfit_batches:
        yield from stream
        return
    cached = []
    for batch in stream:
        cached.append(batch)
        if len(cached) == cfg.train.overfit_batches:
            break
    while True:
        yield from cached


def train(cfg: Config) -> int:
    """Run (or resume) training; returns the process exit code (REQUEUE_EXIT_CODE when preempted). What it
    starts (the Prometheus exporter, the discovery file, the signal handlers) is released also when it raises."""
    env = read_env()
    setup_logging(env.rank)
    env = init_distributed(env, cfg.parallel.dist_timeout_s)
    register_worker(env.rank)
    progress = Progress()
    with contextlib.ExitStack() as started:
        try:
            exit_code = _run(cfg, env, started, progress)
        except Exception as e:
            lost = describe_lost_peer(e, cfg.parallel.dist_timeout_s)
            if lost is None:
                raise
            raise PeerLost(f"{lost}; at step {progress.step}: relaunch to resume from the newest committed "
                           f"checkpoint") from e
    record_exit(env.rank, exit_code)
    shutdown()
    return exit_code


def _run(cfg: Config, env, started: contextlib.ExitStack, progress: Progress) -> int:
    backend = resolve_backend(cfg.parallel.backend, env)
    micro, accum = check_batch(cfg, env.world_size)
    manifest = open_manifest(cfg.data.source)  # a missing manifest or shard fails here, before any work
    model_cfg = resolve_model_config(cfg.model)
    _check_data_matches_model(manifest, model_cfg, cfg)
    if env.is_main:
        save_resolved(cfg, cfg.run_dir)
        os.makedirs(os.path.join(cfg.run_dir, "samples"), exist_ok=True)
    schedule = cfg.diffusion.make_schedule()

    seed_everything(cfg.seed)  # identical initial weights on every rank
    module = UNet(model_cfg)
    num_params = sum(p.numel() for p in module.parameters())
    engine = parallelize(module, backend, env, bf16=cfg.train.bf16, micro_batch=micro, accum_steps=accum,
                         grad_clip=cfg.train.grad_clip, zero_stage=cfg.parallel.zero_stage,
                         reshard_after_forward=cfg.parallel.reshard_after_forward, hybrid_shard=cfg.parallel.hybrid_shard,
                         compile=cfg.train.compile, channels_last=cfg.train.channels_last,
                         optimizer_args=dict(lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay))
    ema = ShardedEMA(engine)
    power = PowerEMA(engine, cfg.ema.stds) if cfg.ema.stds else None  # post-hoc EMA profiles (EDM2)
    stream = TrainStream(manifest, rank=env.rank, layout=Layout(env.world_size, micro, cfg.data.num_workers),
                         seed=cfg.seed, random_flip=cfg.data.random_flip, max_skip_fraction=cfg.data.max_skip_fraction,
                         buffer_bytes=cfg.data.shard_buffer_mb << 20,
                         share=sum_across_ranks if env.distributed else None,
                         image_size=cfg.data.image_hw(manifest.image_size), resize=cfg.data.resize)
    lr_schedule = LRSchedule.from_config(cfg.train)
    components = {"engine": engine, "ema": ema, "progress": progress, "data": stream, "lr_schedule": lr_schedule}
    if power:
        components["power_ema"] = power
    ckpt = CheckpointManager(
        os.path.join(cfg.run_dir, "checkpoints"), components,
        rank=env.rank, identity={"backend": backend, "world_size": env.world_size,
                                 "model_config": dataclasses.asdict(model_cfg), "config": to_dict(cfg)},
        keep_last=cfg.checkpoint.keep_last, keep_every_images=cfg.checkpoint.keep_every_images,
        keep_best=cfg.checkpoint.keep_best, async_save=cfg.checkpoint.async_save)
    if cfg.checkpoint.resume and power and ckpt.latest():
        _check_same_profiles(cfg, read_meta(ckpt.latest()))
    resumed = ckpt.restore_latest() if cfg.checkpoint.resume else None
    if resumed:
        log.info("resumed from %s (step %d, %d images, written by %d rank(s))", resumed["path"], progress.step,
                 progress.images, resumed["world_size"])
    snapshots = None
    if power:
        snapshots = SnapshotWriter(cfg.run_dir, env.rank, dataclasses.asdict(model_cfg))
        snapshots.discard_after(progress.images)  # written after the resumed checkpoint: the replay rewrites them

    metrics = started.enter_context(Metrics(
        cfg.metrics, rank=env.rank, local_rank=env.local_rank, world_size=env.world_size, run_dir=cfg.run_dir,
        log_every=cfg.train.log_every, run=cfg.name or os.path.basename(os.path.abspath(cfg.run_dir)),
        config_yaml=dump_yaml(cfg)))
    if resumed:
        metrics.last_checkpoint_time = committed_time(resumed["path"])
    metrics.event("start", world_size=env.world_size, backend=backend, hosts=host_names(), device=_device_name(env.device),
                  torch=torch.__version__, num_params=num_params, step=progress.step, images=progress.images,
                  resumed_from=resumed["path"] if resumed else None)
    preemption = Preemption(env.device, cfg.train.max_wall_seconds)
    started.callback(preemption.restore)
    steps_left = math.ceil(max(cfg.train.total_images - progress.images, 0) / cfg.train.global_batch)
    log.info("%s: %s, %d rank(s), global batch %d = %d x %d ranks x %d accumulation, %d steps to go, %.2fM parameters",
             cfg.run_dir, backend, env.world_size, cfg.train.global_batch, micro, env.world_size, accum, steps_left,
             num_params / 1e6)

    def committed():
        metrics.checkpoint(duration=ckpt.last_duration, stall=ckpt.last_stall, success_time=ckpt.last_success_time,
                           images=ckpt.last_images)

    def save(force_sync: bool = False, evaluation=None):
        ckpt.save(progress.step, progress.images, force_sync=force_sync, evaluation=evaluation)
        if ckpt.pending is None:  # an async save reports when it commits (ckpt.poll below)
            committed()

    def due(every_images: int) -> bool:
        return every_images > 0 and progress.images // every_images != (progress.images - cfg.train.global_batch) // every_images

    data = _batches(stream, cfg)
    evaluator = None
    exit_code = 0
    last_saved_step = progress.step if resumed else -1
    first_step = progress.step
    while progress.images < cfg.train.total_images:  # counted in images: the batch may change across a resume
        t_step = time.perf_counter()
        wait0 = stream.data_wait_seconds
        batches = [next(data) for _ in range(accum)]
        if cfg.data.audit:
            _audit(cfg.run_dir, env.rank, progress.step, batches)
        lr = lr_schedule(progress.images)
        loss, grad_norm = run_step(engine, schedule, batches, step=progress.step, rank=env.rank,
                                   world_size=env.world_size, cfg=cfg, num_classes=model_cfg.num_classes, lr=lr)
        t_ema = time.perf_counter()
        ema.update(ema_beta(cfg.train.global_batch, progress.images, cfg.train.ema_halflife_images,
                            cfg.train.ema_warmup_ratio))
        if power:
            power.update(progress.images + cfg.train.global_batch, cfg.train.global_batch)
        ema_seconds = time.perf_counter() - t_ema
        progress.step += 1
        progress.images += cfg.train.global_batch
        if progress.step == first_step + 1:  # optimizer state exists now: what each rank holds
            sizes = {**engine.local_bytes(), "ema": ema.local_bytes(), **({"power_ema": power.local_bytes()} if power else {})}
            metrics.state_bytes([dict(zip(sizes, row)) for row in all_gather_ints(list(sizes.values()), env.device)])
        if ckpt.poll():
            committed()
        if power and due(cfg.ema.snapshot_every_images):  # before any checkpoint of this step: none is ever skipped
            snapshots.write(progress.images, power)
        row = metrics.train_step(step=progress.step, images=progress.images, loss=loss, lr=lr, grad_norm=grad_norm,
                                 step_seconds=time.perf_counter() - t_step, data_wait=stream.data_wait_seconds - wait0,
                                 ema_seconds=ema_seconds, rank_images=micro * accum,
                                 skipped_total=stream.skipped_total, epoch=stream.epoch,
                                 loss_mean_fn=lambda v: all_reduce_mean([v], env.device)[0])
        if row is not None and not math.isfinite(row["loss"]):
            log.error("loss is %s at step %d; stopping without saving", row["loss"], progress.step)
            exit_code = 1
            break
        if due(cfg.train.sample_every_images):
            outputs.sample_grid(engine, ema, model_cfg, cfg, env.is_main, progress.images, metrics=metrics)
        evaluation = None  # the Fréchet distance of this step's EMA: a checkpoint of these weights records it
        if due(cfg.train.eval_every_images):
            if evaluator is None:
                from .evaluation import InTrainingEval
                evaluator = InTrainingEval(cfg, env.device, env.rank, env.world_size)
            value = evaluator(outputs.ema_model(engine, ema, model_cfg), progress.images, metrics)
            evaluation = {"frechet_distance": value, "extractor": evaluator.extractor.name, "images": progress.images}
        if progress.step % cfg.train.stop_check_every == 0 and preemption.should_stop():
            log.info("stopping at step %d (%s): saving a checkpoint, exit %d = requeue", progress.step,
                     preemption.reason, REQUEUE_EXIT_CODE)
            save(force_sync=True, evaluation=evaluation)
            last_saved_step = progress.step
            metrics.event("preempted", step=progress.step, reason=preemption.reason)
            exit_code = REQUEUE_EXIT_CODE
            break
        if due(cfg.checkpoint.every_images) or (evaluation and cfg.checkpoint.keep_best):
            save(evaluation=evaluation)  # keep_best: every evaluated state is saved, so the best one can be kept
            last_saved_step = progress.step

    if exit_code == 0:
        if power and snapshots.last_images != progress.images:  # the final state, to reconstruct at the end
            snapshots.write(progress.images, power)
        if last_saved_step != progress.step:
            save(force_sync=True, evaluation=evaluation)
        ckpt.wait()
        outputs.finish(engine, ema, model_cfg, cfg, env.is_main, progress, metrics)
    ckpt.wait()
    return exit_code


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _audit(run_dir: str, rank: int, step: int, batches: list[dict]) -> None:
    os.makedirs(os.path.join(run_dir, "data_audit"), exist_ok=True)
    with open(os.path.join(run_dir, "data_audit", f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "index": [int(i) for b in batches for i in b["index"]]}) + "\n")


def _check_same_profiles(cfg: Config, meta: dict) -> None:
    """Power EMA profiles start at image 0: a resume may drop them (ema.stds=[]) but not add or change one."""
    old = sorted((meta.get("config") or {}).get("ema", {}).get("stds", []))
    if old != sorted(cfg.ema.stds):
        raise ConfigError(f"ema.stds={sorted(cfg.ema.stds)} but the run being resumed tracks {old} (power EMA profiles "
                          f"start at image 0): keep ema.stds, set ema.stds=[] to stop them, or use a new run_dir")


def _check_data_matches_model(manifest, model_cfg, cfg: Config) -> None:
    h, w = cfg.data.image_hw(manifest.image_size)  # data.image_size when set: the stream resizes to it
    shapes = manifest.extra.get("image_shapes") or {}  # a crawl indexed by `shards index` lists its image sizes
    if cfg.data.resize == "none" and len(shapes) > 1:
        raise ConfigError(f"data '{cfg.data.source}' has {len(shapes)} image sizes and data.resize is none: set "
                          f"data.image_size and data.resize (center_crop, random_crop, border or stretch)")
    mh, mw = manifest.image_size
    if cfg.data.resize == "none" and (h, w) != (mh, mw):
        raise ConfigError(f"data.image_size {h}x{w} differs from the {mh}x{mw} images of '{cfg.data.source}' but "
                          f"data.resize is none: set data.resize=center_crop (or random_crop, border, stretch)")
    if (h, w) != (model_cfg.image_size, model_cfg.image_size):
        what = (f"data.image_size is {h}x{w}" if cfg.data.image_size is not None
                else f"data '{cfg.data.source}' has {h}x{w} images")
        raise ConfigError(f"{what} but model.image_size is {model_cfg.image_size}")
    if manifest.channels != model_cfg.in_channels:
        raise ConfigError(f"data '{cfg.data.source}' has {manifest.channels} channel(s) but model.in_channels is "
                          f"{model_cfg.in_channels}")
    if model_cfg.num_classes and manifest.num_classes > model_cfg.num_classes:
        raise ConfigError(f"data has {manifest.num_classes} classes but model.num_classes is {model_cfg.num_classes}")
