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
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = [  # (samples, shards, world)
    (10 ** 6, 10 ** 3, 8),
    (10 ** 8, 10 ** 5, 1024),
    (10 ** 9, 10 ** 6, 4096),
]
BATCH, WORKERS, RANKS_PER_NODE, SEED, BYTES_PER_SAMPLE = 64, 8, 8, 0, 4096
PEER_MAX_BYTES = 8 << 30  # the 10^9 peer case runs only when the 10^8 peak extrapolates (linearly) below this


# ---------------------------------------------------------------- in the child process

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Peak:
    """Peak RSS of what runs between start() and stop(), above the RSS at start()."""

    def start(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM after clear_refs"
            self.reset = _status_kb("VmHWM") <= _status_kb("VmRSS") + 64
        except OSError:
            self.reset = False
        if not self.reset:
            self.method = "ru_maxrss (not reset: includes the peak before the measurement)"
        self.rss0 = _status_kb("VmRSS")
        return self

    def stop(self) -> float:
        if self.reset:
            peak = _status_kb("VmHWM")
        else:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self.rss0) / 1024  # MB (MiB)


def simulated_counts(n: int, shards: int):
    import numpy as np
    rng = np.random.default_rng(1234)
    mean = n // shards
    counts = rng.integers(mean - mean // 2, mean + mean // 2 + 1, shards, dtype=np.int64)
    diff = n - int(counts.sum())
    counts += diff // shards
    counts[: diff % shards] += 1
    assert int(counts.sum()) == n and counts.min() > 0
    return counts


def child_plan(n, shards, world, block):
    from ddpm_dist.data.plan import EpochPlan, Layout
    counts = simulated_counts(n, shards)
    peak = Peak().start()
    t0 = time.perf_counter()
    plan = EpochPlan(counts, SEED, 0, Layout(world, BATCH, WORKERS, block))
    shard, positions = next(plan.blocks(world // 2, 0))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": peak.stop(), "peak_method": peak.method,
            "batches_per_rank": plan.batches_per_rank, "first_block": [int(shard), len(positions)]}


def _stream(counts, world, batch, workers, block, rank):
    """A TrainStream without its __init__ (which needs real shards): the attributes its cursor methods use."""
    from types import SimpleNamespace

    from ddpm_dist.data.plan import Layout
    from ddpm_dist.data.stream import TrainStream
    ts = TrainStream.__new__(TrainStream)
    ts.manifest = SimpleNamespace(num_samples=int(counts.sum()))
    ts.rank, ts.layout, ts.seed, ts.counts = rank, Layout(world, batch, workers, block), SEED, counts
    ts.epoch, ts.batches_done, ts.pool, ts.earlier, ts.legacy_pool, ts.skipped_total = 0, 0, None, [], None, 0
    return ts


def child_resume(n, shards, world, block):
    from ddpm_dist.data.plan import EpochPlan
    counts = simulated_counts(n, shards)
    l1, l2 = (world, BATCH, WORKERS, block), (world // 2, 2 * BATCH, WORKERS // 2, max(1, block // 2))
    d1 = (n // (world * BATCH)) // 3 + 1
    due2 = n - d1 * world * BATCH
    d2 = (due2 // (l2[0] * l2[1])) // 3 + 1
    # the cursor saved under L2 (one change so far): [L1, d1] earlier, d2 batches done under L2
    ts2 = _stream(counts, *l2, rank=0)
    ts2.earlier, ts2.batches_done = [[*l1, d1]], d2
    saved = json.loads(json.dumps(ts2.state_dict()))
    ts3 = _stream(counts, *l1, rank=world // 2)
    peak = Peak().start()
    t0 = time.perf_counter()
    ts3.load_state_dict(saved)  # a layout change: Order + DueSet.everything + remaining() per earlier layout
    t_load = time.perf_counter() - t0
    plan = EpochPlan(counts, SEED, 0, ts3.layout, ts3.pool)
    shard, positions = next(plan.blocks(ts3.rank, 0, plan.consumed_per_lane(ts3.batches_done, 0) * BATCH))
    seconds = time.perf_counter() - t0
    peak_mb = peak.stop()
    due = ts3.pool
    ts3.batches_done = 5  # a few batches into L3: the cursor after two layout changes in the epoch
    cursor = json.dumps(ts3.state_dict())
    assert due.total == n - d1 * world * BATCH - d2 * l2[0] * l2[1], "the due set lost count"
    arrays = due.lo.nbytes + due.hi.nbytes + due.rem.nbytes + due.cnt.nbytes + due.before.nbytes
    return {"seconds": seconds, "load_seconds": t_load, "peak_mb": peak_mb, "cursor_bytes": len(cursor),
            "cursor": json.loads(cursor), "pieces": int(len(due.lo)), "remainders": len(due.remainders),
            "piece_array_bytes": int(arrays), "due": int(due.total), "first_block": [int(shard), len(positions)],
            "layouts": [[*l1, d1], [*l2, d2], list(l1)], "lanes_per_change": [l1[0] * l1[2], l2[0] * l2[2]],
            "pieces_per_lane": float(len(due.lo)) / (l1[0] * l1[2] + l2[0] * l2[2])}


def child_startup(n, shards, world, block):
    import threading

    import numpy as np
    from fsspec.implementations.local import LocalFileSystem

    from ddpm_dist.data import startup
    counts = simulated_counts(n, shards)
    sizes = counts * BYTES_PER_SAMPLE
    rank = world // 2
    mine = startup.slice_of(rank, world, shards)
    folder = tempfile.mkdtemp(prefix="scale-bench-shards-")
    try:
        for i in mine:  # only this rank's slice exists, as sparse files of the claimed sizes
            path = os.path.join(folder, f"shard-{i:07d}.tar")
            open(path, "wb").close()
            os.truncate(path, int(sizes[i]))
        calls = {}
        lock = threading.Lock()

        def counted(name, fn):
            def wrapper(*a, **k):
                with lock:
                    calls[name] = calls.get(name, 0) + 1
                return fn(*a, **k)
            return wrapper
        for name in ("info", "ls", "exists", "open", "_open", "isdir", "isfile", "lexists", "cat_file", "find"):
            if hasattr(LocalFileSystem, name):
                setattr(LocalFileSystem, name, counted(name, getattr(LocalFileSystem, name)))
        others = np.ones(shards, dtype=bool)
        others[mine.start:mine.stop] = False

        def share(found):  # the other ranks' verdicts, not requested: present with the claimed size
            out = found.copy()
            out[others] += startup.PRESENT + sizes[others]
            return out

        url = os.path.join(folder, "shard-{:07d}.tar").format
        peak = Peak().start()
        t0 = time.perf_counter()
        real = startup.check_shards(url, counts, rank, world, share=share)
        seconds = time.perf_counter() - t0
        assert np.array_equal(real[mine.start:mine.stop], sizes[mine.start:mine.stop])
        return {"seconds": seconds, "peak_mb": peak.stop(), "requests": calls.get("info", 0),
                "other_calls": {k: v for k, v in calls.items() if k != "info"}, "slice": len(mine),
                "bound": shards / world + 10}
    finally:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def _peer_module():
    """streaming.base.partition, imported normally, else from the installed files under empty parent packages
    (the package __init__ imports its data loader and cloud SDKs; the partition modules need only numpy)."""
    try:
        from streaming.base import partition
        return partition, "import streaming.base.partition"
    except ImportError as e:
        import importlib.util
        import types
        spec = importlib.util.find_spec("streaming")
        if spec is None or spec.origin is None:
            raise
        pkg = os.path.dirname(spec.origin)
        for name, path in (("streaming", pkg), ("streaming.base", os.path.join(pkg, "base"))):
            sys.modules.pop(name, None)
            mod = types.ModuleType(name)
            mod.__path__ = [path]
            sys.modules[name] = mod
        for name in [m for m in sys.modules if m.startswith("streaming.") and m != "streaming.base"]:
            sys.modules.pop(name)
        from streaming.base import partition
        return partition, f"partition/*.py loaded under empty parent packages (import streaming: {e})"


def child_peer(n, shards, world, block, resume=False):
    partition, how = _peer_module()
    from importlib.metadata import version
    nodes = max(1, world // RANKS_PER_NODE)
    if resume:  # after W -> W/2 (global batch kept: 2 x 64 per rank), a third of the epoch seen
        seen = (n // (world * BATCH)) // 3 * world * BATCH
        args = ("relaxed", n, nodes, max(1, nodes // 2), RANKS_PER_NODE, WORKERS, 2 * BATCH, seen, nodes)
    else:
        args = ("relaxed", n, nodes, nodes, RANKS_PER_NODE, WORKERS, BATCH)
    peak = Peak().start()
    t0 = time.perf_counter()
    ids = partition.get_partitions(*args)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": peak.stop(), "shape": list(ids.shape), "result_mb": ids.nbytes / 2 ** 20,
            "how": how, "version": version("mosaicml-streaming"), "args": list(args[1:])}


CHILDREN = {"plan": child_plan, "resume": child_resume, "startup": child_startup, "peer": child_peer,
            "peer_resume": lambda *a: child_peer(*a, resume=True)}


# ---------------------------------------------------------------- the parent

def run_child(kind: str, cfg, block: int, timeout: float) -> dict:
    n, s, w = cfg
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, str(n), str(s), str(w), str(block)]
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
    p = subprocess.run([sys.executable, "-c", "import importlib.util,sys; "
                        "sys.exit(0 if importlib.util.find_spec('streaming') else 1)"], capture_output=True)
    return "" if p.returncode == 0 else ("mosaicml-streaming is not installed: peer columns skipped "
                                         "(.venv/bin/pip install --no-deps mosaicml-streaming==0.13.0)")


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
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *nums = args.child
        print(json.dumps(CHILDREN[kind](*map(int, nums))), flush=True)
        return

    note = "peer skipped (--no-peer)" if args.no_peer else peer_available()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"load average {' '.join(load)}, {os.cpu_count()} cpus; batch {BATCH}/rank, {WORKERS} workers/rank, "
          f"block {args.block}; each figure a fresh process", flush=True)
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
            prev = max((r for r in results if r["samples"] < n and "peak_mb" in r.get("peer", {})),
                       key=lambda r: r["samples"], default=None)
            need = prev["peer"]["peak_mb"] * 2 ** 20 * (n / prev["samples"]) if prev is not None else None
            if n >= 10 ** 9 and (need is None or need > PEER_MAX_BYTES):
                why = (f"would need ~{need / 2 ** 30:.0f} GB (measured {prev['peer']['peak_mb'] / 1024:.2f} GB at "
                       f"{prev['samples']:.0e}, linear)") if need is not None else \
                    "no smaller measurement to extrapolate its memory from (include --configs 1)"
                row["peer"] = {"skipped": f"not run: {why}"}
            else:
                row["peer"] = run_child("peer", cfg, args.block, args.timeout)
                if args.peer_resume and w >= 16:
                    row["peer_resume"] = run_child("peer_resume", cfg, args.block, args.timeout)
            print(f"  {n:.0e} samples / {s:.0e} shards / world {w}: peer {json.dumps(row['peer'])[:300]}", flush=True)
            if "peer_resume" in row:
                print(f"  ... peer resume {json.dumps(row['peer_resume'])[:300]}", flush=True)
        results.append(row)

    base = next((r["plan"].get("peak_mb") for r in results if r["samples"] == 10 ** 6), None)
    print()
    print("| samples / shards / world | plan s | plan MB (above 10^6) | cursor B | due pieces | resume s "
          "| start-up requests / rank (bound) | start-up s | peer s | peer MB | plan s ours/peer | MB ours/peer |")
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
        print(f"| 10^{len(str(r['samples'])) - 1} / 10^{len(str(r['shards'])) - 1} / {r['world']:,} "
              f"| {err(p, 'seconds', '.4f')} | {err(p, 'peak_mb', '.1f')} ({fmt(above, '+.1f')}) "
              f"| {err(rs, 'cursor_bytes', 'd')} | {fmt(rs.get('pieces'), ',d')} | {err(rs, 'seconds', '.3f')} "
              f"| {err(st, 'requests', 'd')} ({fmt(st.get('bound'), '.1f')}) | {err(st, 'seconds', '.3f')} "
              f"| {peer_cell} | {fmt(peer_mb, '.1f')} | {fmt(ratio_s, '.2g')} | {fmt(ratio_mb, '.2g')} |")
    big = next((r for r in results if r["samples"] == 10 ** 9), None)
    if big is not None:
        p, rs, st = big["plan"], big["resume"], big["startup"]
        above = p.get("peak_mb", 0) - base if base is not None else None
        checks = [
            ("plan <= 1 s", p.get("seconds"), lambda v: v <= 1.0, ".3f"),
            ("plan <= 64 MB above the 10^6 figure", above, lambda v: v <= 64, ".1f"),
            ("cursor <= 64 KB", rs.get("cursor_bytes"), lambda v: v <= 64 * 1024, "d"),
            ("layout-change resume <= 2 s", rs.get("seconds"), lambda v: v <= 2.0, ".3f"),
            ("start-up requests per rank <= shards / world + 10", st.get("requests"),
             lambda v: v <= st["bound"], "d"),
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
        print(f"peer: mosaicml-streaming {results[0]['peer'].get('version', '?')}, get_partitions('relaxed', ...) "
              f"({how})")
    print("simulated: counts and claimed sizes only; start-up for one rank (world // 2) over sparse files, the other "
          "ranks' verdicts filled in locally by `share` without requests")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"configs": results, "load": load, "block": args.block, "note": note}, f, indent=1)


if __name__ == "__main__":
    main()
