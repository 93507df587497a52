"""Per-rank cost of a training step's randomness (timesteps, label dropout, noise) as the world grows at a
fixed local batch: drawing only the rank's own slots (ddpm_dist, since issue 14) vs drawing the whole global
batch and slicing it (before issue 14). Side by side in one run; the ratio to world size 1 is what matters.

    .venv/bin/python bench/randomness_bench.py [--local-batch 16] [--size 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_dist.rng import mix_seed  # noqa: E402
from ddpm_dist.training.randomness import rank_slots, slot_randomness  # noqa: E402


def global_draw(seed, step, world_size, micro, shape, device):
    """The pre-issue-14 design: every rank draws the global batch, then keeps its slots."""
    g = torch.Generator(device).manual_seed(mix_seed(seed, step, 0x7A11))
    n = world_size * micro
    t = torch.randint(0, 1000, (n,), generator=g, device=device)
    drop = torch.rand(n, generator=g, device=device) < 0.1
    noise = torch.randn((n, *shape), generator=g, device=device)
    return t[:micro], drop[:micro], noise[:micro]


def timed(fn, reps: int, device) -> float:
    best = float("inf")
    for step in range(reps):
        t0 = time.perf_counter()
        fn(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local-batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device, shape, micro = torch.device(args.device), (3, args.size, args.size), args.local_batch
    print(f"local batch {micro} x {shape}, best of {args.reps}, {device}")
    print(f"{'world':>6} {'slots (ms)':>11} {'global (ms)':>12} {'slots / W=1':>12} {'global / W=1':>13}")
    base = None
    for world_size in (1, 2, 4, 8, 16, 32, 64):
        rank = world_size - 1  # the last rank: the slice the global draw wastes most on
        ours = timed(
            lambda s, rank=rank, world_size=world_size: slot_randomness(
                0, s, rank_slots(0, rank, world_size, micro), 1000, shape, 0.1, device
            ),
            args.reps,
            device,
        )
        old = timed(
            lambda s, world_size=world_size: global_draw(0, s, world_size, micro, shape, device), args.reps, device
        )
        base = base or (ours, old)
        print(f"{world_size:>6} {ours * 1e3:>11.2f} {old * 1e3:>12.2f} {ours / base[0]:>12.2f} {old / base[1]:>13.2f}")


if __name__ == "__main__":
    main()
