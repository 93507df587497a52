"""Checkpoint cost, side by side in one run: the training stall of a synchronous save and of an async
save (dcp.async_save: the loop waits only for staging), each over the time of one training step, and the
total overhead of checkpointing every N steps in percent of training time. Goal: async stall < 10% of sync.

    .venv/bin/python bench/checkpoint_bench.py [--preset ddpm-cifar10] [--batch 4] [--every 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_dist.config import ParallelConfig, TrainConfig, load_config  # noqa: E402
from ddpm_dist.diffusion import make_schedule  # noqa: E402
from ddpm_dist.models import UNet, resolve_model_config  # noqa: E402
from ddpm_dist.parallel import parallelize, read_env  # noqa: E402
from ddpm_dist.parallel.sharded_ema import ShardedEMA  # noqa: E402
from ddpm_dist.training.checkpoint import CheckpointManager  # noqa: E402
from ddpm_dist.training.loop import StepRecipe, run_step  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ddpm-cifar10")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=5)
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

    def train(n):
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
            )
            ema.update(0.999)
            float(loss)
            step += 1
            times.append(time.perf_counter() - t0)
        return times

    train(2)  # warm-up, and optimizer state exists
    step_time = statistics.median(train(5))
    size = sum(t.numel() * t.element_size() for t in engine.module.parameters()) * 4  # params, 2 Adam moments, EMA
    results = {}
    for mode in ("sync", "async"):
        directory = os.path.join(root, mode)
        manager = CheckpointManager(
            directory, {"engine": engine, "ema": ema}, rank=0, keep_last=2, async_save=mode == "async"
        )
        stalls = []
        for _ in range(3):
            t0 = time.perf_counter()
            manager.save(step, step * args.batch)
            stalls.append(time.perf_counter() - t0)
            train(1)
            manager.wait()
        t0 = time.perf_counter()  # steady state: checkpoint every `every` steps while training
        for i in range(args.steps):
            train(1)
            manager.poll()
            if (i + 1) % args.every == 0:
                manager.save(step, step * args.batch)
        manager.wait()
        total = time.perf_counter() - t0
        results[mode] = (statistics.median(stalls), total)
        shutil.rmtree(directory, ignore_errors=True)
    train_only = step_time * args.steps
    print(f"model {args.preset}: {size / 1e6:.0f} MB of state; batch {args.batch}; one step {step_time * 1e3:.0f} ms")
    print(f"{'mode':6s} {'stall':>9s} {'stall/step':>11s} {'overhead every ' + str(args.every) + ' steps':>26s}")
    for mode, (stall, total) in results.items():
        print(
            f"{mode:6s} {stall * 1e3:7.0f}ms {stall / step_time:11.2f} {100 * (total - train_only) / train_only:25.1f}%"
        )
    print(f"async stall / sync stall = {results['async'][0] / results['sync'][0]:.3f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
