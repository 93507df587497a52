"""The data plan at scale (issue 24): per-process plan time and peak RSS, cursor bytes, layout-change resume time and
start-up requests per rank for 10^6 / 10^8 / 10^9 samples over 10^3 / 10^5 / 10^6 shards on 8 / 1,024 / 4,096
ranks, beside mosaicml-streaming's own partitioning (`streaming.base.partition.get_partitions`) of the same data set.

    .venv/bin/python bench/data_scale_bench.py [--json OUT] [--configs 0 1 2] [--no-peer] [--block 1000]

The peer column needs mosaicml-streaming, which is not a dependency of this project (the bench is not part of CI).
It depends on torch, so install it without letting pip touch ours:

    .venv/bin/pip install --no-deps mosaicml-streaming==0.13.0

`import streaming` needs transformers and cloud SDKs; when it fails, the bench loads the installed, unmodified
`streaming/base/partition/*.py` (numpy only) under empty parent packages and says so; without the package the peer
columns are skipped with a one-line note.

What is simulated, and what is real:
  - the manifests: counts only (shard i holds ~N/S samples, uniform in [0.5, 1.5] x the mean, summing to N) and
    claimed sizes (4 KiB per sample); no tar files, no manifest JSON. The plan, the due set and the cursor code are
    the real ddpm_dist.data.plan / stream.TrainStream methods (a TrainStream made without its __init__, which needs
    real shards: state_dict / load_state_dict / _due_set run as they do in training);
  - the start-up check: the real startup.check_shards for ONE rank (rank world // 2) over sparse files of the
    claimed sizes (os.truncate, only that rank's slice exists on disk; the other shards' URLs name paths that
    do not exist, which this rank never stats). The other ranks are NOT simulated: `share` (the SUM all-reduce)
    returns this rank's array plus, for every shard outside its slice, the verdict its owner would send
    (present, the claimed size), made locally without any request. Requests are counted by wrapping fsspec's
    LocalFileSystem methods (info, and ls / exists / open / isdir / isfile, which should stay at 0);
  - the peer: get_partitions('relaxed', N, canonical nodes = physical nodes = world / 8, 8 ranks per node, 8
    workers per rank, batch 64), the algorithm StreamingDataset uses by default, on the sample count alone (its
    shards do not enter its partitioning). StreamingDataset also builds a shuffle of N ids per epoch
    (streaming.base.shuffle), not measured here. Its resumption after a world change is the same call with
    `drop_first` = samples seen and the new layout (`--peer-resume`, one change, global batch kept).

Each measurement runs in a fresh subprocess: imports and the simulated counts are made first, then the peak RSS is
reset (writing 5 to /proc/self/clear_refs resets VmHWM; checked at start, else ru_maxrss is used and said so), and
the clock and the peak (VmHWM minus the RSS at the reset) cover only the measured work.

Layouts (8 DataLoader workers, batch 64 per rank, block `--block` samples):
  plan      EpochPlan(counts, seed, 0, Layout(W, 64, 8, block)) and next(plan.blocks(W // 2, 0)): a worker at start;
  resume    the epoch ran under L1 = (W, 64, 8, block) for a third of its batches, then L2 = (W/2, 128, 4, block/2)
            for a third of what was left; the job resumes under L3 = (W, 64, 8, block): TrainStream.load_state_dict
            (Order, DueSet.everything, EpochPlan.remaining per earlier layout) plus the first block of one lane;
  cursor    json.dumps(state_dict()) of that stream a few batches into L3 (two layout changes in the epoch), and the
            due set's pieces (len(due.lo)) it is made into: what storing the runs explicitly would cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = [  # (samples, shards, world)
    (10**6, 10**3, 8),
    (10**8, 10**5, 1024),
    (10**9, 10**6, 4096),
]
from data_scale_children import BATCH, WORKERS  # noqa: E402 - beside this file (bench/ is sys.path[0])

PEER_MAX_BYTES = 8 << 30  # the 10^9 peer case runs only when the 10^8 peak extrapolates (linearly) below this


# ---------------------------------------------------------------- the parent


def run_child(kind: str, cfg, block: int, timeout: float) -> dict:
    n, s, w = cfg
    cmd = [
        sys.executable,
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_scale_children.py"),
        kind,
        str(n),
        str(s),
        str(w),
        str(block),
    ]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {p.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def peer_available() -> str:
    """'' when streaming's partition can be loaded, else why not."""
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('streaming') else 1)",
        ],
        capture_output=True,
    )
    return (
        ""
        if p.returncode == 0
        else (
            "mosaicml-streaming is not installed: peer columns skipped "
            "(.venv/bin/pip install --no-deps mosaicml-streaming==0.13.0)"
        )
    )


