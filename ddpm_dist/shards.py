"""python -m ddpm_dist.shards build|inspect|verify|index — WebDataset shards with a manifest on any fsspec URL."""

from __future__ import annotations

import argparse
import os
from collections import Counter

from .command_line import run_cli
from .data import shard_sets as sh
from .data import storage
from .data.resize import RESIZE_MODES
from .data.sources import SOURCE_KINDS, SourceError, open_source, parse_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_dist.shards", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write shards + manifest from an image source")
    b.add_argument(
        "--source",
        choices=SOURCE_KINDS,
        required=True,
        help="digits (embedded, scikit-learn), folder (one sub-folder per class, or flat), numpy (.npz/.npy "
        "uint8 NHWC), cifar10/mnist/celeba (torchvision files under --input)",
    )
    b.add_argument("--input", help="folder, array file, or torchvision root")
    b.add_argument("--split", default="train", help="torchvision split (train/test/valid)")
    b.add_argument("--out", required=True, help="output prefix: a folder, s3://bucket/prefix, memory://...")
    b.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="N|HxW",
        help="resize every image to N x N (or H x W) by --resize; digits: upsample 8x8 to N x N (default "
        "16). Without it images keep their size and must all share one",
    )
    b.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default=None,
        help="how --size is reached (default center_crop): center_crop/random_crop scale the short side to "
        "the size and crop (random_crop: a crop per image from --shuffle-seed), border fits the whole "
        "image and pads, stretch ignores the aspect ratio, none requires the size (data/resize.py)",
    )
    b.add_argument("--prefix", default="shard", help="shard file name prefix")
    b.add_argument("--samples-per-shard", type=int, default=1000)
    b.add_argument("--max-shard-bytes", type=int, default=0, help="also cut a shard before it passes this size")
    b.add_argument("--format", choices=("png", "npy"), default="png")
    b.add_argument("--shuffle-seed", type=int, default=0, help="-1 keeps the source order")
    b.add_argument("--overwrite", action="store_true", help="replace shards under a non-empty --out")
    b.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out this fraction of the images as a validation split (same manifest, own shards, "
        "never trained on): recon, inpainting and super-resolution evaluate on it",
    )
    i = sub.add_parser("inspect", help="counts, image size, label histogram, preview grid")
    i.add_argument("manifest")
    i.add_argument("--preview", default="shards_preview.png", help="where to write a grid of the first 64 images")
    v = sub.add_parser("verify", help="re-read every shard: checksums, counts, every sample decodes")
    v.add_argument("manifest")
    x = sub.add_parser(
        "index",
        help="index foreign shards once (a brace pattern, a folder, img2dataset's output): "
        "per-shard indexes + a manifest to train from",
        description=INDEX_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    x.add_argument("pattern", help="brace pattern of tar URLs ('s3://b/crawl/{00000..09999}.tar') or a folder of tars")
    x.add_argument(
        "--out",
        default=None,
        help="where the manifest and indexes go (default: beside the shards; give "
        "one for a read-only bucket: the manifest then names shards by URL)",
    )
    x.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="local processes to spawn, each indexing every N-th shard (ignored under torchrun/SLURM)",
    )
    x.add_argument(
        "--part",
        default=None,
        metavar="P/N",
        help="index only part P of N and write its record (one job of an array); then --finalize",
    )
    x.add_argument("--finalize", action="store_true", help="write the manifest from the part records under --out")
    x.add_argument("--overwrite", action="store_true", help="replace an existing manifest under --out")
    return p


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except SourceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


INDEX_HELP = """Index a pattern of tar shards once: each shard is read once (streamed, hashed), its index
written beside it (or into --out), then the manifest. Part p of N indexes shards p, p+N, ...;
the manifest lists them in pattern order whatever N is.

  python -m ddpm_dist.shards index '/data/crawl/{00000..00999}.tar' --world-size 8
  python -m ddpm_dist.shards index s3://bucket/laion-out --out /shared/laion-index   # img2dataset's folder
  python -m launchers.slurm shards --nodes 4 --tasks-per-node 16 -- index 'PATTERN' --out DIR
  # as independent jobs (an array): each runs --part $TASK/N, then one runs --finalize
  python -m ddpm_dist.shards index 'PATTERN' --out DIR --part 3/16 && ... --finalize

Train from DIR/manifest.json (data.source=DIR/manifest.json)."""


