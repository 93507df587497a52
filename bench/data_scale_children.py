"""The measured side of bench/data_scale_bench.py: each function runs in a fresh process (this file as a script:
`data_scale_children.py KIND SAMPLES SHARDS WORLD BLOCK`) and prints one JSON line. What is simulated and what is
real is said in data_scale_bench.py's docstring."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BATCH, WORKERS, RANKS_PER_NODE, SEED, BYTES_PER_SAMPLE = 64, 8, 8, 0, 4096


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
    return {
        "seconds": seconds,
        "peak_mb": peak.stop(),
        "peak_method": peak.method,
        "batches_per_rank": plan.batches_per_rank,
        "first_block": [int(shard), len(positions)],
    }


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
    return {
        "seconds": seconds,
        "load_seconds": t_load,
        "peak_mb": peak_mb,
        "cursor_bytes": len(cursor),
        "cursor": json.loads(cursor),
        "pieces": int(len(due.lo)),
        "remainders": len(due.remainders),
        "piece_array_bytes": int(arrays),
        "due": int(due.total),
        "first_block": [int(shard), len(positions)],
        "layouts": [[*l1, d1], [*l2, d2], list(l1)],
        "lanes_per_change": [l1[0] * l1[2], l2[0] * l2[2]],
        "pieces_per_lane": float(len(due.lo)) / (l1[0] * l1[2] + l2[0] * l2[2]),
    }


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
        others[mine.start : mine.stop] = False

        def share(found):  # the other ranks' verdicts, not requested: present with the claimed size
            out = found.copy()
            out[others] += startup.PRESENT + sizes[others]
            return out

        url = os.path.join(folder, "shard-{:07d}.tar").format
        peak = Peak().start()
        t0 = time.perf_counter()
        real = startup.check_shards(url, counts, rank, world, share=share)
        seconds = time.perf_counter() - t0
        assert np.array_equal(real[mine.start : mine.stop], sizes[mine.start : mine.stop])
        return {
            "seconds": seconds,
            "peak_mb": peak.stop(),
            "requests": calls.get("info", 0),
            "other_calls": {k: v for k, v in calls.items() if k != "info"},
            "slice": len(mine),
            "bound": shards / world + 10,
        }
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
    return {
        "seconds": seconds,
        "peak_mb": peak.stop(),
        "shape": list(ids.shape),
        "result_mb": ids.nbytes / 2**20,
        "how": how,
        "version": version("mosaicml-streaming"),
        "args": list(args[1:]),
    }


CHILDREN = {
    "plan": child_plan,
    "resume": child_resume,
    "startup": child_startup,
    "peer": child_peer,
    "peer_resume": lambda *a: child_peer(*a, resume=True),
}


if __name__ == "__main__":
    kind, *nums = sys.argv[1:]
    print(json.dumps(CHILDREN[kind](*map(int, nums))), flush=True)
