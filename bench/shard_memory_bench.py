"""Worker memory and throughput vs shard size, and the peer pipeline, side by side in one run.

The same images are written as ~16 MB and ~512 MB shards. For each, our stream runs with DataLoader
workers and data.shard_buffer_mb in force, and reports images/s and the peak RSS of each worker
(VmHWM). "whole shard" is the reading before issue 14 (a buffer larger than the shard: the worker holds
the shard). The peer is webdataset's own pipeline over the same shards (shard shuffle, a 1,000-sample
shuffle buffer, decode, batching, the same workers). On the S3 API server (moto on loopback) the GET
requests per shard are counted from the server's request log.

    .venv/bin/python bench/shard_memory_bench.py [--images 42000] [--buffer-mb 64] [--workers 2] [--no-s3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_dist.data import Layout, TrainStream, build_shards, load_manifest  # noqa: E402
from ddpm_dist.data.sources import digits_images  # noqa: E402
from ddpm_dist.data.storage import register_webdataset_opener  # noqa: E402


def images(n: int, size: int):
    """n distinct RGB images: the digits upscaled, with a little noise so no two are equal."""
    digits, labels = digits_images(size)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.repeat(digits[i % len(digits)], 3, axis=-1).astype(np.int16) + rng.integers(-8, 9, (size, size, 3))
        yield f"img{i:07d}", np.clip(img, 0, 255).astype(np.uint8), int(labels[i % len(digits)])


def worker_peak_rss_mb() -> list[float]:
    """VmHWM of this process's children (the DataLoader workers), in MB."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != os.getpid():
                continue
            with open(f"/proc/{pid}/status") as f:
                out.append(int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024)
        except (OSError, AttributeError):
            continue
    return out


def measure(batches, n_images: int) -> tuple[float, list[float]]:
    """(images/s after the first batch, worker peak RSS) over n_images."""
    it = iter(batches)
    first = next(it)
    seen, t0 = 0, time.perf_counter()
    while seen < n_images:
        b = next(it)
        seen += (b["image"] if isinstance(b, dict) else b[0]).shape[0]
    rate = seen / (time.perf_counter() - t0)
    rss = worker_peak_rss_mb()
    del it, first
    return rate, rss


def ours(url: str, args, buffer_mb: int):
    stream = TrainStream(
        load_manifest(url), rank=0, layout=Layout(1, args.batch, args.workers), seed=0, buffer_bytes=buffer_mb << 20
    )
    return measure(stream, args.measure)


def peer(url: str, args):
    import webdataset as wds

    m = load_manifest(url)
    urls = [m.shard_url(i) for i in range(len(m.shards))]

    def init(_):
        register_webdataset_opener()

    ds = (
        wds.WebDataset(
            urls, shardshuffle=len(urls), nodesplitter=None, workersplitter=wds.split_by_worker, empty_check=False
        )
        .repeat()
        .shuffle(1000)
        .decode()
        .to_tuple("npy", "cls")
        .batched(args.batch, partial=False)
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers, worker_init_fn=init)
    return measure(loader, args.measure)


def gets_per_tar(log_path: str) -> dict[str, int]:
    """GET requests per tar in the server's access log (the request line may be ANSI-styled)."""
    counts: dict[str, int] = {}
    with open(log_path, errors="replace") as f:
        for m in re.finditer(r"GET /([^ ?]+\.tar)[ ?]", f.read()):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=42_000, help="64x64x3 npy: ~12.5 KB each, 42,000 = 525 MB")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--buffer-mb", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--measure", type=int, default=80_000, help="images timed per configuration and round (~2 epochs)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--s3-measure", type=int, default=12_800, help="images timed per configuration over S3")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--one", choices=("ours", "webdataset"), help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return measure_one(args)
    tmp = tempfile.mkdtemp(prefix="ddpm-shardmem-")
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ~1.1 GB of shards


