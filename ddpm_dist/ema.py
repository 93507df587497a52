"""python -m ddpm_dist.ema reconstruct|sweep ...

Post-hoc EMA (Karras et al. 2024, EDM2): a run trained with ema.stds (power-function EMA profiles) and
ema.snapshot_every_images leaves snapshots under RUN/ema_snapshots.

reconstruct  combines them, by least squares over the profiles, into the EMA of any other relative std, written as an
             export per std (RUN/ema_exports/phema-<images>-<std>.safetensors by default; `python -m ddpm_dist.sample
             --export FILE` samples it).
sweep        reconstructs each std of --std-range LOW:HIGH:COUNT (exports already written are reused), samples each
             from the same seeds and scores it with the Fréchet distance in the digits classifier's features (as
             `evaluate frechet --export`); writes OUT/sweep.json, OUT/sweep.png and OUT/best.safetensors (the best
             std's export; default OUT: RUN/ema_sweep) and prints a table and the best std. Only a std whose profile
             fit error (how well the run's snapshots express it) is at most --max-fit-error can be best; the others
             are listed as unreliable, and a range with none is an error that names the profiles to track.

--world-size N spawns N local workers (unless launched by torchrun or SLURM): reconstruction deals the tensors to
them, scoring the images; rank 0 writes."""

from __future__ import annotations

import argparse
import os

from .command_line import add_sampler_arguments, is_rank0, run_cli, sampler_overrides
from .parallel.env import spawn_local
from .posthoc.reconstruct import check_stds, export_path, make_plan, reconstruct


def parse_stds(text: str) -> list[float]:
    try:
        return check_stds([float(v) for v in text.split(",") if v.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ddpm_dist.ema", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reconstruct", help="exports of the post-hoc EMA at the given relative stds")
    r.add_argument("--run", required=True, help="run directory (its ema_snapshots/ are read)")
    r.add_argument("--std", required=True, type=parse_stds, help="comma-separated relative stds in (0, 0.28)")
    r.add_argument(
        "--images", type=int, default=None, help="training time to reconstruct (a snapshot time; default: the newest)"
    )
    r.add_argument("--out", default=None, help="output folder (default: RUN/ema_exports)")
    r.add_argument("--world-size", type=int, default=1, help="local workers to spawn (ignored under torchrun/SLURM)")
    s = sub.add_parser("sweep", help="Fréchet distance of the post-hoc EMA over a range of relative stds")
    s.add_argument(
        "--run", required=True, help="run directory (its ema_snapshots/ are read, exports go to RUN/ema_exports)"
    )
    s.add_argument(
        "--std-range",
        required=True,
        metavar="LOW:HIGH:COUNT",
        help="COUNT evenly spaced relative stds from LOW to HIGH, in (0, 0.28), e.g. 0.01:0.20:12",
    )
    s.add_argument("--num-images", type=int, default=500, help="images generated per std (the same seeds for each)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--classes", default=None, help="as for ddpm_dist.sample (default random)")
    s.add_argument(
        "--data",
        default=None,
        help="labelled shard manifest for the classifier and the reference (default: the run's training data)",
    )
    s.add_argument(
        "--max-fit-error",
        type=float,
        default=None,
        help="the largest relative profile fit error a std may have to be chosen as best (default: "
        "posthoc.sweep.DEFAULT_MAX_FIT_ERROR, docs/EMA.md)",
    )
    add_sampler_arguments(s)
    s.add_argument("--out", default=None, help="output folder (default: RUN/ema_sweep)")
    s.add_argument("--world-size", type=int, default=1, help="local workers to spawn (ignored under torchrun/SLURM)")
    return p


def reconstruct_command(args) -> int:
    out = args.out or os.path.join(args.run, "ema_exports")
    plan = make_plan(args.run, args.std, args.images)  # bad input fails here, before any worker starts
    spawn_local(reconstruct, (args.run, args.std, out, plan.images), args.world_size)
    if is_rank0():
        for std in plan.stds:
            print(export_path(out, plan.images, std))
    return 0


def sweep_command(args) -> int:
    from .posthoc.sweep import DEFAULT_MAX_FIT_ERROR, SweepJob, parse_std_range, run_sweep

    if args.num_images < 2:
        raise ValueError(f"--num-images {args.num_images}: a Fréchet distance needs at least 2 images")
    max_fit_error = DEFAULT_MAX_FIT_ERROR if args.max_fit_error is None else args.max_fit_error
    if not max_fit_error >= 0:
        raise ValueError(f"--max-fit-error {args.max_fit_error}: must be >= 0")
    job = SweepJob(
        args.run,
        parse_std_range(args.std_range),
        args.out or os.path.join(args.run, "ema_sweep"),
        num_images=args.num_images,
        batch_size=args.batch_size,
        seed=args.seed,
        classes=args.classes,
        sampler=sampler_overrides(args),
        data=args.data,
        max_fit_error=max_fit_error,
    )

    def progress(i: int, count: int, row: dict) -> None:
        how = "reused" if row["export_reused"] else "reconstructed"
        flag = "" if row["reliable"] else " (unreliable)"
        print(
            f"[{i + 1}/{count}] std {row['std']:.4f}: Fréchet distance {row['frechet_distance']:.4f}, profile fit "
            f"error {row['profile_fit_error']:.1e}{flag} ({how} {row['export']})",
            flush=True,
        )

    summary = run_sweep(job, args.world_size, progress)
    if summary is None:  # not rank 0
        return 0
    best = summary["best"]
    print(
        f"\npost-hoc EMA at {summary['images']} images, {summary['num_images']} images per std ({summary['metric']})\n"
    )
    print(
        "| EMA std | Fréchet distance | class accuracy | profile fit error | export |\n"
        "| ---: | ---: | ---: | ---: | --- |"
    )
    for r in summary["results"]:
        acc = f"{r['class_accuracy']:.3f}" if r["class_accuracy"] is not None else "-"
        mark = " (best)" if best and r["std"] == best["std"] else "" if r["reliable"] else " (unreliable)"
        print(
            f"| {r['std']:.4f}{mark} | {r['frechet_distance']:.4f} | {acc} | {r['profile_fit_error']:.1e} | "
            f"{os.path.basename(r['export'])} |"
        )
    if summary["unreliable"]:
        print(
            f"\nunreliable (profile fit error > --max-fit-error {summary['max_fit_error']:g}, never best): std "
            + ", ".join(f"{s:.4f}" for s in summary["unreliable"])
        )
    print(
        f"\nbest std: {best['std']:.4f} (Fréchet distance {best['frechet_distance']:.4f}, profile fit error "
        f"{best['profile_fit_error']:.1e})"
        if best
        else "\nbest std: none (no reliable std with a finite Fréchet distance)"
    )
    print(
        f"table: {os.path.join(job.out, 'sweep.json')}  plot: {os.path.join(job.out, 'sweep.png')}"
        + (f"  best export: {summary['best_export']}" if summary["best_export"] else "")
    )
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return {"reconstruct": reconstruct_command, "sweep": sweep_command}[args.command](args)


if __name__ == "__main__":
    run_cli(main)
