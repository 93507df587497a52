"""python -m ddpm_dist.sample --run DIR | --export FILE | --diffusers DIR --out OUT [--num-images N --world-size W ...]

Image i comes from its own generator seeded by (seed, i): the set of images does not depend on the
number of workers, and batch b always holds images [b*B, (b+1)*B) (the last batch padded), so at a fixed
batch size they are bitwise the same for any world size on the CPU. Images are PNGs named by index,
written atomically; a re-run with the same arguments only generates what is missing. Every task
(generate, inpaint, sr) takes every sampler option.

--world-size N spawns N local workers (one per GPU, else CPU processes) unless already launched by
torchrun or SLURM, in which case their environment decides."""

from __future__ import annotations

import argparse

from .command_line import add_model_source, add_sampler_arguments, is_rank0, model_source, run_cli, sampler_overrides
from .config import MetricsConfig
from .parallel.env import spawn_local
from .sampling import TASKS, SampleJob, TaskSpec, sample_to_folder
from .sampling.job import summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ddpm_dist.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_source(p)
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights")
    p.add_argument(
        "--checkpoint",
        choices=("latest", "best"),
        default="latest",
        help="with --run: the newest committed checkpoint, or the one with the best in-training Frechet "
        "distance (checkpoint.keep_best)",
    )
    p.add_argument("--out", required=True, help="output folder or fsspec URL (s3://..., memory://...)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--classes",
        default=None,
        help="labels for class-conditional models: 'random' (default; inpainting: the image's own), "
        "'none' (unconditional), or a comma list cycled over the images (e.g. 0,1,2,3,4,5,6,7,8,9)",
    )
    add_sampler_arguments(p)
    p.add_argument("--world-size", type=int, default=1, help="local workers to spawn (ignored under torchrun/SLURM)")
    p.add_argument("--grid-rows", type=int, default=0, help="images per row in grid.png (0: square); sorted by class")
    p.add_argument(
        "--extras",
        choices=("auto", "yes", "no"),
        default="auto",
        help="grid.png, trajectory.png, reverse.gif (auto: when num-images <= 1000 and --out is local)",
    )
    p.add_argument("--npz", action="store_true", help="also write samples.npz (uint8 NHWC + labels)")
    p.add_argument("--tar", action="store_true", help="also write WebDataset shards of the images under OUT/shards")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network (compiling takes minutes on a CPU; pays off for many images)",
    )
    p.add_argument(
        "--prometheus-port", type=int, default=0, help="export ddpm_sample_* metrics on this port + local rank (0: off)"
    )
    p.add_argument("--prometheus-addr", default="", help="address to listen on (default: this host's address)")
    t = p.add_argument_group("tasks")
    t.add_argument(
        "--task",
        choices=TASKS,
        default="generate",
        help="generate (default), inpaint (RePaint), sr (super-resolution with an SR-trained model)",
    )
    t.add_argument("--image", help="inpaint, sr: an image file, or a shard manifest (then --image-index picks one)")
    t.add_argument("--image-index", type=int, default=0)
    t.add_argument(
        "--image-split",
        choices=("held-out", "validation", "train"),
        default="held-out",
        help="of a shard manifest: held-out (default) is its validation split when it has one",
    )
    t.add_argument(
        "--mask",
        default="lower-half",
        help="inpaint: a PNG (white = keep), 'box:x0,y0,x1,y1' (the box is regenerated), 'lower-half', 'random'",
    )
    t.add_argument("--resample", type=int, default=1, help="inpaint: RePaint resampling jumps per step")
    t.add_argument("--sr-factor", type=int, default=2, help="sr: downsampling factor of the low-res input")
    return p


def job_from_args(args: argparse.Namespace) -> SampleJob:
    return SampleJob(
        source=model_source(args),
        out=args.out,
        weights=args.weights,
        checkpoint=args.checkpoint,
        num_images=args.num_images,
        batch_size=args.batch_size,
        seed=args.seed,
        classes=args.classes,
        sampler=sampler_overrides(args),
        task=TaskSpec(
            args.task, args.image, args.image_index, args.mask, args.resample, args.sr_factor, args.image_split
        ),
        extras=args.extras,
        grid_width=args.grid_rows,
        npz=args.npz,
        tar=args.tar,
        compile=args.compile,
        metrics=MetricsConfig(
            prometheus=args.prometheus_port > 0,
            prometheus_port=args.prometheus_port,
            prometheus_addr=args.prometheus_addr,
            jsonl=False,
        ),
    )


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    job = job_from_args(args)
    job.validate()
    spawn_local(sample_to_folder, (job,), args.world_size)
    if is_rank0():
        print("\n".join(summary(job)))
    return 0


if __name__ == "__main__":
    run_cli(main)
