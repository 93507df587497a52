"""The epoch plan by brute force: explicit position arrays of length N (the implementation before data/plan.py).
The property tests compare data/plan.py and the stream's cursor with it."""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from ddpm_dist.data.plan import Layout
from ddpm_dist.rng import mix_seed


class ReferencePlan:
    def __init__(self, counts, seed: int, epoch: int, layout: Layout, pool: Optional[np.ndarray] = None):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.total = int(self.offsets[-1])
        self.seed, self.epoch, self.layout = seed, epoch, layout
        self.pool = np.ones(self.total, dtype=bool) if pool is None else pool
        shard_order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(self.counts))
        ordered = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in shard_order])
        self.ordered = ordered[self.pool[ordered]]
        W, B = layout.world_size, layout.batch_size
        self.batches_per_rank = len(self.ordered) // (W * B)
        self.dropped = len(self.ordered) - self.batches_per_rank * W * B

    def worker_batches(self, lane: int) -> int:
        nb, nw = self.batches_per_rank, self.layout.lanes
        return nb // nw + (1 if lane < nb % nw else 0)

    def worker_sequence(self, rank: int, lane: int) -> np.ndarray:
        B, nb = self.layout.batch_size, self.batches_per_rank
        first = sum(self.worker_batches(w) for w in range(lane))
        start = rank * nb * B + first * B
        seq = self.ordered[start : start + self.worker_batches(lane) * B].copy()
        shard = np.searchsorted(self.offsets, seq, side="right") - 1
        for i, j in block_spans(shard, self.layout.block):
            rng = np.random.default_rng(mix_seed(self.seed, self.epoch, shard[i], seq[i], j - i))
            seq[i:j] = seq[i:j][rng.permutation(j - i)]
        return seq

    def consumed_per_lane(self, batches_done: int, lane: int) -> int:
        nw = self.layout.lanes
        return max(0, (batches_done - lane + nw - 1) // nw)

    def remaining(self, batches_done: int) -> np.ndarray:
        """The pool once every rank consumed `batches_done` batches."""
        pool = self.pool.copy()
        B = self.layout.batch_size
        for rank in range(self.layout.world_size):
            for lane in range(self.layout.lanes):
                c = self.consumed_per_lane(batches_done, lane)
                pool[self.worker_sequence(rank, lane)[: c * B]] = False
        return pool


def block_spans(shard_of: np.ndarray, block: int, begin: int = 0) -> Iterator[tuple[int, int]]:
    """[i, j) spans of a worker's sequence: each run of one shard cut every `block` positions (0: uncut)."""
    edges = [0, *(np.flatnonzero(np.diff(shard_of)) + 1).tolist(), len(shard_of)]
    for i, end in zip(edges[:-1], edges[1:]):
        if end == i:
            continue
        step = block or end - i
        for a in range(i, end, step):
            b = min(a + step, end)
            if b > begin:
                yield max(a, begin), b
