"""An epoch's plan as index arithmetic over cumulative counts: O(shards) per process, a worker's positions made one
block at a time, and what an epoch still owes as intervals of its order. No array of one entry per sample.

Positions 0..N-1 number the samples in manifest order. An epoch orders them by a seeded permutation of the shards,
each shard's positions ascending: `u` (0..N-1) is a sample's place in that order, and `Order` maps u to positions
with one searchsorted over the shards' cumulative counts.

What is still due this epoch is a `DueSet`: sorted pieces [lo, hi) of u, each either wholly due or the remainder of
a block that a layout left part-consumed (a `_Remainder`: its parent's members in [lo, hi), in the block's permuted
order, less the first `consumed`). Its members are made when a worker reaches that block, never saved. A layout
change turns each (rank, worker) lane's consumed prefix into one removed interval plus at most one remainder, so a
due set has O(world x workers x layout changes) pieces, and the cursor stores only the layouts (stream.py).

The plan of a layout over a due set (the k-th due u in order is "rank" k):
  - rank r takes due ranks [r*nb*B, (r+1)*nb*B), nb = due // (world*B) (the < world*B tail is dropped);
  - its run is cut at batch boundaries into one contiguous run per DataLoader worker (lane);
  - a lane's run of each shard is cut into blocks of at most `layout.block` (0: the whole run), each permuted by
    a seed of (seed, epoch, shard, its first position, its length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from ..rng import mix_seed


@dataclass(frozen=True)
class Layout:
    world_size: int
    batch_size: int  # per rank, per micro-step
    num_workers: int  # DataLoader workers (0 = in the main process, planned as one worker)
    block: int = 0  # positions of one shard resident at a time, shuffled together (0: a worker's whole run)

    @property
    def lanes(self) -> int:
        return max(1, self.num_workers)

    def lanes_equal(self, other: "Layout") -> bool:
        """The same plan: 0 and 1 DataLoader workers both make one lane."""
        return (self.world_size, self.batch_size, self.lanes, self.block) == (
            other.world_size,
            other.batch_size,
            other.lanes,
            other.block,
        )


class Order:
    """One epoch's order of the samples: shards permuted by (seed, epoch), positions ascending within a shard."""

    def __init__(self, counts, seed: int, epoch: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.zeros(len(self.counts) + 1, dtype=np.int64)  # manifest-order start of each shard
        np.cumsum(self.counts, out=self.offsets[1:])
        self.total = int(self.offsets[-1])
        self.seed, self.epoch = seed, epoch
        self.shard_order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(self.counts))
        self.starts = np.zeros(len(self.counts) + 1, dtype=np.int64)  # u where the k-th shard of the order begins
        np.cumsum(self.counts[self.shard_order], out=self.starts[1:])

    def slot(self, u):
        """The place in the shard order (k) of the shard that holds u."""
        return np.searchsorted(self.starts, u, side="right") - 1

    def positions(self, u: np.ndarray, k: int) -> np.ndarray:
        """Manifest positions of u's that all lie in the k-th shard of the order."""
        return self.offsets[self.shard_order[k]] + (u - self.starts[k])

    def block_seed(self, k: int, first_position: int, n: int) -> int:
        return mix_seed(self.seed, self.epoch, int(self.shard_order[k]), int(first_position), n)

    def permuted(self, u: np.ndarray, k: int) -> np.ndarray:
        """A block (due u's of the k-th shard, ascending) as positions in the order it is served."""
        pos = self.positions(u, k)
        return pos[np.random.default_rng(self.block_seed(k, pos[0], len(pos))).permutation(len(pos))]


class _Remainder:
    """What is left of a block that a layout stopped part-way: `parent`'s due members in [lo, hi), served in the
    block's permuted order, less the first `consumed` of them."""

    def __init__(self, parent: "DueSet", lo: int, hi: int, n: int, consumed: int, k: int):
        self.parent = parent
        self.lo = lo
        self.hi = hi
        self.n = n
        self.consumed = consumed
        self.k = k
        self._members: Optional[np.ndarray] = None

    def members(self) -> np.ndarray:
        if self._members is None:
            u = self.parent.members(self.lo, self.hi)
            assert len(u) == self.n, "a remainder's block changed size"
            order = self.parent.order
            pos = order.positions(u, self.k)
            perm = np.random.default_rng(order.block_seed(self.k, pos[0], self.n)).permutation(self.n)
            self._members = np.sort(u[perm[self.consumed :]])
        return self._members

    def __getstate__(self):  # workers make the members again when they need them
        return {**self.__dict__, "_members": None}


