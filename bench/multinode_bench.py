"""Two hosts vs one host, side by side in one run: training images/s of the digits config with DDP and FSDP2 at
the same global batch and the same number of ranks, either 2 processes on one host (loopback) or 1 process on
each of 2 hosts (network namespaces joined by a bridge: tests/support/netns_cluster.py). On one machine this measures
the protocol across hosts (addresses, rendezvous, gloo over a veth pair and a bridge), not a network: both
sides share the same two cores and memory. Needs root.

    sudo .venv/bin/python bench/multinode_bench.py [--steps 80] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.netns_cluster import Cluster  # noqa: E402


def train_args(run: str, steps: int, batch: int, backend: str) -> list[str]:
    return [
        "-m",
        "ddpm_dist.train",
        "--config",
        "configs/digits.yaml",
        f"run_dir={run}",
        f"parallel.backend={backend}",
        f"train.global_batch={batch}",
        f"train.total_images={steps * batch}",
        "train.log_every=10",
        "train.sample_every_images=0",
        "checkpoint.every_images=0",
        "sample.steps=2",
    ]


def images_per_s(run: str) -> float:
    """Median of the logged images/s windows, the first (start-up) window left out."""
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    ips = [r["images_per_s"] for r in rows if r["event"] == "train"][1:]
    return statistics.median(ips)


def one_host(run: str, args, backend: str) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *train_args(run, args.steps, args.batch, backend),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return images_per_s(run)


def two_hosts(cluster: Cluster, run: str, args, backend: str) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    rdzv = uuid.uuid4().hex[:8]
    procs = [
        cluster.popen(
            h,
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(i),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                "n1:29400",
                "--rdzv-id",
                rdzv,
                *train_args(run, args.steps, args.batch, backend),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, h in enumerate(cluster.hosts)
    ]
    if any(p.wait() for p in procs):
        raise RuntimeError(f"two-host {backend} run failed")
    return images_per_s(run)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="ddpm-multinode-bench-")
    cluster = Cluster(2).up()
    rows = []
    try:
        for backend in ("ddp", "fsdp"):
            a = one_host(os.path.join(root, f"{backend}-1host"), args, backend)
            b = two_hosts(cluster, os.path.join(root, f"{backend}-2hosts"), args, backend)
            rows.append((backend, a, b))
    finally:
        cluster.down()
    print(f"digits config, global batch {args.batch}, 2 ranks, {args.steps} steps (images/s, median of logged windows)")
    print(f"{'backend':8s} {'1 host x 2':>11s} {'2 hosts x 1':>12s} {'2 hosts / 1 host':>17s}")
    for backend, a, b in rows:
        print(f"{backend:8s} {a:11.0f} {b:12.0f} {b / a:17.2f}")


if __name__ == "__main__":
    main()
