"""The epoch plan (data/plan.py) and the data cursor against a brute-force reference with explicit position arrays
(tests/support/plan_reference.py, the implementation before plan.py), for random manifests and random sequences of
layout changes: the same positions per rank, worker and batch, and nothing of length N in the new plan."""

import base64
import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_dist.data import Layout, TrainStream, load_manifest
from ddpm_dist.data.plan import DueSet, EpochPlan, Order
from tests.support.common import DIGITS
from tests.support.plan_reference import ReferencePlan

layouts = st.builds(Layout, st.integers(1, 4), st.integers(1, 6), st.integers(0, 3), st.integers(0, 7))


def rank_batches(plan, rank):
    """Rank batch j is lane (j mod nw)'s batch j // nw: the positions of every batch of the rank, in order."""
    B, nw = plan.layout.batch_size, plan.layout.lanes
    seqs = [plan.worker_sequence(rank, lane) for lane in range(nw)]
    return [seqs[j % nw][(j // nw) * B : (j // nw + 1) * B].tolist() for j in range(plan.batches_per_rank)]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=7).filter(lambda c: sum(c) > 0),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 3),
    changes=st.lists(st.tuples(layouts, st.floats(0, 1)), min_size=1, max_size=5),
    begin=st.floats(0, 1),
)
def test_plan_and_cursor_match_the_brute_force_reference(counts, seed, epoch, changes, begin):
    pool, due, earlier = None, None, []
    for layout, frac in changes:
        ref = ReferencePlan(counts, seed, epoch, layout, pool)
        new = EpochPlan(counts, seed, epoch, layout, due)
        assert (new.batches_per_rank, new.dropped) == (ref.batches_per_rank, ref.dropped)
        for rank in range(layout.world_size):
            assert rank_batches(new, rank) == rank_batches(ref, rank)
            for lane in range(layout.lanes):  # a worker that resumes part-way reads the rest of its sequence
                seq = ref.worker_sequence(rank, lane)
                cut = int(begin * len(seq))
                got = [pos for _, block in new.blocks(rank, lane, cut) for pos in block.tolist()]
                assert got == seq[cut:].tolist()
        done = int(frac * (ref.batches_per_rank + 1))
        pool, due = ref.remaining(done), new.remaining(done)
        assert due.total == int(pool.sum())
        # the cursor: only the layouts and how far each got, through JSON; the due set made again from it
        earlier.append([layout.world_size, layout.batch_size, layout.num_workers, layout.block, done])
        earlier = json.loads(json.dumps(earlier))
        again = DueSet.everything(Order(counts, seed, epoch))
        for *lay, d in earlier:
            again = EpochPlan(counts, seed, epoch, Layout(*lay), again).remaining(d)
        order = again.order
        members = again.members(0, order.total)
        positions = np.concatenate(
            [
                order.positions(members[(members >= order.starts[k]) & (members < order.starts[k + 1])], k)
                for k in range(len(counts))
            ]
        )
        assert sorted(positions.tolist()) == np.flatnonzero(pool).tolist()


def test_a_bit_mask_cursor_of_before_still_loads(tmp_path):
    """A cursor written before plan.py (the pool as a packed bit mask after a layout change) resumes the rest of
    its epoch exactly as that code planned it."""
    m = load_manifest(DIGITS)
    counts = [s.num_samples for s in m.shards]
    old = ReferencePlan(counts, 7, 0, Layout(2, 32, 0))
    pool = old.remaining(9)  # two ranks consumed 9 batches, then the job came back with 3 ranks
    state = {
        "epoch": 0,
        "batches_done": 0,
        "pool": base64.b64encode(np.packbits(pool).tobytes()).decode(),
        "seed": 7,
        "world_size": 3,
        "batch_size": 32,
        "num_workers": 0,
        "block": 0,
        "num_samples": m.num_samples,
        "skipped_total": 0,
    }
    expected = ReferencePlan(counts, 7, 0, Layout(3, 32, 0), pool)
    for rank in range(3):
        s = TrainStream(m, rank=rank, layout=Layout(3, 32, 0), seed=7)
        s.load_state_dict(json.loads(json.dumps(state)))
        it = iter(s)
        got = [next(it)["index"].tolist() for _ in range(expected.batches_per_rank)]
        assert got == rank_batches(expected, rank)
        assert s.epoch == 1 and s.pool is None


def test_the_cursor_is_small_and_holds_no_per_sample_state():
    """Two layout changes in an epoch: the cursor names the layouts, not the samples."""
    m = load_manifest(DIGITS)
    s = TrainStream(m, rank=0, layout=Layout(2, 16, 0), seed=7)
    it = iter(s)
    for _ in range(5):
        next(it)
    for layout in (Layout(3, 8, 0), Layout(1, 32, 2)):
        t = TrainStream(m, rank=0, layout=layout, seed=7)
        t.load_state_dict(s.state_dict())
        it = iter(t)
        next(it)
        s = t
    state = s.state_dict()
    assert state["earlier"] == [[2, 16, 0, 0, 5], [3, 8, 0, 0, 1]] and state["pool"] is None
    assert len(json.dumps(state)) < 400