class DueSet:
    """The u's still due in an epoch: sorted, disjoint pieces [lo, hi), wholly due (rem == -1) or the members of
    remainder `rem` inside [lo, hi); `cnt` due u's each."""

    def __init__(self, order: Order, lo, hi, rem, cnt, remainders: list):
        self.order, self.remainders = order, remainders
        self.lo, self.hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
        self.rem, self.cnt = np.asarray(rem, dtype=np.int64), np.asarray(cnt, dtype=np.int64)
        self.before = np.zeros(len(self.cnt) + 1, dtype=np.int64)  # due ranks before each piece
        np.cumsum(self.cnt, out=self.before[1:])
        self.total = int(self.before[-1])

    @classmethod
    def everything(cls, order: Order) -> "DueSet":
        return cls(order, [0], [order.total], [-1], [order.total], [])

    @classmethod
    def from_mask(cls, order: Order, due_positions: np.ndarray) -> "DueSet":
        """From a bool mask over manifest positions (the cursors of before this module): runs of u that are due."""
        u_mask = np.zeros(order.total, dtype=bool)
        for k, shard in enumerate(order.shard_order):
            u_mask[order.starts[k] : order.starts[k + 1]] = due_positions[
                order.offsets[shard] : order.offsets[shard + 1]
            ]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], u_mask.astype(np.int8), [0]])))
        lo, hi = edges[0::2], edges[1::2]
        return cls(order, lo, hi, np.full(len(lo), -1), hi - lo, [])

    @property
    def is_everything(self) -> bool:
        return self.total == self.order.total

    def _piece_members(self, i: int, a: int = 0, b: int = 1 << 62) -> np.ndarray:
        """Due u's of piece i within [a, b)."""
        lo, hi = max(a, int(self.lo[i])), min(b, int(self.hi[i]))
        if self.rem[i] < 0:
            return np.arange(lo, max(lo, hi), dtype=np.int64)
        m = self.remainders[self.rem[i]].members()
        return m[np.searchsorted(m, lo) : np.searchsorted(m, hi)]

    def members(self, a: int, b: int) -> np.ndarray:
        """Due u's in [a, b), ascending."""
        i, j = np.searchsorted(self.hi, a, side="right"), np.searchsorted(self.lo, b, side="left")
        parts = [self._piece_members(p, a, b) for p in range(i, j)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def select(self, p: int) -> int:
        """The u of due rank p."""
        i = int(np.searchsorted(self.before, p, side="right")) - 1
        if self.rem[i] < 0:
            return int(self.lo[i] + p - self.before[i])
        return int(self._piece_members(i)[p - self.before[i]])  # a remainder: at most one block

    def select_many(self, p: np.ndarray) -> np.ndarray:
        """The u of each due rank in p (vectorised: a remainder piece is looked up one rank at a time)."""
        p = np.asarray(p, dtype=np.int64)
        i = np.searchsorted(self.before, p, side="right") - 1
        out = self.lo[i] + (p - self.before[i])
        for q in np.flatnonzero(self.rem[i] >= 0):
            out[q] = self.select(int(p[q]))
        return out

    def ranks_of(self, u: np.ndarray) -> np.ndarray:
        """The number of due u's below each u (a sorted or unsorted int64 array)."""
        u = np.asarray(u, dtype=np.int64)
        i = np.searchsorted(self.hi, u, side="right")  # pieces wholly below u: [0, i)
        out = self.before[i].copy()
        inside = np.flatnonzero((i < len(self.lo)) & (self.lo[np.minimum(i, len(self.lo) - 1)] < u))
        for q in inside:  # u falls inside piece i[q]
            p = int(i[q])
            out[q] += (u[q] - self.lo[p]) if self.rem[p] < 0 else np.searchsorted(self._piece_members(p), u[q])
        return out

    def rank_of(self, u: int) -> int:
        return int(self.ranks_of(np.array([u]))[0])

    def without(self, cut_lo: np.ndarray, cut_hi: np.ndarray, remainders: list["_Remainder"]) -> "DueSet":
        """This set less the u-intervals [cut_lo, cut_hi) (sorted, disjoint), plus the given remainders (each lying
        within one of the cut intervals)."""
        order = self.order
        lo, hi, rem, cnt = [], [], [], []
        # what survives: each piece intersected with the gaps between cuts
        gap_lo = np.concatenate([[0], cut_hi])
        gap_hi = np.concatenate([cut_lo, [order.total]])
        keep = gap_hi > gap_lo
        gap_lo, gap_hi = gap_lo[keep], gap_hi[keep]
        g0 = np.searchsorted(gap_hi, self.lo, side="right")  # first gap that can meet each piece
        g1 = np.searchsorted(gap_lo, self.hi, side="left")  # gaps [g0, g1) meet it
        for p in range(len(self.lo)):
            plo, phi, prem = int(self.lo[p]), int(self.hi[p]), int(self.rem[p])
            for g in range(int(g0[p]), int(g1[p])):
                a, b = max(plo, int(gap_lo[g])), min(phi, int(gap_hi[g]))
                if a >= b:
                    continue
                if prem < 0:
                    n = b - a
                elif a == plo and b == phi:
                    n = int(self.cnt[p])
                else:
                    m = self.remainders[prem].members()
                    n = int(np.searchsorted(m, b) - np.searchsorted(m, a))
                if n:
                    lo.append(a), hi.append(b), rem.append(prem), cnt.append(n)
        # the remainders of this set's pieces keep their numbers; new ones follow
        kept = list(self.remainders)
        for r in remainders:
            if r.n - r.consumed:
                lo.append(r.lo), hi.append(r.hi), rem.append(len(kept)), cnt.append(r.n - r.consumed)
                kept.append(r)
        if not lo:
            return DueSet(order, [], [], [], [], [])
        idx = np.argsort(np.asarray(lo, dtype=np.int64), kind="stable")
        return DueSet(order, np.asarray(lo)[idx], np.asarray(hi)[idx], np.asarray(rem)[idx], np.asarray(cnt)[idx], kept)


class EpochPlan:
    """One layout's plan over an epoch's due set: lanes' due-rank runs, their blocks, and what a prefix consumed."""

    def __init__(self, counts, seed: int, epoch: int, layout: Layout, due: Optional[DueSet] = None):
        self.order = due.order if due is not None else Order(counts, seed, epoch)
        self.due = due if due is not None else DueSet.everything(self.order)
        self.seed, self.epoch, self.layout = seed, epoch, layout
        self.offsets = self.order.offsets
        W, B = layout.world_size, layout.batch_size
        self.batches_per_rank = self.due.total // (W * B)
        self.dropped = self.due.total - self.batches_per_rank * W * B

    def worker_batches(self, lane: int) -> int:
        nb, nw = self.batches_per_rank, self.layout.lanes
        return nb // nw + (1 if lane < nb % nw else 0)

    def lane_range(self, rank: int, lane: int) -> tuple[int, int]:
        """The due ranks [s, e) lane `lane` of rank `rank` serves."""
        nb, nw, B = self.batches_per_rank, self.layout.lanes, self.layout.batch_size
        first = lane * (nb // nw) + min(lane, nb % nw)  # batches of the lanes before it
        s = rank * nb * B + first * B
        return s, s + self.worker_batches(lane) * B

    def consumed_per_lane(self, batches_done: int, lane: int) -> int:
        nw = self.layout.lanes
        return max(0, (batches_done - lane + nw - 1) // nw)

    def _runs(self, s: int, e: int, begin: int = 0) -> Iterator[tuple[int, int, int]]:
        """(k, a, b): the lane's run [s, e) cut where the shard changes (k-th shard of the order), from due rank
        `begin` on (runs that end before it are skipped without making members)."""
        due, order = self.due, self.order
        cur = max(s, begin)
        while cur < e:
            k = int(order.slot(due.select(cur)))
            b = min(e, due.rank_of(int(order.starts[k + 1])))
            a = max(s, due.rank_of(int(order.starts[k])))
            yield k, a, b
            cur = b

    def blocks(self, rank: int, lane: int, begin: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(manifest shard, positions in serving order) per block of the lane, from the lane's `begin`-th position
        on (the first block clipped), one block made at a time."""
        s, e = self.lane_range(rank, lane)
        start = s + begin
        for k, a, b in self._runs(s, e, start):
            step = self.layout.block or (b - a)
            for p0 in range(a + max(0, (start - a) // step) * step, b, step):
                p1 = min(p0 + step, b)
                u = self.due.members(self.due.select(p0), self.due.select(p1 - 1) + 1)
                served = self.order.permuted(u, k)
                yield int(self.order.shard_order[k]), served[max(0, start - p0) :]

    def worker_sequence(self, rank: int, lane: int) -> np.ndarray:
        """Every position the lane serves, in order (O(its share)): for tests and small tools."""
        parts = [pos for _, pos in self.blocks(rank, lane)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def remaining(self, batches_done: int) -> DueSet:
        """The due set once every rank has consumed `batches_done` batches under this plan: each lane's consumed
        prefix is whole blocks (an interval of due ranks, so of u) and at most one block's permuted prefix.
        Vectorised over the world x workers lanes (4,096 x 8 at scale)."""
        due, order, B, nw = self.due, self.order, self.layout.batch_size, self.layout.lanes
        lanes = np.arange(nw)
        c = np.maximum(0, (batches_done - lanes + nw - 1) // nw)  # batches each lane consumed
        bounds = np.array([self.lane_range(0, w) for w in lanes], dtype=np.int64).reshape(nw, 2)
        shift = np.arange(self.layout.world_size, dtype=np.int64)[:, None] * self.batches_per_rank * B
        s, e = (bounds[:, 0] + shift).ravel(), (bounds[:, 1] + shift).ravel()
        t = np.minimum(e, s + np.tile(c, self.layout.world_size) * B)
        busy = t > s
        s, e, t = s[busy], e[busy], t[busy]
        if not len(s):
            return due
        # the block that holds t (when t < e): cut from the start of the lane's run of t's shard
        inside = t < e
        k = order.slot(due.select_many(np.where(inside, t, s)))
        a = np.maximum(s, due.ranks_of(order.starts[k]))
        b = np.minimum(e, due.ranks_of(order.starts[k + 1]))
        step = np.where(self.layout.block > 0, self.layout.block, b - a)
        step = np.maximum(step, 1)
        p0 = np.where(inside, a + (t - a) // step * step, t)
        p1 = np.where(inside, np.minimum(p0 + step, b), t)
        whole = p0 > s  # [s, p0): whole blocks
        first = due.select_many(s[whole])
        last = due.select_many(p0[whole] - 1) + 1
        part = p0 < t  # [p0, p1): a block consumed part-way, to t
        plo = due.select_many(p0[part])
        phi = due.select_many(p1[part] - 1) + 1
        remainders = [
            _Remainder(due, int(lo), int(hi), int(n), int(m), int(kk))
            for lo, hi, n, m, kk in zip(plo, phi, (p1 - p0)[part], (t - p0)[part], k[part])
        ]
        cut_lo, cut_hi = np.concatenate([first, plo]), np.concatenate([last, phi])
        idx = np.argsort(cut_lo, kind="stable")
        cut_lo, cut_hi = cut_lo[idx], cut_hi[idx]
        # merge touching cuts: a cut starts a new interval unless it begins where the ones before it end
        reach = np.maximum.accumulate(cut_hi)
        new = np.concatenate([[True], cut_lo[1:] > reach[:-1]])
        starts = np.flatnonzero(new)
        ends = np.concatenate([starts[1:], [len(cut_lo)]]) - 1
        return due.without(cut_lo[starts], reach[ends], remainders)
