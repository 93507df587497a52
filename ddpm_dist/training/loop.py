"""The training loop, top to bottom: step, log, sample, checkpoint, stop (set-up and resume: setup.py).

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
from collections.abc import Callable

import torch

from ..config import Config, DiffusionConfig, TrainConfig
from ..data.degrade import lowres_condition
from ..diffusion import diffusion_loss
from ..images import model_range
from ..obs.log import setup_logging
from ..parallel import init_distributed, read_env
from ..parallel.collectives import all_gather_ints, all_reduce_mean
from ..parallel.env import shutdown
from ..parallel.faults import PeerLost, describe_lost_peer
from ..parallel.heartbeat import start_heartbeat
from ..parallel.seeding import seed_device_rng
from ..parallel.sharded_ema import ema_beta
from ..rng import mix_seed
from . import outputs
from .preemption import REQUEUE_EXIT_CODE, record_exit, register_worker
from .randomness import rank_slots, slot_randomness
from .setup import build_run
from .state import Progress

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepRecipe:
    """What every step of a run reads from its config: fixed for the whole run."""

    seed: int
    train: TrainConfig
    diffusion: DiffusionConfig
    num_classes: int = 0

    @classmethod
    def of(cls, cfg: Config, num_classes: int = 0) -> StepRecipe:
        return cls(cfg.seed, cfg.train, cfg.diffusion, num_classes)


def run_step(
    engine,
    schedule,
    micro_batches: list[dict],
    *,
    recipe: StepRecipe,
    step: int,
    rank: int,
    world_size: int,
    lr: float,
    before_update: Callable[[], None] = lambda: None,
) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches, as the run's recipe says;
    returns (mean loss on this rank, grad norm) as tensors on the device: nothing here waits for the GPU (the
    metrics read them every log_every steps). `before_update` runs between the backward passes and the optimizer
    step (an async checkpoint's staging copy must be complete before the weights change)."""
    device = engine.device
    accum = len(micro_batches)
    micro = micro_batches[0]["image"].shape[0]
    total = torch.zeros((), device=device)
    dropout = getattr(getattr(engine.module, "config", None), "dropout", 1.0) > 0
    for i, batch in enumerate(micro_batches):
        x0 = batch["image"].to(device, non_blocking=True)
        if x0.dtype == torch.uint8:  # the stream ships uint8 (a quarter of the bytes); callers may pass [-1, 1] floats
            x0 = model_range(x0)
        t, drop, noise = slot_randomness(
            recipe.seed,
            step,
            rank_slots(i, rank, world_size, micro),
            schedule.num_steps,
            x0.shape[1:],
            recipe.train.label_dropout,
            device,
        )
        kwargs = {}
        if recipe.num_classes:
            y = batch["label"].to(device)
            kwargs["y"] = torch.where(drop, torch.full_like(y, recipe.num_classes), y)
        if recipe.train.sr_factor:  # super-resolution: the condition is made from the batch itself
            kwargs["cond"] = lowres_condition(x0, recipe.train.sr_factor)
        if dropout:  # dropout masks from the global RNG: reseed per (step, micro-step, rank) for exact resume
            seed_device_rng(device, mix_seed(recipe.seed, step, i, rank))
        last = i == accum - 1
        with engine.sync_gradients(last):
            loss = diffusion_loss(
                engine.forward,
                schedule,
                x0,
                t,
                noise,
                prediction=recipe.diffusion.prediction,
                weighting=recipe.diffusion.loss_weighting,
                min_snr_gamma=recipe.diffusion.min_snr_gamma,
                model_kwargs=kwargs,
            )
            engine.backward(loss, accum, last)
        total += loss.detach().float()
    before_update()
    grad_norm = engine.step(lr, recipe.train.grad_clip)
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
    beat = start_heartbeat(env, cfg.parallel.heartbeat_timeout_s, step=lambda: progress.step)  # exits 2 on a loss
    with contextlib.ExitStack() as started:
        try:
            exit_code = _run(cfg, env, started, progress)
        except Exception as e:
            beat.stop(clean=False)  # this thread reports (or raises) from here on
            lost = describe_lost_peer(e, cfg.parallel.dist_timeout_s)
            if lost is None:
                raise
            raise PeerLost(
                f"{lost}; at step {progress.step}: relaunch to resume from the newest committed checkpoint"
            ) from e
    beat.stop()  # before the shutdown barrier: ranks that finish first are not taken for lost
    record_exit(env.rank, exit_code)
    shutdown()
    return exit_code


