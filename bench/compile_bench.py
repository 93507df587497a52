"""torch.compile, activation checkpointing and channels_last, measured side by side in one run (one process, fp32).

1. Training step time (the single-process Engine through the loop's run_step: forward, loss, backward, clipping,
   AdamW) compiled over eager, per preset at the same batch, with the compile time (the first compiled step less
   an eager step) beside it. Rounds alternate in a rotating order; the median round counts. Inductor's cache starts
   empty (a temporary folder) unless --warm-cache: the compile time is the cold one.
2. Peak memory of a training step with model.activation_checkpointing = block and level, over none, each in a
   fresh process: on the CPU, the peak RSS (VmHWM) less the RSS before the first forward (weights, gradients and
   optimizer state already allocated, so what is left is activations and temporaries; glibc's mmap threshold fixed
   so the RSS follows the live tensors); on a GPU, max_memory_allocated less the memory allocated before. Step
   time beside it, the three side by side in one process (the price: a second forward of what is recomputed).
3. channels_last over contiguous step time, eager, on the memory preset.

    .venv/bin/python bench/compile_bench.py [--presets digits,ddpm-cifar10] [--batch 16] [--steps 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ddpm_dist.config import ParallelConfig, TrainConfig, load_config  # noqa: E402
from ddpm_dist.diffusion import make_schedule  # noqa: E402
from ddpm_dist.models import UNet, resolve_model_config  # noqa: E402


class Trainer:
    """An Engine (single process) and the loop's step on fixed batches."""

    def __init__(self, preset: str, batch: int, state: dict, ac: str = "", **engine_kw):
        from ddpm_dist.parallel import parallelize, read_env

        self.cfg = load_config(
            None,
            [
                f"model.preset={preset}",
                f"train.global_batch={batch}",
                "train.grad_clip=1.0",
                f"model.activation_checkpointing={ac}",
            ],
        )
        self.model_cfg = resolve_model_config(self.cfg.model)
        module = UNet(self.model_cfg)
        module.load_state_dict(state)
        self.engine = parallelize(
            module,
            ParallelConfig(backend="single"),
            read_env(),
            TrainConfig(lr=1e-4, grad_clip=1.0, **engine_kw),
            micro_batch=batch,
            accum_steps=1,
        )
        self.schedule = make_schedule("linear", 1000)
        g = torch.Generator().manual_seed(0)
        c, s = self.model_cfg.in_channels, self.model_cfg.image_size
        self.batches = [
            {
                "image": torch.rand(batch, c, s, s, generator=g) * 2 - 1,
                "label": torch.randint(0, max(self.model_cfg.num_classes, 1), (batch,), generator=g),
            }
            for _ in range(2)
        ]
        self.step = 0

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        from ddpm_dist.training.loop import StepRecipe, run_step

        t0 = time.perf_counter()
        for _ in range(steps):
            loss, _ = run_step(
                self.engine,
                self.schedule,
                [self.batches[self.step % 2]],
                step=self.step,
                rank=0,
                world_size=1,
                recipe=StepRecipe.of(self.cfg, self.model_cfg.num_classes),
                lr=1e-4,
            )
            self.step += 1
        float(loss)
        return (time.perf_counter() - t0) / steps


def side_by_side(makers: list, steps: int, rounds: int) -> tuple[list[float], list[float]]:
    """(median s/step, first step s) of each trainer: one first step each, then rounds of `steps` steps in an order
    that rotates every round, so no trainer always runs after the same one."""
    trainers = [make() for make in makers]
    first = [t.run(1) for t in trainers]
    times: list[list[float]] = [[] for _ in trainers]
    for r in range(rounds):
        for i in range(len(trainers)):
            k = (i + r) % len(trainers)
            times[k].append(trainers[k].run(steps))
    return [statistics.median(t) for t in times], first


def initial_state(preset: str) -> dict:
    torch.manual_seed(0)
    return UNet(resolve_model_config(preset)).state_dict()


