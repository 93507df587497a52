"""python -m ddpm_dist.evaluate fid|frechet|ref-stats|recon ...

fid        Fréchet Inception Distance with clean-fid's Inception ("clean" resize) from a local file
           (--inception PATH or $DDPM_INCEPTION); images from --samples (PNG folder / URL) or generated
           in memory from --run/--export; reference statistics from --ref (.npz) or --data (shards).
           From the same features: KID, precision / recall (when the reference holds real features) and,
           for class-conditional samples, a Fréchet distance per class.
frechet    the same with the digits classifier's features (for the embedded digits when there is no
           Inception file): a Fréchet distance, not an FID, plus the class accuracy of conditional samples.
ref-stats  reference statistics of a shard set, saved with the extractor's checksum and resize mode.
recon      PSNR / SSIM of one-step x0 predictions and DDIM reconstructions from chosen noise levels."""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np

from .command_line import add_model_source, add_sampler_arguments, is_rank0, model_source, run_cli, sampler_overrides
from .data import storage
from .redact import to_json

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ddpm_dist.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("fid", "frechet"):
        f = sub.add_parser(name, help="Fréchet distance of samples to reference statistics")
        src = add_model_source(f, "generate in memory (no PNG round trip) from ")
        src.add_argument("--samples", help="folder/URL of PNGs named by index (from ddpm_dist.sample)")
        f.add_argument("--ref", help="reference statistics .npz (from ref-stats)")
        f.add_argument(
            "--data",
            help="shard manifest to compute reference statistics from (default for frechet: the run's training data)",
        )
        f.add_argument(
            "--num-images", type=int, default=None, help="with --run/--export/--diffusers: how many to generate"
        )
        f.add_argument("--batch-size", type=int, default=64)
        f.add_argument("--seed", type=int, default=0)
        f.add_argument("--classes", default=None, help="as for ddpm_dist.sample (default random)")
        add_sampler_arguments(f)
        f.add_argument(
            "--world-size", type=int, default=1, help="local workers to spawn (ignored under torchrun/SLURM)"
        )
        f.add_argument("--inception", help="path to inception-2015-12-05.pt (fid)")
        f.add_argument(
            "--allow-unverified-inception",
            action="store_true",
            help="use an Inception file other than the pinned one (its FID is not comparable)",
        )
        f.add_argument("--out", help="result JSON (default: next to the samples or in the run directory)")
        f.add_argument(
            "--no-feature-metrics",
            action="store_true",
            help="only the Fréchet distance: no KID, precision / recall or per-class distance (the "
            "features are then not gathered)",
        )
        f.add_argument("--kid-subsets", type=int, help="KID: number of subsets (default 100, clean-fid's)")
        f.add_argument("--kid-subset-size", type=int, help="KID: largest subset (default 1000, clean-fid's)")
        f.add_argument(
            "--pr-max-rows",
            type=int,
            help="precision / recall on a seeded sample of at most this many features per side "
            "(default 10000; the cost grows as n^2)",
        )
        f.add_argument("--save-stats", help="also save the samples' statistics and features as a reference .npz")
    r = sub.add_parser("ref-stats", help="reference feature statistics of a shard set")
    r.add_argument("--data", required=True, help="shard manifest URL")
    r.add_argument("--out", required=True, help="output .npz (path or fsspec URL)")
    r.add_argument(
        "--extractor",
        choices=("inception", "digits"),
        default="inception",
        help="digits: the digits classifier trained on --data (the extractor of `frechet`)",
    )
    r.add_argument("--inception", help="path to inception-2015-12-05.pt")
    r.add_argument(
        "--allow-unverified-inception", action="store_true", help="use an Inception file other than the pinned one"
    )
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument(
        "--features",
        type=int,
        default=0,
        metavar="N",
        help="also keep the features of N images (a seeded sample; all when fewer), for KID and "
        "precision / recall (Inception: 8 KB per image)",
    )
    r.add_argument("--no-per-class", action="store_true", help="no per-class statistics for labelled data")
    r.add_argument("--split", choices=("train", "validation"), default="train", help="which images of --data")
    c = sub.add_parser("recon", help="reconstruction PSNR/SSIM per noise level")
    add_model_source(c)
    c.add_argument("--data", help="shard manifest (default: the run's training data)")
    c.add_argument(
        "--split",
        choices=("held-out", "validation", "train"),
        default="held-out",
        help="which of the manifest's images: held-out (default) is its validation split when it has one",
    )
    c.add_argument("--num-images", type=int, default=64)
    c.add_argument("--t", default="50,100,250,500,750", help="comma list of timesteps")
    c.add_argument("--ddim-steps", type=int, default=20, help="DDIM steps from t back to 0")
    c.add_argument("--out", required=True, help="output folder (recon.json, recon.png, examples)")
    c.add_argument("--seed", type=int, default=0)
    return p


