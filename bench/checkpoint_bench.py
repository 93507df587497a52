"""Checkpoint cost, side by side in one run: the training stall of a synchronous save and of an async
save (dcp.async_save: the loop waits only for staging), each over the time of one training step, and the
total overhead of checkpointing every N steps in percent of training time. Goal: async stall < 10% of sync.
Each mode runs with the file digests the marker records (artifacts/digests.py) and "before" them (a plain DCP
writer, no digests), and the restore of the newest checkpoint is timed with and without verifying it first (fresh
managers; each restore's verification and load timed apart, page cache warm). Goals: restore with / without
<= 1.15; the async stall with digests <= 0.10 of a sync save's. The async "stall" of the first table is save() plus
the wait for its staging copy with nothing to overlap it (the worst case); "in training" is what the loop waits when
the copy runs beside the next step's forward and backward (the manager's last_stall, as the run's metrics report
it). "async-fresh" is the async save before this stager: a staging copy allocated anew at every save and made before
save() returns (a stager per save, what dcp.async_save does when given none).

    .venv/bin/python bench/checkpoint_bench.py [--preset ddpm-cifar10] [--batch 4] [--every 5] [--steps 20]
        [--repeats 6]     # --steps 0: the stalls and restores only
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from torch.distributed.checkpoint import FileSystemWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_args import model_bench_parser  # noqa: E402 - beside this file (bench/ is sys.path[0])

from ddpm_dist.artifacts import digests  # noqa: E402
from ddpm_dist.config import ParallelConfig, TrainConfig, load_config  # noqa: E402
from ddpm_dist.diffusion import make_schedule  # noqa: E402
from ddpm_dist.models import UNet, resolve_model_config  # noqa: E402
from ddpm_dist.parallel import parallelize, read_env  # noqa: E402
from ddpm_dist.parallel.sharded_ema import ShardedEMA  # noqa: E402
from ddpm_dist.training.async_save import AsyncSaver  # noqa: E402
from ddpm_dist.training.checkpoint import CheckpointManager  # noqa: E402
from ddpm_dist.training.loop import StepRecipe, run_step  # noqa: E402


def plain_writer(path, rank=0, world=1, others=()):
    """The DCP writer before digests: a marker without files."""
    writer = FileSystemWriter(path)
    writer.files = {}
    return writer


def time_restores(directory, parts, repeats=5) -> tuple[float, float, float]:
    """Medians of a restore's verification, its load, and of (verification + load) / load per restore (fresh
    managers; paired in each restore, so a machine whose speed drifts between restores does not skew the ratio)."""
    verify, load, ratio = [], [], []
    for _ in range(repeats):
        manager = CheckpointManager(directory, parts, rank=0, keep_last=2)
        t0 = time.perf_counter()
        path = manager.latest()  # what restore_latest() does first: every file against its digest
        t1 = time.perf_counter()
        manager.load(path)  # then the load alone (already verified)
        t2 = time.perf_counter()
        verify.append(t1 - t0)
        load.append(t2 - t1)
        ratio.append((t2 - t0) / (t2 - t1))
    return statistics.median(verify), statistics.median(load), statistics.median(ratio)


def main():
    p = model_bench_parser(__doc__, preset="ddpm-cifar10", batch=4, steps=20)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--repeats", type=int, default=6, help="saves per mode and restores (medians)")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = p.parse_args()
    cfg = load_config(None, [f"model.preset={args.preset}", f"train.global_batch={args.batch}"])
    model_cfg = resolve_model_config(cfg.model)
    torch.manual_seed(0)
    engine = parallelize(
        UNet(model_cfg),
        ParallelConfig(backend="single"),
        read_env(),
        TrainConfig(lr=1e-4, grad_clip=1.0),
        micro_batch=args.batch,
        accum_steps=1,
    )
    ema = ShardedEMA(engine)
    schedule = make_schedule("linear", 1000)
    shape = (args.batch, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    data = [{"image": torch.rand(shape) * 2 - 1, "label": torch.zeros(args.batch, dtype=torch.long)}]
    root = args.dir or tempfile.mkdtemp(prefix="ddpm-ckptbench-")
    step = 0

    def train(n, manager=None):
        nonlocal step
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            loss, _ = run_step(
                engine,
                schedule,
                data,
                step=step,
                rank=0,
                world_size=1,
                recipe=StepRecipe.of(cfg, model_cfg.num_classes),
                lr=1e-4,
                before_update=manager.wait_for_staging if manager else lambda: None,
            )
            ema.update(0.999)
            float(loss)
            step += 1
            times.append(time.perf_counter() - t0)
        return times

    train(2)  # warm-up, and optimizer state exists
    step_time = statistics.median(train(5))
    size = sum(t.numel() * t.element_size() for t in engine.module.parameters()) * 4  # params, 2 Adam moments, EMA
    parts, real_writer = {"engine": engine, "ema": ema}, digests.digesting_writer
    modes = ("sync", "sync-before", "async", "async-before", "async-fresh")
    managers = {
        m: CheckpointManager(os.path.join(root, m), parts, rank=0, keep_last=2, async_save=m.startswith("async"))
        for m in modes
    }
    stalls = {m: [] for m in modes}
    for r in range(args.repeats):  # interleaved, a load that drifts touches all alike; each pair's order flips,
        # as a save's staging is faster right after an async one freed the memory it then reuses
        for mode in modes if r % 2 == 0 else (modes[1], modes[0], modes[4], modes[3], modes[2]):
            digests.digesting_writer = plain_writer if mode.endswith("before") else real_writer
            if mode == "async-fresh":  # before: a new stager for every save, staging before save() returns
                managers[mode]._async = AsyncSaver(staging_thread=False)
            t0 = time.perf_counter()
            managers[mode].save(step, step * args.batch)
            managers[mode].wait_for_staging()  # nothing to overlap here: the stall if the next step had no work
            stalls[mode].append(time.perf_counter() - t0)
            managers[mode].wait()
            digests.digesting_writer = real_writer
    stall = {m: statistics.median(v) for m, v in stalls.items()}
    verify, load, restore_ratio = time_restores(os.path.join(root, "sync"), parts, args.repeats)
    overhead, in_training = {}, {"sync": [], "async": []}
    for mode in ("sync", "async") if args.steps else ():  # steady state: a checkpoint every `every` steps
        manager, saved = managers[mode], False
        t0 = time.perf_counter()
        for i in range(args.steps):
            train(1, manager)
            if saved:  # the stall the loop saw: save() and, async, the wait for the staging before the update
                in_training[mode].append(manager.last_stall)
                saved = False
            manager.poll()
            if (i + 1) % args.every == 0:
                manager.save(step, step * args.batch)
                saved = True
        manager.wait()
        if saved:
            in_training[mode].append(manager.last_stall)
        overhead[mode] = (time.perf_counter() - t0 - step_time * args.steps) / (step_time * args.steps)
    print(f"model {args.preset}: {size / 1e6:.0f} MB of state; batch {args.batch}; one step {step_time * 1e3:.0f} ms")
    print(f"{'mode':12s} {'stall':>9s} {'stall/step':>11s} {'overhead every ' + str(args.every) + ' steps':>26s}")
    for mode in modes:
        cell = f"{100 * overhead[mode]:25.1f}%" if mode in overhead else f"{'-':>26s}"
        print(f"{mode:12s} {stall[mode] * 1e3:7.0f}ms {stall[mode] / step_time:11.2f} {cell}")
    ratio, before = (stall[f"async{m}"] / stall[f"sync{m}"] for m in ("", "-before"))
    print(f"async stall / sync stall = {ratio:.3f} with digests (goal <= 0.10), {before:.3f} before")
    print(f"async stall with / before digests = {stall['async'] / stall['async-before']:.3f}")
    print(f"async stall, one stager for the run / a stager per save = {stall['async'] / stall['async-fresh']:.3f}")
    if args.steps:
        sync_t, async_t = (statistics.median(in_training[m]) for m in ("sync", "async"))
        print(
            f"in training (staging beside the next step's forward and backward): sync {sync_t * 1e3:.0f} ms, "
            f"async {async_t * 1e3:.0f} ms, async / sync = {async_t / sync_t:.3f} (goal <= 0.10)"
        )
    print(f"sync stall with / before digests = {stall['sync'] / stall['sync-before']:.3f}")
    print(
        f"restore: verification {verify * 1e3:.0f} ms + load {load * 1e3:.0f} ms; with / without verification = "
        f"{restore_ratio:.3f} (goal <= 1.15)"
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
