"""Training step time on the CPU with glibc's default malloc against the settings init_distributed applies
(ddpm_dist/cpu_malloc.py): freed activation memory kept in the process instead of being returned to
the kernel and faulted back in. Each round runs both in fresh child processes, in alternating order; the
median round counts.

    .venv/bin/python bench/cpu_malloc_bench.py [--preset digits] [--batch 128] [--steps 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_args import model_bench_parser  # noqa: E402 - beside this file (bench/ is sys.path[0])


def child(args) -> None:
    import torch
    import torch.nn.functional as F

    from ddpm_dist.config import load_config
    from ddpm_dist.cpu_malloc import keep_freed_memory
    from ddpm_dist.diffusion import make_schedule, q_sample
    from ddpm_dist.models import UNet, resolve_model_config

    if args.child == "kept":
        assert keep_freed_memory(), "mallopt refused"
    cfg = load_config(None, [f"model.preset={args.preset}"])
    model_cfg = resolve_model_config(cfg.model)
    torch.manual_seed(0)
    model = UNet(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
    schedule = make_schedule("linear", 1000)
    shape = (args.batch, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    x0, y = torch.rand(shape) * 2 - 1, torch.randint(0, max(model_cfg.num_classes, 1), (args.batch,))
    y = y if model_cfg.num_classes else None

    def step():
        t = torch.randint(0, 1000, (args.batch,))
        noise = torch.randn(shape)
        F.mse_loss(model(q_sample(schedule, x0, t, noise), t, y=y), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    faults0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(args.steps):
        step()
    print(
        json.dumps(
            {
                "step_s": (time.perf_counter() - t0) / args.steps,
                "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / args.steps,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def run_child(mode: str, args) -> dict:
    env = dict(os.environ)
    env.pop("DDPM_KEEP_MALLOC", None)
    if mode == "default":
        env["DDPM_KEEP_MALLOC"] = "1"  # keep_freed_memory() leaves a user's allocator alone: glibc's defaults stay
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--preset",
            args.preset,
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = model_bench_parser(__doc__, preset="digits", batch=128, steps=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--child", choices=("kept", "default"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    results = {"kept": [], "default": []}
    for r in range(args.rounds):
        for mode in ("kept", "default") if r % 2 else ("default", "kept"):
            results[mode].append(run_child(mode, args))
    med = {
        m: [statistics.median(x[k] for x in v) for k in ("step_s", "faults", "peak_rss_mb")] for m, v in results.items()
    }
    print(f"model {args.preset}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps, fresh processes")
    for m in ("default", "kept"):
        print(
            f"  {m:8s} malloc: {med[m][0] * 1e3:7.1f} ms/step, {med[m][1]:8.0f} page faults/step, "
            f"peak RSS {med[m][2]:6.0f} MB"
        )
    print(
        f"step time kept/default {med['kept'][0] / med['default'][0]:.3f}, "
        f"peak RSS kept/default {med['kept'][2] / med['default'][2]:.3f}"
    )


if __name__ == "__main__":
    main()
