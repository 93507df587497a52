"""python -m ddpm_dist.train --config FILE [section.key=value ...]

Runs as one process, or under torchrun / SLURM (srun) as many. Resumes by itself from the newest
committed checkpoint in run_dir. Exit code 75 means "preempted, checkpoint saved: requeue me"."""

from __future__ import annotations

import argparse

from .command_line import run_cli
from .config import load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ddpm_dist.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config (configs/digits.yaml, configs/smoke.yaml, configs/cifar10.yaml, ...)")
    p.add_argument(
        "overrides", nargs="*", help="section.key=value, e.g. train.total_images=20000 parallel.backend=fsdp"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from .config import dump_yaml

        print(dump_yaml(cfg), end="")
        return 0
    from .training.loop import train

    return train(cfg)


if __name__ == "__main__":
    run_cli(main)