def run(args, tmp: str) -> None:
    sets = {}
    for name, mb in (("16MB", 16), ("512MB", 512)):
        out = os.path.join(tmp, name)
        build_shards(
            images(args.images, args.size),
            out,
            image_format="npy",
            samples_per_shard=10**9,
            max_shard_bytes=mb << 20,
            shuffle_seed=None,
            progress=False,
        )
        sets[name] = os.path.join(out, "manifest.json")
        m = load_manifest(sets[name])
        print(f"{name} shards: {len(m.shards)} x ~{m.shards[0].bytes / 2**20:.0f} MB, {m.num_samples} images")
    print(
        f"batch {args.batch}, {args.workers} workers, shard_buffer_mb {args.buffer_mb}, {args.measure} images timed, "
        f"median of {args.rounds} rounds (configurations interleaved, order rotated, each in a fresh process)"
    )
    common = ["--batch", str(args.batch), "--workers", str(args.workers), "--measure", str(args.measure)]
    configs = {
        "ours 16MB shards": ["--one", "ours", "--manifest", sets["16MB"], "--buffer-mb", str(args.buffer_mb), *common],
        "ours 512MB shards": [
            "--one",
            "ours",
            "--manifest",
            sets["512MB"],
            "--buffer-mb",
            str(args.buffer_mb),
            *common,
        ],
        "whole shard 16MB (before)": ["--one", "ours", "--manifest", sets["16MB"], "--buffer-mb", "1024", *common],
        "whole shard 512MB (before)": ["--one", "ours", "--manifest", sets["512MB"], "--buffer-mb", "1024", *common],
        "webdataset 16MB shards": ["--one", "webdataset", "--manifest", sets["16MB"], *common],
    }
    results = interleaved(configs, args.rounds)
    report([(name, float(np.median(rates)), rss) for name, (rates, rss) in results.items()])
    print(
        f"peak RSS per worker 512MB / 16MB shards: "
        f"{max(results['ours 512MB shards'][1]) / max(results['ours 16MB shards'][1]):.2f}"
    )
    print(
        f"throughput 512MB shards bounded / 16MB whole shard (today's): "
        f"{paired(results, 'ours 512MB shards', 'whole shard 16MB (before)')}"
    )
    print(
        f"same code, same shards (noise gauge): ours 16MB / whole shard 16MB: "
        f"{paired(results, 'ours 16MB shards', 'whole shard 16MB (before)')}"
    )
    print(f"ours / webdataset, local: {paired(results, 'ours 16MB shards', 'webdataset 16MB shards')}")
    if not args.no_s3:
        s3(args, tmp)


def interleaved(configs: dict, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """{name: (images/s per round, peak worker RSS of its first round)}. Each measurement is a fresh process
    (as a training job is); rounds interleave the configurations and rotate their order. Ratios are taken within
    a round (see paired): two identical configurations drifted apart by up to 20% across a few minutes here."""
    names = list(configs)
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rate, peak = one_process(configs[name])
            out.setdefault(name, ([], peak))[0].append(rate)
    return out


def paired(results: dict, a: str, b: str) -> str:
    """Median over rounds of a's rate / b's rate in the same round, with the range."""
    ratios = [x / y for x, y in zip(results[a][0], results[b][0])]
    return f"{np.median(ratios):.2f} (rounds: {min(ratios):.2f}-{max(ratios):.2f})"


def one_process(argv: list[str]) -> tuple[float, list[float]]:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["rate"], result["rss"]


def measure_one(args) -> None:
    """--one: a single measurement in this process, printed as JSON."""
    if args.one == "webdataset":
        rate, rss = peer(args.manifest, args)
    else:
        rate, rss = ours(args.manifest, args, args.buffer_mb)
    print(json.dumps({"rate": rate, "rss": rss}))


def report(rows) -> None:
    print(f"{'':28s} {'img/s':>8s} {'worker peak RSS (MB)':>22s}")
    for name, rate, rss in rows:
        print(f"{name:28s} {rate:8.0f} {', '.join(f'{r:.0f}' for r in rss):>22s}")


def s3(args, tmp) -> None:
    """The server runs in its own process (the driver's child, not the measuring process's)."""
    from tests.support.s3_server import s3_env, s3_server_process

    log_path = os.path.join(tmp, "moto.log")
    with open(log_path, "w") as log, s3_server_process(log=log) as url:
        os.environ.update(s3_env(url, key="bench"))
        import boto3
        import fsspec

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
        fs = fsspec.filesystem("s3")
        rows = []
        common = ["--batch", str(args.batch), "--workers", str(args.workers), "--measure", str(args.s3_measure)]
        for name in ("16MB", "512MB"):
            fs.put(os.path.join(tmp, name), f"bench/{name}", recursive=True)
            before = gets_per_tar(log_path)
            rows.append(
                (
                    f"ours s3 {name} shards",
                    *one_process(
                        [
                            "--one",
                            "ours",
                            "--manifest",
                            f"s3://bench/{name}/manifest.json",
                            "--buffer-mb",
                            str(args.buffer_mb),
                            *common,
                        ]
                    ),
                )
            )
            after = gets_per_tar(log_path)
            print(
                f"s3 {name}: GET requests per shard touched: "
                f"{sorted(after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0))}"
            )
        before = gets_per_tar(log_path)
        rows.append(
            (
                "webdataset s3 16MB shards",
                *one_process(["--one", "webdataset", "--manifest", "s3://bench/16MB/manifest.json", *common]),
            )
        )
        after = gets_per_tar(log_path)
        print(
            f"s3 webdataset 16MB: GET requests per shard touched: "
            f"{sorted(after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0))}"
        )
        report(rows)
        print(f"ours / webdataset, s3: {rows[0][1] / rows[2][1]:.2f}")


if __name__ == "__main__":
    main()
