"""python -m ddpm_dist.ema reconstruct --run DIR --std 0.03,0.05,0.08 [--images N] [--world-size N] [--out DIR]

Post-hoc EMA (Karras et al. 2024, EDM2): a run trained with ema.stds (power-function EMA profiles) and
ema.snapshot_every_images leaves snapshots under RUN/ema_snapshots; this combines them, by least squares over the
profiles, into the EMA of any other relative std, written as an export per std (RUN/ema_exports/phema-<images>-<std>
.safetensors by default; `python -m ddpm_dist.sample --export FILE` samples it). --world-size N spawns N local
workers (unless launched by torchrun or SLURM), each reconstructing its share of the tensors; rank 0 writes."""
from __future__ import annotations

import argparse
import os

from ..cli_common import is_rank0, run_cli
from ..parallel.env import spawn_local
from .reconstruct import check_stds, make_plan, reconstruct


def parse_stds(text: str) -> list[float]:
    try:
        return check_stds([float(v) for v in text.split(",") if v.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_dist.ema", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reconstruct", help="exports of the post-hoc EMA at the given relative stds")
    r.add_argument("--run", required=True, help="run directory (its ema_snapshots/ are read)")
    r.add_argument("--std", required=True, type=parse_stds, help="comma-separated relative stds in (0, 0.28)")
    r.add_argument("--images", type=int, default=None, help="training time to reconstruct (a snapshot time; "
                                                              "default: the newest)")
    r.add_argument("--out", default=None, help="output folder (default: RUN/ema_exports)")
    r.add_argument("--world-size", type=int, default=1, help="local workers to spawn (ignored under torchrun/SLURM)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or os.path.join(args.run, "ema_exports")
    plan = make_plan(args.run, args.std, args.images)  # bad input fails here, before any worker starts
    spawn_local(reconstruct, (args.run, args.std, out, plan.images), args.world_size)
    if is_rank0():
        for std in plan.stds:
            print(os.path.join(out, f"phema-{plan.images:012d}-{std:.4f}.safetensors"))
    return 0


if __name__ == "__main__":
    run_cli(main)