def fid(args) -> int:
    from .eval.job import FrechetJob, frechet_worker, read_result
    from .parallel.env import spawn_local

    job = FrechetJob(
        args.cmd,
        samples=args.samples,
        source=model_source(args),
        ref=args.ref,
        data=args.data,
        num_images=args.num_images,
        batch_size=args.batch_size,
        seed=args.seed,
        classes=args.classes,
        sampler=sampler_overrides(args),
        inception=args.inception,
        out=args.out,
        allow_unverified_inception=args.allow_unverified_inception,
        feature_metrics=not args.no_feature_metrics,
        save_stats=args.save_stats,
        **{
            k: getattr(args, k)
            for k in ("kid_subsets", "kid_subset_size", "pr_max_rows")
            if getattr(args, k) is not None
        },
    )
    spawn_local(frechet_worker, (job,), args.world_size)
    if is_rank0():
        r = read_result(job)
        acc = f", class accuracy {r['class_accuracy']:.3f}" if r["class_accuracy"] is not None else ""
        kid = f", KID {r['kid']:.6f}" if r.get("kid") is not None else ""
        pr = f", precision {r['precision']:.4f}, recall {r['recall']:.4f}" if r.get("precision") is not None else ""
        print(
            f"{r['metric']}: {r['value']:.4f}{kid}{pr} over {r['n']} images vs {r['ref_n']} reference{acc} -> "
            f"{storage.redact(job.result_path())}"
        )
        for note in r.get("notes", []):
            print(note)
    return 0


def ref_stats(args) -> int:
    from .eval.job import make_extractor
    from .eval.statistics import compute_ref_stats
    from .parallel.env import read_env

    extractor = make_extractor(
        args.extractor,
        inception=args.inception,
        data=args.data,
        device=read_env().device,
        allow_unverified=args.allow_unverified_inception,
    )
    ref = compute_ref_stats(
        args.data,
        extractor,
        args.batch_size,
        max_features=args.features,
        per_class=not args.no_per_class,
        split=args.split,
    )
    ref.save(args.out)
    kept = f", features of {len(ref.features)}" if ref.features is not None else ""
    classes = f", {len(ref.class_n)} per-class statistics" if ref.class_n is not None else ""
    print(
        f"reference statistics of {ref.n} {args.split} images{kept}{classes} ({extractor.name}, "
        f"{extractor.resize_mode} resize) -> {args.out}"
    )
    return 0


def recon(args) -> int:
    from .artifacts import load_trained, run_data_source
    from .data import load_manifest, read_all
    from .drawing import auto_scale, grid, save_image
    from .drawing.figures import recon_curves
    from .eval.recon import reconstruction_table
    from .parallel.env import read_env
    from .sampling import prepare

    source = model_source(args)
    setup = prepare(load_trained(source), read_env().device)
    data = args.data or run_data_source(args.run)
    if not data:
        raise ValueError("recon needs --data (a shard manifest)")
    split = load_manifest(data).held_out() if args.split == "held-out" else args.split
    if split == "train":
        log.warning(
            "reconstructing training images: the manifest has no validation split (`shards build --val-fraction`)"
        )
    images, labels = read_all(data, limit=args.num_images, split=split)
    rows, examples, why = reconstruction_table(
        setup, images, labels, [int(t) for t in args.t.split(",")], ddim_steps=args.ddim_steps, seed=args.seed
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "recon.json"), "w") as f:
        f.write(
            to_json(
                {
                    "source": setup.source,
                    "data": storage.redact(data),
                    "split": split,
                    "n": len(images),
                    "rows": rows,
                    "lpips": why or "alex",
                },
                indent=1,
            )
        )
    recon_curves(rows, os.path.join(args.out, "recon.png"))
    ex = np.concatenate(examples)
    save_image(
        grid(ex, nrow=min(8, len(images)), scale=auto_scale(ex.shape[1])), os.path.join(args.out, "recon_examples.png")
    )
    print(f"reconstruction of {len(images)} {split} images from {storage.redact(data)} by {setup.source}")
    print(f"{'t':>5} {'PSNR 1-step':>12} {'SSIM 1-step':>12} {'PSNR DDIM':>10} {'SSIM DDIM':>10}")
    for r in rows:
        print(
            f"{r['t']:5d} {r['one_step_psnr']:12.2f} {r['one_step_ssim']:12.3f} "
            f"{r['ddim_psnr']:10.2f} {r['ddim_ssim']:10.3f}"
        )
    if why:
        print(why)
    print(
        f"table: {os.path.join(args.out, 'recon.json')}  plot: {os.path.join(args.out, 'recon.png')}  "
        f"examples (originals, then DDIM per t): {os.path.join(args.out, 'recon_examples.png')}"
    )
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return {"fid": fid, "frechet": fid, "ref-stats": ref_stats, "recon": recon}[args.cmd](args)


if __name__ == "__main__":
    run_cli(main)