def _index_rank(plan) -> None:
    """One process of an index job: its part, then (after a barrier) rank 0 writes the manifest."""
    from .data import index
    from .parallel.collectives import barrier
    from .parallel.env import init_distributed, read_env, shutdown

    env = read_env()
    if env.distributed:
        init_distributed(env)
    try:
        index.index_part(plan, env.rank, env.world_size)
        barrier()
        if env.rank == 0:
            index.finalize(plan, env.world_size)
        barrier()
    finally:
        if env.distributed:
            shutdown()


def _index(args) -> int:
    from .data import index
    from .parallel.env import launched_externally, read_env, spawn_local

    plan = index.plan_index(args.pattern, args.out)
    if not (args.part or args.overwrite) and storage.exists(plan.manifest_url()):
        raise sh.ShardError(f"'{storage.redact(plan.manifest_url())}' exists (pass --overwrite to index again)")
    if args.part:
        p, _, n = args.part.partition("/")
        if not (p.isdigit() and n.isdigit() and int(p) < int(n)):
            raise sh.ShardError(f"--part '{args.part}': expected P/N with 0 <= P < N")
        records = index.index_part(plan, int(p), int(n))
        print(
            f"indexed part {p} of {n}: {len(records)} shards, {sum(r['num_samples'] for r in records)} samples "
            f"(then: index '{args.pattern}' --out {storage.redact(plan.out)} --finalize)"
        )
        return 0
    if args.finalize:
        m = index.finalize(plan)
    else:
        if args.world_size < 1:
            raise sh.ShardError(f"--world-size {args.world_size} is not positive")
        spawn_local(_index_rank, (plan,), min(args.world_size, len(plan.urls)))
        if launched_externally() and read_env().rank != 0:
            return 0
        m = sh.load_manifest(plan.manifest_url())
    odd = f"; image shapes vary: {m.extra['image_shapes']}" if "image_shapes" in m.extra else ""
    print(
        f"indexed {len(plan.urls)} shards ({len(m.shards)} with samples), {m.num_samples} samples of "
        f"{m.image_size[0]}x{m.image_size[1]}x{m.channels} {m.image_format}{odd}: "
        f"train from {storage.redact(plan.manifest_url())}"
    )
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "build":
        source = open_source(args.source, args.input, args.size, args.split, args.resize, max(args.shuffle_seed, 0))
        total = 1797 if args.source == "digits" else None
        m = sh.build_shards(
            source,
            args.out,
            prefix=args.prefix,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            image_format=args.format,
            shuffle_seed=None if args.shuffle_seed < 0 else args.shuffle_seed,
            overwrite=args.overwrite,
            total=total,
            val_fraction=args.val_fraction,
        )
        val = m.split("validation") if m.validation else None
        held = f" + {len(val.shards)} validation shards, {val.num_samples} samples" if val else ""
        print(
            f"wrote {len(m.shards)} shards, {m.num_samples} samples{held} "
            f"of {m.image_size[0]}x{m.image_size[1]}x{m.channels} "
            f"to {storage.redact(args.out)} (manifest: {storage.redact(storage.join(args.out, sh.MANIFEST_NAME))})"
        )
        return 0
    if args.cmd == "index":
        return _index(args)
    if args.cmd == "inspect":
        from . import drawing

        m = sh.load_manifest(args.manifest)
        images, labels = sh.read_all(args.manifest)
        print(f"manifest   {storage.redact(args.manifest)}")
        print(f"shards     {len(m.shards)} ({sum(s.bytes for s in m.shards) / 1e6:.2f} MB)")
        print(f"samples    {m.num_samples}")
        if m.validation:
            print(f"validation {m.split('validation').num_samples} in {len(m.validation)} shards (held out)")
        print(f"image      {m.image_size[0]}x{m.image_size[1]}x{m.channels} {m.image_format}")
        if (labels >= 0).any():
            hist = Counter(labels.tolist())
            print("labels     " + "  ".join(f"{k}:{hist[k]}" for k in sorted(hist)))
        else:
            print("labels     none")
        drawing.save_image(drawing.grid(images[:64], scale=drawing.auto_scale(images.shape[1])), args.preview)
        print(f"preview    {os.path.abspath(args.preview)}")
        return 0
    report = sh.verify(args.manifest)
    for fault in report.faults:
        print(f"FAULT {fault}")
    print(f"{'OK' if report.ok else 'FAILED'}: {report.samples} samples read, {len(report.faults)} fault(s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    run_cli(main)
