"""Sampling and evaluation throughput, side by side in one run.

1. Sampler overhead: seconds per image of denoise_from_seeds() (per-image generators, guidance wrapper, schedule
   gathers, clipping) over (model calls per image x the time of one forward pass of the same batch).
   Goal: <= 1.05.
2. Feature statistics: the time of our path (PNG folder -> clean resize -> extractor -> float64 sums) over
   the time of clean-fid's folder pipeline (get_folder_features, then mean and covariance) on the same
   images with the same extractor and the same number of CPU workers. Goal: <= 1. Then where our time goes:
   each stage (PNG decode, clean resize, the network, the float64 sums) timed alone over the same images.

    .venv/bin/python bench/sample_bench.py [--batch 64] [--steps 50] [--images 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_dist.diffusion import SamplerOptions, denoise_from_seeds, image_seed, make_schedule  # noqa: E402
from ddpm_dist.eval.statistics import FeatureStats, accumulate  # noqa: E402
from ddpm_dist.models import build_model  # noqa: E402
from tests.support.feature_nets import stand_in_extractor  # noqa: E402


def sampler_overhead(args):
    torch.manual_seed(0)
    model = build_model("digits").eval()
    schedule = make_schedule("cosine", 1000)
    c = model.config
    shape = (c.in_channels, c.image_size, c.image_size)
    x = torch.randn(args.batch, *shape)
    t = torch.full((args.batch,), 500)
    y = torch.arange(args.batch) % 10
    rows = []
    for sampler, eta in (("ddim", 0.0), ("ddpm", 1.0)):
        with torch.no_grad():
            model(x, t, y=y)
            fwd = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(10):
                    model(x, t, y=y)
                fwd.append((time.perf_counter() - t0) / 10)
            full = []
            for r in range(3):
                t0 = time.perf_counter()
                denoise_from_seeds(
                    model,
                    schedule,
                    [image_seed(r, i) for i in range(args.batch)],
                    shape,
                    SamplerOptions(sampler, args.steps, eta),
                    device="cpu",
                    labels=y.tolist(),
                    null_class=10,
                )
                full.append(time.perf_counter() - t0)
        rows.append((sampler, statistics.median(full) / (args.steps * statistics.median(fwd))))
    print(f"sampler overhead, digits model, batch {args.batch}, {args.steps} steps (1.00 = nothing but model calls):")
    for sampler, ratio in rows:
        print(f"  {sampler}: {ratio:.3f}")


def feature_throughput(args):
    from cleanfid import fid

    folder = tempfile.mkdtemp(prefix="ddpm-fidbench-")
    rng = np.random.default_rng(0)
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:06d}.png"))
    # a stand-in for Inception with the same input contract (299x299, 0..255) and 2048 features
    ext = stand_in_extractor("bench-net", channels=(32, 128), pool=4)
    torch.set_num_threads(args.workers)

    def ours():
        def batches():
            for i in range(0, args.images, 32):
                yield np.stack(
                    [
                        np.asarray(Image.open(os.path.join(folder, f"{k:06d}.png")).convert("RGB"))
                        for k in range(i, min(i + 32, args.images))
                    ]
                )

        stats = accumulate(ext, batches(), FeatureStats(2048))
        return stats.mean_cov()

    def theirs():
        feats = fid.get_folder_features(
            folder,
            model=ext.net,
            num_workers=args.workers,
            batch_size=32,
            device=torch.device("cpu"),
            mode="clean",
            verbose=False,
        )
        return np.mean(feats, axis=0), np.cov(feats, rowvar=False)

    a, b = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        mu1, _ = ours()
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mu2, _ = theirs()
        b.append(time.perf_counter() - t0)
    assert np.allclose(mu1, mu2, rtol=1e-5, atol=1e-6)
    x, y = statistics.median(a), statistics.median(b)
    print(f"feature statistics, {args.images} PNGs 32x32 -> clean resize 299 -> 2048 features, {args.workers} workers:")
    print(f"  ours {args.images / x:.1f} img/s, clean-fid folder pipeline {args.images / y:.1f} img/s")
    print(f"  time ours / clean-fid: {x / y:.3f}")
    stages = stage_times(folder, ext, args.images)
    total = sum(stages.values())
    print(
        f"  where our time goes, each stage alone ({total:.2f} s in all; the pipeline overlaps decode and resize "
        "with the network):"
    )
    for name, sec in stages.items():
        print(f"    {name:<14} {sec:6.2f} s  {100 * sec / total:5.1f}%")


def stage_times(folder, ext, n):
    """Seconds of each stage of our path, run one after the other over the same n images."""
    t0 = time.perf_counter()
    images = [np.asarray(Image.open(os.path.join(folder, f"{k:06d}.png")).convert("RGB")) for k in range(n)]
    t1 = time.perf_counter()
    batches = [ext.prepare(np.stack(images[i : i + 32])) for i in range(0, n, 32)]
    t2 = time.perf_counter()
    with torch.no_grad():
        feats = [ext.net(x) for x in batches]
    t3 = time.perf_counter()
    stats = FeatureStats(2048)
    for f in feats:
        stats.add(f.double())
    stats.mean_cov()
    t4 = time.perf_counter()
    return {"PNG decode": t1 - t0, "clean resize": t2 - t1, "network": t3 - t2, "float64 sums": t4 - t3}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    sampler_overhead(args)
    feature_throughput(args)
