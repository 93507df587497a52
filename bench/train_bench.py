"""Training-loop overhead and scaling, measured side by side in one run.

1. Per-step time of our loop (single process, everything on: EMA, grad clipping, metrics sinks, preemption
   check, LR schedule) over a bare PyTorch loop (forward, loss, backward, AdamW step), same model, batch and
   step count, the same in-memory batches for both (data loading is bench/data_bench.py's business).
   Rounds alternate between the two and the median round counts. Goal: ratio <= 1.05. The process first
   takes the malloc settings every CPU process of ours runs with (ddpm_dist/cpu_malloc.py), so both loops
   share them; without them the page faults of either loop swing a round by several percent.
2. Images/s of 2-process DDP, FSDP2 and ZeRO-2 against 1 process on the same global batch (gloo on CPU).

    .venv/bin/python bench/train_bench.py [--preset digits] [--batch 128] [--steps 10] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_dist.config import ParallelConfig, TrainConfig, load_config  # noqa: E402
from ddpm_dist.diffusion import make_schedule, q_sample  # noqa: E402
from ddpm_dist.models import UNet, resolve_model_config  # noqa: E402


def batches(model_cfg, batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    return [
        {
            "image": torch.rand(shape, generator=g) * 2 - 1,
            "label": torch.randint(0, max(model_cfg.num_classes, 1), (batch,), generator=g),
        }
        for _ in range(n)
    ]


def bare_loop(model, data, schedule, num_classes, steps, opt_args):
    opt = torch.optim.AdamW(model.parameters(), **opt_args, foreach=True)
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for step in range(steps):
        b = data[step % len(data)]
        x0 = b["image"]
        t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        out = model(q_sample(schedule, x0, t, noise), t, y=b["label"] if num_classes else None)
        loss = F.mse_loss(out, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def optimizer_args(cfg) -> dict:
    """The config's AdamW settings, for both loops."""
    return dict(lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)


class OurLoop:
    """The pieces of training/loop.py's step, in its order, with every feature on."""

    def __init__(self, model, cfg, model_cfg, run_dir):
        from ddpm_dist.config import MetricsConfig
        from ddpm_dist.obs.metrics import Metrics
        from ddpm_dist.parallel import parallelize, read_env
        from ddpm_dist.parallel.sharded_ema import ShardedEMA
        from ddpm_dist.training.preemption import Preemption

        self.cfg, self.model_cfg = cfg, model_cfg
        self.engine = parallelize(
            model,
            ParallelConfig(backend="single"),
            read_env(),
            cfg.train,  # grad_clip 1, fp32
            micro_batch=cfg.train.global_batch,
            accum_steps=1,
        )
        self.ema = ShardedEMA(self.engine)
        self.metrics = Metrics(
            MetricsConfig(),
            rank=0,
            local_rank=0,
            world_size=1,
            run="bench",
            run_dir=run_dir,
            log_every=cfg.train.log_every,
        )
        self.preemption = Preemption(torch.device("cpu"))
        self.schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_steps)
        self.step = 0

    def run(self, data, steps):
        from ddpm_dist.parallel.sharded_ema import ema_beta
        from ddpm_dist.training.loop import StepRecipe, run_step
        from ddpm_dist.training.state import LRSchedule

        cfg = self.cfg
        lr_at = LRSchedule.from_config(cfg.train)
        t0 = time.perf_counter()
        for _ in range(steps):
            ts = time.perf_counter()
            lr = lr_at(self.step * cfg.train.global_batch)
            loss, norm = run_step(
                self.engine,
                self.schedule,
                [data[self.step % len(data)]],
                step=self.step,
                rank=0,
                world_size=1,
                recipe=StepRecipe.of(cfg, self.model_cfg.num_classes),
                lr=lr,
            )
            te = time.perf_counter()
            self.ema.update(
                ema_beta(
                    cfg.train.global_batch,
                    self.step * cfg.train.global_batch,
                    cfg.ema.halflife_images,
                    cfg.ema.warmup_ratio,
                )
            )
            self.step += 1
            self.metrics.train_step(
                step=self.step,
                images=self.step * cfg.train.global_batch,
                loss=loss,
                lr=lr,
                grad_norm=norm,
                step_seconds=time.perf_counter() - ts,
                data_wait=0.0,
                ema_seconds=time.perf_counter() - te,
                rank_images=cfg.train.global_batch,
                skipped_total=0,
                epoch=0,
            )
            if self.step % cfg.train.stop_check_every == 0:
                self.preemption.should_stop()
        return (time.perf_counter() - t0) / steps


