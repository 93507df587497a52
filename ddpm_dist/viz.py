"""python -m ddpm_dist.viz schedules|curves|compare|forward-reverse|diversity|nfe ... -> PNG figures."""

from __future__ import annotations

import argparse
import os

from .command_line import add_model_source, model_source, run_cli
from .diffusion.options import SAMPLER_NAMES, SPACINGS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_dist.viz", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("schedules", help="beta, alpha-bar and SNR (log) of every schedule kind")
    s.add_argument("--steps", type=int, default=1000)
    c = sub.add_parser("curves", help="loss, images/s and learning rate from a run's metrics.jsonl")
    c.add_argument("--run", required=True)
    d = sub.add_parser("diversity", help="sample diversity (mean pairwise distance) over training")
    d.add_argument("--run", required=True)
    for name, helptext in (
        ("compare", "DDPM vs DDIM at several step counts from the same noise, with time per image"),
        ("forward-reverse", "the forward process beside a reverse trajectory"),
        (
            "nfe",
            "Frechet distance (digits classifier) and time per image against model calls for "
            "several samplers; prints a markdown table",
        ),
    ):
        m = sub.add_parser(name, help=helptext)
        add_model_source(m)
        m.add_argument("--num-images", type=int, default={"compare": 8, "nfe": 500}.get(name, 4))
        m.add_argument("--seed", type=int, default=0)
        if name == "nfe":
            m.add_argument(
                "--nfe",
                default="5,10,20,50,100",
                help="comma list of model calls per image (Heun: the odd count at or below each)",
            )
            m.add_argument(
                "--samplers",
                default="ddim,dpm++2m,heun",
                help=f"comma list of {', '.join(SAMPLER_NAMES)}; NAME@SPACING uses that spacing, "
                "NAME:10/20/50 those model calls instead of --nfe (e.g. dpm++2m@karras:10/20)",
            )
            m.add_argument("--batch-size", type=int, default=100)
            m.add_argument("--spacing", choices=SPACINGS, help="timestep spacing of every sampler (default: the run's)")
            m.add_argument("--data", help="shard manifest of the reference images (default: the run's data)")
            m.add_argument("--json", help="also write the points here")
        elif name == "compare":
            m.add_argument(
                "--samplers",
                default="ddpm:1000,ddpm:100,ddim:100,ddim:50,ddim:20,ddim:10",
                help="comma list of sampler:steps",
            )
            m.add_argument("--classes", default=None)
        else:
            m.add_argument("--data", help="shard manifest of real images (default: the run's data)")
            m.add_argument("--steps", type=int, default=8, help="columns per side")
    for sp in sub.choices.values():
        sp.add_argument("--out", required=True, help="PNG to write")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from .drawing import figures, plot_curves

    if args.cmd == "schedules":
        path = figures.schedules(args.out, args.steps)
    elif args.cmd == "curves":
        path = plot_curves(os.path.join(args.run, "metrics.jsonl"), args.out)
    elif args.cmd == "diversity":
        path = figures.diversity(os.path.join(args.run, "metrics.jsonl"), args.out)
    else:
        from .artifacts import load_trained, run_data_source
        from .parallel.env import read_env
        from .sampling import labels_for, prepare

        spacing = getattr(args, "spacing", None)
        setup = prepare(load_trained(model_source(args)), read_env().device, {"spacing": spacing} if spacing else None)
        if args.cmd == "nfe":
            path = run_nfe(setup, args, data=args.data or run_data_source(args.run))
        elif args.cmd == "compare":
            configs = []
            for item in args.samplers.split(","):
                name, _, steps = item.partition(":")
                if name not in SAMPLER_NAMES or not steps.isdigit():
                    raise ValueError(f"--samplers: '{item}' is not sampler:steps ({' or '.join(SAMPLER_NAMES)})")
                configs.append((name, int(steps)))
            labels = labels_for(list(range(args.num_images)), args.classes, setup.num_classes, args.seed)
            path = figures.compare_samplers(
                setup, configs, args.out, num_images=args.num_images, seed=args.seed, labels=labels
            )
        else:
            from .data import read_all

            data = args.data or run_data_source(args.run)
            if not data:
                raise ValueError("forward-reverse needs --data (a shard manifest of real images)")
            real, _ = read_all(data, limit=args.num_images)
            path = figures.forward_reverse(setup, real, args.out, steps=args.steps, seed=args.seed)
    print(path)
    return 0


def run_nfe(setup, args, data) -> str:
    """Measure (eval.nfe), print the table and the DPM-Solver++ 20 vs DDIM 100 comparison, draw the figure."""
    import json
    import time

    from .drawing import figures
    from .eval.job import make_extractor
    from .eval.nfe import frechet_at, markdown_table, measure
    from .eval.statistics import reference_stats

    plan = {}
    try:
        for item in args.samplers.split(","):
            name, _, own = item.partition(":")
            plan[name] = [int(c) for c in (own.split("/") if own else args.nfe.split(","))]
    except ValueError:
        plan = {}

    def bad(label, calls):
        name, _, spacing = label.partition("@")
        return name not in SAMPLER_NAMES or (spacing and spacing not in SPACINGS) or not calls or min(calls) < 1

    if not plan or any(bad(label, calls) for label, calls in plan.items()):
        raise ValueError(
            f"--samplers {args.samplers} / --nfe {args.nfe}: NAME[@SPACING][:N/N/...] with NAME in "
            f"{', '.join(SAMPLER_NAMES)}, SPACING in {', '.join(SPACINGS)}, positive model-call counts"
        )
    if not data:
        raise ValueError("nfe needs --data (the labelled shard manifest the run was trained on)")
    extractor = make_extractor("digits", data=data, device=setup.device)
    ref = reference_stats(extractor, data=data, batch_size=256)
    t0 = time.perf_counter()
    points = measure(
        setup,
        extractor,
        ref,
        plan,
        num_images=args.num_images,
        batch_size=args.batch_size,
        seed=args.seed,
        on_point=lambda p: print(f"{p.sampler} {p.calls} calls: {p.frechet:.3f}", flush=True),
    )
    o = setup.options
    print(
        f"\nFrechet distance (digits classifier features) of {args.num_images} images against {ref.n} reference images "
        f"(spacing {o.spacing}, guidance {o.guidance}, clip_x0 {o.clip_x0}); {time.perf_counter() - t0:.0f} s in all\n"
    )
    print(markdown_table(points))
    slow = frechet_at(points, "ddim", 100)
    for label in (lab for lab in plan if lab.startswith("dpm++2m")):
        fast = frechet_at(points, label, 20)
        if fast is not None and slow is not None:
            print(
                f"{label} at 20 calls / ddim at 100 calls, Frechet distance: {fast / slow:.3f} "
                f"({'within' if fast <= 1.05 * slow else 'not within'} 5%)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([vars(p) for p in points], f, indent=1)
    return figures.quality_per_call(points, args.out)


if __name__ == "__main__":
    run_cli(main)
