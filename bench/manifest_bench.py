"""Manifest load cost at 10^3 vs 10^6 shards (issue 24, item 6): seconds and peak RSS increase per process, for the
JSON-only path and the columns sidecar, each load in a fresh subprocess (imports done before the clock starts).

    .venv/bin/python bench/manifest_bench.py [--shards 1000 1000000] [--dir /tmp/manifest-bench]

The manifests are simulated (counts, sizes, digests and urls only: no tar files). Also printed: the bytes a worker
receives when the loaded Manifest is sent to it (pickled by DataLoader / torch.multiprocessing: arrays, no JSON)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make(n: int, folder: str) -> tuple[str, str]:
    """A manifest of n shards written with its sidecar, and a copy of the JSON alone (no sidecar)."""
    import numpy as np

    from ddpm_dist.data.manifest import Manifest, write_manifest
    from ddpm_dist.data.shard_table import ShardTable

    rng = np.random.default_rng(0)
    urls = [f"shard-{i:07d}.tar" for i in range(n)]
    counts = rng.integers(900, 1100, n)
    sizes = counts * rng.integers(20_000, 200_000, n)
    hexes = rng.integers(0, 256, (n, 32), dtype=np.uint8).tobytes().hex()
    table = ShardTable.from_columns(
        urls,
        counts.tolist(),
        sizes.tolist(),
        [hexes[64 * i : 64 * i + 64] for i in range(n)],
        [u + ".idx.json" for u in urls],
    )
    m = Manifest(table, [64, 64], 3, 1000, "png", "", {"label_histogram": {str(k): 1 for k in range(1000)}})
    both, alone = os.path.join(folder, f"n{n}", "manifest.json"), os.path.join(folder, f"n{n}-json", "manifest.json")
    write_manifest(m, both)
    os.makedirs(os.path.dirname(alone), exist_ok=True)
    shutil.copyfile(both, alone)
    return both, alone


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(url: str) -> None:
    """One load in this fresh process: wall seconds and peak RSS over the RSS the imports left (the kernel's
    high-water mark is reset first: the imports' own transient peak would hide the load's)."""
    import pickle

    from ddpm_dist.data.manifest import load_manifest

    before = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        peak_of = lambda: _status_kb("VmHWM")  # noqa: E731
    except OSError:  # not Linux: ru_maxrss (may include the imports' peak)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    t = time.perf_counter()
    m = load_manifest(url)
    seconds = time.perf_counter() - t
    peak = peak_of()
    assert m.num_shards == len(m.counts) and m.num_samples == int(m.counts.sum()) and m.shard_url(m.num_shards - 1)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_mb": (peak - before) / 1024,
                "shards": m.num_shards,
                "worker_bytes": len(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)),
            }
        )
    )


def measure(url: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", url], check=True, capture_output=True, text=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[1000, 1_000_000])
    p.add_argument("--dir", default="/tmp/manifest-bench")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)
    rows = {}
    for n in args.shards:
        both, alone = make(n, args.dir)
        json_mb, side_mb = os.path.getsize(alone) / 2**20, os.path.getsize(both[:-5] + ".shards.npz") / 2**20
        for path, name in ((alone, "json"), (both, "sidecar")):
            r = rows[n, name] = measure(path)
            print(
                f"{n:>9} shards  {name:<8} load {r['seconds']:7.3f} s  peak RSS +{r['rss_mb']:7.1f} MB  "
                f"to a worker {r['worker_bytes'] / 2**20:6.1f} MB  (JSON {json_mb:.1f} MB, sidecar {side_mb:.1f} MB)"
            )
    lo, hi = min(args.shards), max(args.shards)
    if lo != hi:
        for name in ("json", "sidecar"):
            a, b = rows[lo, name], rows[hi, name]
            print(
                f"{name:<8} {hi}/{lo} shards: time x{b['seconds'] / a['seconds']:.0f}, "
                f"RSS +{b['rss_mb']:.0f} MB vs +{a['rss_mb']:.0f} MB"
            )
        j, s = rows[hi, "json"], rows[hi, "sidecar"]
        print(
            f"at {hi} shards: json / sidecar = {j['seconds'] / s['seconds']:.1f}x time, "
            f"{j['rss_mb'] / max(s['rss_mb'], 1):.1f}x RSS; target <= 2 s and <= 300 MB: "
            f"json {'met' if j['seconds'] <= 2 and j['rss_mb'] <= 300 else 'NOT met'}, "
            f"sidecar {'met' if s['seconds'] <= 2 and s['rss_mb'] <= 300 else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