def overhead(args):
    from ddpm_dist.cpu_malloc import keep_freed_memory

    keep_freed_memory()
    cfg = load_config(
        None,
        [
            f"model.preset={args.preset}",
            f"train.global_batch={args.batch}",
            "train.grad_clip=1.0",
            "train.log_every=10",
            "train.label_dropout=0.1",
        ],
    )
    model_cfg = resolve_model_config(cfg.model)
    data = batches(model_cfg, args.batch, 4)
    torch.manual_seed(0)
    ours_model, bare_model = UNet(model_cfg), UNet(model_cfg)
    bare_model.load_state_dict(ours_model.state_dict())
    ours = OurLoop(ours_model, cfg, model_cfg, tempfile.mkdtemp())
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_steps)
    ours.run(data, 3)  # warm-up both
    bare_loop(bare_model, data, schedule, model_cfg.num_classes, 3, optimizer_args(cfg))
    t_ours, t_bare = [], []
    for r in range(args.rounds):  # alternate which goes first
        if r % 2:
            t_ours.append(ours.run(data, args.steps))
        t_bare.append(bare_loop(bare_model, data, schedule, model_cfg.num_classes, args.steps, optimizer_args(cfg)))
        if not r % 2:
            t_ours.append(ours.run(data, args.steps))
    a, b = statistics.median(t_ours), statistics.median(t_bare)
    print(
        f"model {args.preset} ({sum(p.numel() for p in ours_model.parameters()) / 1e6:.2f}M), batch {args.batch}, "
        f"{args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} threads"
    )
    print(f"per step: ours {a * 1e3:.1f} ms, bare {b * 1e3:.1f} ms, ratio ours/bare {a / b:.3f}")


def scaling(args):
    """1 process vs 2 processes (torchrun-style spawn, gloo), same global batch."""
    from tests.support.dist_workers import spawn  # the same spawn helper the tests use

    results = {}
    out = tempfile.mkdtemp()
    for backend, world in (("single", 1), ("ddp", 2), ("fsdp", 2), ("zero", 2)):
        path = os.path.join(out, f"{backend}.txt")
        spawn(_scaling_worker, world, backend, args.preset, args.batch, args.steps, path)
        results[backend] = float(open(path).read())
    print(
        f"images/s at global batch {args.batch} (CPU, gloo; 2 processes share the machine's "
        f"{os.cpu_count()} cores with 1 thread each, 1 process uses all):"
    )
    for backend in ("single", "ddp", "fsdp", "zero"):
        print(
            f"  {backend:6s} {results[backend]:8.1f} img/s  "
            f"ratio to 1 process {results[backend] / results['single']:.2f}"
        )


def _scaling_worker(rank, world, backend, preset, batch, steps, path):
    from ddpm_dist.parallel import parallelize, read_env
    from ddpm_dist.parallel.sharded_ema import ShardedEMA
    from ddpm_dist.training.loop import StepRecipe, run_step

    if world == 1:
        torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(None, [f"model.preset={preset}", f"train.global_batch={batch}", "parallel.zero_stage=2"])
    model_cfg = resolve_model_config(cfg.model)
    torch.manual_seed(0)
    engine = parallelize(
        UNet(model_cfg),
        ParallelConfig(backend=backend, zero_stage=2),
        read_env(),
        TrainConfig(lr=1e-4, grad_clip=1.0),
        micro_batch=batch // world,
        accum_steps=1,
    )
    ema = ShardedEMA(engine)
    schedule = make_schedule("linear", 1000)
    data = batches(model_cfg, batch // world, 2, seed=rank)
    for step in range(steps + 3):
        if step == 3:
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            t0 = time.perf_counter()
        loss, _ = run_step(
            engine,
            schedule,
            [data[step % 2]],
            step=step,
            rank=rank,
            world_size=world,
            recipe=StepRecipe.of(cfg, model_cfg.num_classes),
            lr=1e-4,
        )
        ema.update(0.999)
    float(loss)
    if rank == 0:
        with open(path, "w") as f:
            f.write(str(steps * batch / (time.perf_counter() - t0)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits")
    p.add_argument("--batch", type=int, default=128, help="the DDPM paper's batch size")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--skip-scaling", action="store_true")
    args = p.parse_args()
    overhead(args)
    if not args.skip_scaling:
        scaling(args)