def _run(cfg: Config, env, started: contextlib.ExitStack, progress: Progress) -> int:
    run = build_run(cfg, env, started, progress)
    engine, ema, power, stream, ckpt, metrics = run.engine, run.ema, run.power, run.stream, run.ckpt, run.metrics
    steps_left = math.ceil(max(cfg.train.total_images - progress.images, 0) / cfg.train.global_batch)
    log.info(
        "%s: %s, %d rank(s), global batch %d = %d x %d ranks x %d accumulation, %d steps to go, %.2fM parameters",
        cfg.run_dir,
        run.backend,
        env.world_size,
        cfg.train.global_batch,
        run.micro,
        env.world_size,
        run.accum,
        steps_left,
        run.num_params / 1e6,
    )

    def committed():
        metrics.checkpoint(
            duration=ckpt.last_duration,
            stall=ckpt.last_stall,
            success_time=ckpt.last_success_time,
            images=ckpt.last_images,
        )

    def save(force_sync: bool = False, evaluation=None):
        ckpt.save(progress.step, progress.images, force_sync=force_sync, evaluation=evaluation)
        if ckpt.pending is None:  # an async save reports when it commits (ckpt.poll below)
            committed()

    def due(every_images: int) -> bool:
        return (
            every_images > 0
            and progress.images // every_images != (progress.images - cfg.train.global_batch) // every_images
        )

    data = _batches(stream, cfg)
    evaluator = None
    exit_code = 0
    last_saved_step = progress.step if run.resumed else -1
    first_step = progress.step
    recipe = StepRecipe.of(cfg, run.model_cfg.num_classes)
    while progress.images < cfg.train.total_images:  # counted in images: the batch may change across a resume
        # Section: one optimizer step, then the EMAs.
        t_step = time.perf_counter()
        wait0 = stream.data_wait_seconds
        batches = [next(data) for _ in range(run.accum)]
        if cfg.data.audit:
            _audit(cfg.run_dir, env.rank, progress.step, batches)
        lr = run.lr_schedule(progress.images)
        loss, grad_norm = run_step(
            engine,
            run.schedule,
            batches,
            step=progress.step,
            rank=env.rank,
            world_size=env.world_size,
            recipe=recipe,
            lr=lr,
            before_update=ckpt.wait_for_staging,
        )
        t_ema = time.perf_counter()
        ema.update(ema_beta(cfg.train.global_batch, progress.images, cfg.ema.halflife_images, cfg.ema.warmup_ratio))
        if power:
            power.update(progress.images + cfg.train.global_batch, cfg.train.global_batch)
        ema_seconds = time.perf_counter() - t_ema
        progress.step += 1
        progress.images += cfg.train.global_batch

        # Section: metrics.
        if progress.step == first_step + 1:  # optimizer state exists now: what each rank holds
            sizes = {
                **engine.local_bytes(),
                "ema": ema.local_bytes(),
                **({"power_ema": power.local_bytes()} if power else {}),
            }
            metrics.state_bytes([dict(zip(sizes, row)) for row in all_gather_ints(list(sizes.values()), env.device)])
        if ckpt.poll():
            committed()
        if power and due(cfg.ema.snapshot_every_images):  # before any checkpoint of this step: none is ever skipped
            run.snapshots.write(progress.images, power)
        row = metrics.train_step(
            step=progress.step,
            images=progress.images,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            step_seconds=time.perf_counter() - t_step,
            data_wait=stream.data_wait_seconds - wait0,
            ema_seconds=ema_seconds,
            rank_images=run.micro * run.accum,
            skipped_total=stream.skipped_total,
            epoch=stream.epoch,
            loss_mean_fn=lambda v: all_reduce_mean([v], env.device)[0],
        )
        if row is not None and not math.isfinite(row["loss"]):
            log.error("loss is %s at step %d; stopping without saving", row["loss"], progress.step)
            exit_code = 1
            break

        # Section: samples and the in-training Fréchet distance.
        if due(cfg.train.sample_every_images):
            outputs.sample_grid(run, progress.images)
        evaluation = None  # the Fréchet distance of this step's EMA: a checkpoint of these weights records it
        if due(cfg.eval.every_images):
            if evaluator is None:
                from .in_training_eval import InTrainingEval

                evaluator = InTrainingEval(cfg, env.device, env.rank, env.world_size)
            value = evaluator(outputs.ema_model(run), progress.images, metrics)
            evaluation = {"frechet_distance": value, "extractor": evaluator.extractor.name, "images": progress.images}

        # Section: stop (preemption, wall-clock budget) or checkpoint.
        if progress.step % cfg.train.stop_check_every == 0 and run.preemption.should_stop():
            log.info(
                "stopping at step %d (%s): saving a checkpoint, exit %d = requeue",
                progress.step,
                run.preemption.reason,
                REQUEUE_EXIT_CODE,
            )
            save(force_sync=True, evaluation=evaluation)
            last_saved_step = progress.step
            metrics.event("preempted", step=progress.step, reason=run.preemption.reason)
            exit_code = REQUEUE_EXIT_CODE
            break
        if due(cfg.checkpoint.every_images) or (evaluation and cfg.checkpoint.keep_best):
            save(evaluation=evaluation)  # keep_best: every evaluated state is saved, so the best one can be kept
            last_saved_step = progress.step

    # Section: the end: the last snapshot and checkpoint, the export, the final grid and curves.
    if exit_code == 0:
        if power and run.snapshots.last_images != progress.images:  # the final state, to reconstruct at the end
            run.snapshots.write(progress.images, power)
        if last_saved_step != progress.step:
            save(force_sync=True, evaluation=evaluation)
        ckpt.wait()
        outputs.write_final(run)
    ckpt.wait()
    return exit_code


def _audit(run_dir: str, rank: int, step: int, batches: list[dict]) -> None:
    os.makedirs(os.path.join(run_dir, "data_audit"), exist_ok=True)
    with open(os.path.join(run_dir, "data_audit", f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "index": [int(i) for b in batches for i in b["index"]]}) + "\n")
