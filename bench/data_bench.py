"""Data loading throughput, side by side in one run: our shard stream vs a torchvision ImageFolder
DataLoader over the same images as PNG files (same worker count, batch size), on local disk and on an
S3 API server on loopback (moto); there the baseline reads one object per image through s3fs.

    .venv/bin/python bench/data_bench.py [--workers 2] [--epochs 3] [--size 32]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_dist.data import Layout, TrainStream, build_shards, load_manifest  # noqa: E402
from ddpm_dist.data.sources import digits_images  # noqa: E402
from ddpm_dist.images import model_range  # noqa: E402


def dataset(size: int):
    """The embedded digits as RGB images of size x size (PNG files are then a realistic few hundred bytes)."""
    images, labels = digits_images(size)
    return np.repeat(images, 3, axis=-1), labels


def throughput(batches, n_images) -> float:
    t0 = time.perf_counter()
    seen = 0
    for b in batches:
        seen += (b["image"] if isinstance(b, dict) else b[0]).shape[0]
        if seen >= n_images:
            break
    return seen / (time.perf_counter() - t0)


class S3Files(torch.utils.data.Dataset):
    """The per-object baseline: one GET per image through s3fs, decoded like ImageFolder does."""

    def __init__(self, keys, labels, transform):
        self.keys, self.labels, self.transform = keys, labels, transform

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        import fsspec

        fs = fsspec.filesystem("s3")  # fsspec caches one instance per process (s3fs is not fork-safe)
        with Image.open(io.BytesIO(fs.cat_file(self.keys[i]))) as im:
            return self.transform(im.convert("RGB")), self.labels[i]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--no-s3", action="store_true")
    args = p.parse_args()
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    images, labels = dataset(args.size)
    n = len(images) * args.epochs
    tmp = tempfile.mkdtemp(prefix="ddpm-databench-")
    folder = os.path.join(tmp, "folder")
    for i, (img, y) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(folder, str(y)), exist_ok=True)
        Image.fromarray(img).save(os.path.join(folder, str(y), f"{i:05d}.png"))
    src = ((f"img{i:05d}", img, int(y)) for i, (img, y) in enumerate(zip(images, labels)))
    build_shards(src, os.path.join(tmp, "shards"), samples_per_shard=256, progress=False)
    transform = T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

    def ours(url):
        stream = TrainStream(load_manifest(url), rank=0, layout=Layout(1, args.batch, args.workers), seed=0)
        # the stream ships uint8; the training step makes the [-1, 1] floats ImageFolder's transform makes
        return throughput(({**b, "image": model_range(b["image"])} for b in stream), n)

    def imagefolder(ds):
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=args.batch,
            shuffle=True,
            num_workers=args.workers,
            drop_last=True,
            persistent_workers=args.workers > 0,
        )

        def forever():
            while True:
                yield from loader

        return throughput(forever(), n)

    print(
        f"{len(images)} images {args.size}x{args.size}x3 PNG, batch {args.batch}, {args.workers} workers, "
        f"{args.epochs} epochs each, torch threads {torch.get_num_threads()}"
    )
    rows = []
    a, b = ours(os.path.join(tmp, "shards", "manifest.json")), imagefolder(ImageFolder(folder, transform))
    rows.append(("local disk", a, b))
    if not args.no_s3:
        rows.append(s3_row(args, images, labels, tmp, ours, imagefolder, transform))
    print(f"{'storage':12s} {'ours img/s':>12s} {'baseline img/s':>15s} {'ratio':>7s}")
    for name, a, b in rows:
        print(f"{name:12s} {a:12.0f} {b:15.0f} {a / b:7.2f}")


def s3_row(args, images, labels, tmp, ours, imagefolder, transform):
    from moto.server import ThreadedMotoServer

    from ddpm_dist.parallel.env import free_port
    from tests.support.s3_server import s3_env

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        os.environ.update(s3_env(url, key="bench"))
        import boto3
        import s3fs

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
        src = ((f"img{i:05d}", img, int(y)) for i, (img, y) in enumerate(zip(images, labels)))
        build_shards(src, "s3://bench/shards", samples_per_shard=256, progress=False)
        fs = s3fs.S3FileSystem()
        keys = []
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            keys.append(f"bench/files/{i:05d}.png")
            fs.pipe_file(keys[-1], buf.getvalue())
        a = ours("s3://bench/shards/manifest.json")
        b = imagefolder(S3Files(keys, labels.tolist(), transform))
        return ("s3 (moto)", a, b)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