def compile_ratio(args):
    print(
        f"compiled vs eager, batch {args.batch}, fp32, {args.rounds} rounds x {args.steps} steps, "
        f"{torch.get_num_threads()} threads, inductor cache {'warm' if args.warm_cache else 'cold'}"
    )
    for preset in args.presets.split(","):
        state = initial_state(preset)
        (compiled, eager), (first, _) = side_by_side(
            [
                lambda p=preset, s=state: Trainer(p, args.batch, s, compile=True),
                lambda p=preset, s=state: Trainer(p, args.batch, s),
            ],
            args.steps,
            args.rounds,
        )
        print(
            f"  {preset:13s} eager {eager * 1e3:8.1f} ms/step, compiled {compiled * 1e3:8.1f} ms/step, ratio "
            f"compiled/eager {compiled / eager:.3f}; compile time {first - eager:.0f} s"
        )


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_worker(preset: str, batch: int, ac: str, steps: int) -> None:
    """One configuration in this (fresh) process: prints its peak and the memory before its first step as JSON.
    CPU: VmHWM, reset to the current RSS at the baseline (ru_maxrss would not do: Linux carries it across
    fork and exec, so a child of a big parent starts with the parent's peak)."""
    t = Trainer(preset, batch, initial_state(preset), ac=ac)
    engine = t.engine
    for p in engine.module.parameters():  # gradients and AdamW state exist before the baseline
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        base = _status_bytes("VmRSS")
    t.run(steps)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    print(json.dumps({"peak": peak, "base": base}))


def memory_ratio(args):
    modes = ("", "block", "level")
    rows = {}
    for ac in modes:
        # A fixed mmap threshold: every tensor buffer is mapped on allocation and unmapped on free, so the RSS
        # follows the live tensors (glibc's default moves the threshold up and keeps freed memory, run by run).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        r = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-worker",
                ac,
                "--memory-preset",
                args.memory_preset,
                "--batch",
                str(args.batch),
                "--steps",
                "2",
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        rows[ac] = json.loads(r.stdout.strip().splitlines()[-1])
    state = initial_state(args.memory_preset)
    seconds, _ = side_by_side(
        [lambda ac=ac: Trainer(args.memory_preset, args.batch, state, ac=ac) for ac in modes], args.steps, args.rounds
    )
    where = "GPU max_memory_allocated" if torch.cuda.is_available() else "CPU peak RSS"
    none = rows[""]["peak"] - rows[""]["base"]
    print(
        f"activation checkpointing, {args.memory_preset} at batch {args.batch}: peak of a training step less the "
        f"state before it ({where}, a fresh process each), step time side by side in one process:"
    )
    for ac, t in zip(modes, seconds):
        act = rows[ac]["peak"] - rows[ac]["base"]
        print(
            f"  {ac or 'none':6s} activations {act / 2**20:6.0f} MiB (peak {rows[ac]['peak'] / 2**20:6.0f} MiB), "
            f"{t * 1e3:7.0f} ms/step; ratio to none: memory {act / none:.2f}, time {t / seconds[0]:.2f}"
        )


def channels_last_ratio(args):
    state = initial_state(args.memory_preset)
    (nhwc, nchw), _ = side_by_side(
        [
            lambda: Trainer(args.memory_preset, args.batch, state, channels_last=True),
            lambda: Trainer(args.memory_preset, args.batch, state),
        ],
        args.steps,
        args.rounds,
    )
    print(
        f"channels_last, {args.memory_preset} at batch {args.batch}, eager: {nhwc * 1e3:.1f} ms/step vs contiguous "
        f"{nchw * 1e3:.1f} ms/step, ratio channels_last/contiguous {nhwc / nchw:.3f}"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="digits,ddpm-cifar10")
    p.add_argument("--memory-preset", default="ddpm-cifar10")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's usual cache (compile time not cold)")
    p.add_argument("--skip", default="", help="parts to leave out: compile,memory,channels_last")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker is not None:
        memory_worker(args.memory_preset, args.batch, args.memory_worker, args.steps)
        sys.exit(0)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    skip = set(args.skip.split(","))
    if "compile" not in skip:
        compile_ratio(args)
    if "memory" not in skip:
        memory_ratio(args)
    if "channels_last" not in skip:
        channels_last_ratio(args)