def fmt(x, spec=".2f", missing="-"):
    if x is None:
        return missing
    if isinstance(x, str):
        return x
    return format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="OUT", help="write every measurement here")
    ap.add_argument("--configs", type=int, nargs="+", default=[0, 1, 2], help="indexes into the three configurations")
    ap.add_argument("--block", type=int, default=1000, help="samples per block (Layout.block)")
    ap.add_argument("--no-peer", action="store_true", help="skip mosaicml-streaming")
    ap.add_argument("--peer-resume", action="store_true", help="also time the peer's partition after W -> W/2")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    args = ap.parse_args()

    note = "peer skipped (--no-peer)" if args.no_peer else peer_available()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(
        f"load average {' '.join(load)}, {os.cpu_count()} cpus; batch {BATCH}/rank, {WORKERS} workers/rank, "
        f"block {args.block}; each figure a fresh process",
        flush=True,
    )
    if note:
        print(note, flush=True)
    results = []
    for i in args.configs:
        cfg = CONFIGS[i]
        n, s, w = cfg
        row = {"samples": n, "shards": s, "world": w}
        for kind in ("plan", "resume", "startup"):
            row[kind] = run_child(kind, cfg, args.block, args.timeout)
            print(f"  {n:.0e} samples / {s:.0e} shards / world {w}: {kind} {json.dumps(row[kind])[:300]}", flush=True)
        if not note:
            # the peer holds arrays of N ids: extrapolate its peak linearly from the largest smaller data set measured
            prev = max(
                (r for r in results if r["samples"] < n and "peak_mb" in r.get("peer", {})),
                key=lambda r: r["samples"],
                default=None,
            )
            need = prev["peer"]["peak_mb"] * 2**20 * (n / prev["samples"]) if prev is not None else None
            if n >= 10**9 and (need is None or need > PEER_MAX_BYTES):
                why = (
                    (
                        f"would need ~{need / 2**30:.0f} GB (measured {prev['peer']['peak_mb'] / 1024:.2f} GB at "
                        f"{prev['samples']:.0e}, linear)"
                    )
                    if need is not None
                    else "no smaller measurement to extrapolate its memory from (include --configs 1)"
                )
                row["peer"] = {"skipped": f"not run: {why}"}
            else:
                row["peer"] = run_child("peer", cfg, args.block, args.timeout)
                if args.peer_resume and w >= 16:
                    row["peer_resume"] = run_child("peer_resume", cfg, args.block, args.timeout)
            print(f"  {n:.0e} samples / {s:.0e} shards / world {w}: peer {json.dumps(row['peer'])[:300]}", flush=True)
            if "peer_resume" in row:
                print(f"  ... peer resume {json.dumps(row['peer_resume'])[:300]}", flush=True)
        results.append(row)

    base = next((r["plan"].get("peak_mb") for r in results if r["samples"] == 10**6), None)
    print()
    print(
        "| samples / shards / world | plan s | plan MB (above 10^6) | cursor B | due pieces | resume s "
        "| start-up requests / rank (bound) | start-up s | peer s | peer MB | plan s ours/peer | MB ours/peer |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        p, rs, st, pe = r["plan"], r["resume"], r["startup"], r.get("peer", {})
        above = p.get("peak_mb") - base if base is not None and "peak_mb" in p else None
        peer_s = pe.get("seconds")
        peer_mb = pe.get("peak_mb")
        ratio_s = p["seconds"] / peer_s if peer_s and "seconds" in p else None
        ratio_mb = p["peak_mb"] / peer_mb if peer_mb and "peak_mb" in p else None
        peer_cell = pe.get("skipped") or pe.get("error") or fmt(peer_s, ".3f")
        if "peer_resume" in r and "seconds" in r["peer_resume"]:
            peer_cell += f" (after W -> W/2: {r['peer_resume']['seconds']:.3f})"
        err = lambda d, key, spec: d.get("error") or fmt(d.get(key), spec)  # noqa: E731
        print(
            f"| 10^{len(str(r['samples'])) - 1} / 10^{len(str(r['shards'])) - 1} / {r['world']:,} "
            f"| {err(p, 'seconds', '.4f')} | {err(p, 'peak_mb', '.1f')} ({fmt(above, '+.1f')}) "
            f"| {err(rs, 'cursor_bytes', 'd')} | {fmt(rs.get('pieces'), ',d')} | {err(rs, 'seconds', '.3f')} "
            f"| {err(st, 'requests', 'd')} ({fmt(st.get('bound'), '.1f')}) | {err(st, 'seconds', '.3f')} "
            f"| {peer_cell} | {fmt(peer_mb, '.1f')} | {fmt(ratio_s, '.2g')} | {fmt(ratio_mb, '.2g')} |"
        )
    big = next((r for r in results if r["samples"] == 10**9), None)
    if big is not None:
        p, rs, st = big["plan"], big["resume"], big["startup"]
        above = p.get("peak_mb", 0) - base if base is not None else None
        checks = [
            ("plan <= 1 s", p.get("seconds"), lambda v: v <= 1.0, ".3f"),
            ("plan <= 64 MB above the 10^6 figure", above, lambda v: v <= 64, ".1f"),
            ("cursor <= 64 KB", rs.get("cursor_bytes"), lambda v: v <= 64 * 1024, "d"),
            ("layout-change resume <= 2 s", rs.get("seconds"), lambda v: v <= 2.0, ".3f"),
            ("start-up requests per rank <= shards / world + 10", st.get("requests"), lambda v: v <= st["bound"], "d"),
        ]
        print()
        print("targets at 10^9 samples, 10^6 shards, world 4,096:")
        for name, v, ok, spec in checks:
            print(f"  {name}: {fmt(v, spec)} -> {'met' if v is not None and ok(v) else 'NOT met'}")
    for r in results:
        if r["startup"].get("other_calls"):
            print(f"  note: start-up made other filesystem calls at world {r['world']}: {r['startup']['other_calls']}")
    how = next((r["peer"]["how"] for r in results if "how" in r.get("peer", {})), None)
    if how:
        print(
            f"peer: mosaicml-streaming {results[0]['peer'].get('version', '?')}, get_partitions('relaxed', ...) ({how})"
        )
    print(
        "simulated: counts and claimed sizes only; start-up for one rank (world // 2) over sparse files, the other "
        "ranks' verdicts filled in locally by `share` without requests"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"configs": results, "load": load, "block": args.block, "note": note}, f, indent=1)


if __name__ == "__main__":
    main()
