"""python -m ddpm_dist.viz schedules|curves|compare|forward-reverse|diversity ... -> PNG figures."""
from __future__ import annotations

import argparse
import os

from ..cli_common import run_cli
from ..diffusion.options import SAMPLER_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_dist.viz", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("schedules", help="beta, alpha-bar and SNR (log) of every schedule kind")
    s.add_argument("--steps", type=int, default=1000)
    c = sub.add_parser("curves", help="loss, images/s and learning rate from a run's metrics.jsonl")
    c.add_argument("--run", required=True)
    d = sub.add_parser("diversity", help="sample diversity (mean pairwise distance) over training")
    d.add_argument("--run", required=True)
    for name, helptext in (("compare", "DDPM vs DDIM at several step counts from the same noise, with time per image"),
                           ("forward-reverse", "the forward process beside a reverse trajectory")):
        m = sub.add_parser(name, help=helptext)
        src = m.add_mutually_exclusive_group(required=True)
        src.add_argument("--run")
        src.add_argument("--export")
        m.add_argument("--num-images", type=int, default=8 if name == "compare" else 4)
        m.add_argument("--seed", type=int, default=0)
        if name == "compare":
            m.add_argument("--samplers", default="ddpm:1000,ddpm:100,ddim:100,ddim:50,ddim:20,ddim:10",
                           help="comma list of sampler:steps")
            m.add_argument("--classes", default=None)
        else:
            m.add_argument("--data", help="shard manifest of real images (default: the run's data)")
            m.add_argument("--steps", type=int, default=8, help="columns per side")
    for sp in sub.choices.values():
        sp.add_argument("--out", required=True, help="PNG to write")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from . import figures, plot_curves
    if args.cmd == "schedules":
        path = figures.schedules(args.out, args.steps)
    elif args.cmd == "curves":
        path = plot_curves(os.path.join(args.run, "metrics.jsonl"), args.out)
    elif args.cmd == "diversity":
        path = figures.diversity(os.path.join(args.run, "metrics.jsonl"), args.out)
    else:
        from ..artifacts import load_trained, run_data_source
        from ..parallel.env import read_env
        from ..sampling import labels_for, prepare

        setup = prepare(load_trained(args.run or args.export), read_env().device)
        if args.cmd == "compare":
            configs = []
            for item in args.samplers.split(","):
                name, _, steps = item.partition(":")
                if name not in SAMPLER_NAMES or not steps.isdigit():
                    raise ValueError(f"--samplers: '{item}' is not sampler:steps ({' or '.join(SAMPLER_NAMES)})")
                configs.append((name, int(steps)))
            labels = labels_for(list(range(args.num_images)), args.classes, setup.num_classes, args.seed)
            path = figures.compare_samplers(setup, configs, args.out, num_images=args.num_images, seed=args.seed,
                                            labels=labels)
        else:
            from ..data import read_all
            data = args.data or run_data_source(args.run)
            if not data:
                raise ValueError("forward-reverse needs --data (a shard manifest of real images)")
            real, _ = read_all(data, limit=args.num_images)
            path = figures.forward_reverse(setup, real, args.out, steps=args.steps, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    run_cli(main)
