"""The training stream: manifest shards -> (rank, DataLoader worker) split -> shuffled, decoded batches,
with a cursor that resumes exactly.

Plan of one epoch (index math only, no data read):
  1. positions 0..N-1 number the samples in manifest order; a "pool" mask says which are still due
     this epoch (all of them, unless the layout changed mid-epoch);
  2. the shard order is a permutation seeded by (seed, epoch); due positions follow it;
  3. rank r takes the r-th contiguous run of nb*B positions (nb = due // (world*B): every rank gets the
     same number of batches; the < world*B tail is dropped, as drop_last does);
  4. a rank's run is cut, at batch boundaries, into one contiguous run per DataLoader worker, and each
     worker permutes the positions of each shard it touches (a shard-sized shuffle buffer);
  5. the DataLoader returns worker batches round robin, so rank batch j is worker (j mod nw)'s batch j // nw.
The cursor is (epoch, pool, layout, batches consumed). Same layout: workers skip what was consumed.
New world size / workers / batch: the positions consumed so far are recomputed from the old plan and
removed from the pool, and the rest of the epoch is re-planned for the new layout: nothing repeats,
and at most new_world*B - 1 positions (the epoch's drop_last tail) go unseen in that epoch.
"""
from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..images import to_model_range
from ..rng import mix_seed
from . import storage
from .shards import (
    Manifest,
    ShardError,
    decode_image,
    decode_label,
    iter_tar_samples,
    load_manifest,
    manifest_from_pattern,
    samples_from_index,
)

log = logging.getLogger(__name__)
MIN_SEEN_FOR_SKIP_CHECK = 100


class DataError(RuntimeError):
    """Fatal data problem (missing shard, too many corrupt samples)."""


@dataclass(frozen=True)
class Layout:
    world_size: int
    batch_size: int  # per rank, per micro-step
    num_workers: int  # DataLoader workers (0 = in the main process, planned as one worker)

    @property
    def lanes(self) -> int:
        return max(1, self.num_workers)


class EpochPlan:
    def __init__(self, counts: list[int], seed: int, epoch: int, layout: Layout, pool: Optional[np.ndarray] = None):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.total = int(self.offsets[-1])
        self.seed, self.epoch, self.layout = seed, epoch, layout
        self.pool = np.ones(self.total, dtype=bool) if pool is None else pool
        self.shard_order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(self.counts))
        ordered = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in self.shard_order])
        self.ordered = ordered[self.pool[ordered]]
        W, B = layout.world_size, layout.batch_size
        self.batches_per_rank = len(self.ordered) // (W * B)
        self.dropped = len(self.ordered) - self.batches_per_rank * W * B

    def worker_batches(self, lane: int) -> int:
        nb, nw = self.batches_per_rank, self.layout.lanes
        return nb // nw + (1 if lane < nb % nw else 0)

    def worker_sequence(self, rank: int, lane: int) -> np.ndarray:
        """Positions lane `lane` of rank `rank` serves, in order (each shard's part permuted)."""
        B, nb = self.layout.batch_size, self.batches_per_rank
        first = sum(self.worker_batches(w) for w in range(lane))
        start = rank * nb * B + first * B
        seq = self.ordered[start:start + self.worker_batches(lane) * B].copy()
        shard = np.searchsorted(self.offsets, seq, side="right") - 1
        i = 0
        while i < len(seq):  # permute each run of one shard's positions
            j = i
            while j < len(seq) and shard[j] == shard[i]:
                j += 1
            rng = np.random.default_rng(mix_seed(self.seed, self.epoch, shard[i], seq[i], j - i))
            seq[i:j] = seq[i:j][rng.permutation(j - i)]
            i = j
        return seq

    def consumed_per_lane(self, batches_done: int, lane: int) -> int:
        nw = self.layout.lanes
        return max(0, (batches_done - lane + nw - 1) // nw)

    def consumed(self, batches_done: int) -> np.ndarray:
        """Every position any rank has consumed after `batches_done` batches per rank."""
        B, parts = self.layout.batch_size, []
        for rank in range(self.layout.world_size):
            for lane in range(self.layout.lanes):
                c = self.consumed_per_lane(batches_done, lane)
                if c:
                    parts.append(self.worker_sequence(rank, lane)[:c * B])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _flip_bit(seed: int, epoch: int, pos: int) -> bool:
    return bool(mix_seed(seed, epoch, pos, 0xF11B) & 1)


class _LaneDataset(IterableDataset):
    """What one DataLoader worker runs, epoch after epoch: its lane of each epoch's plan, as ready batches.

    The DataLoader hands out worker outputs round robin and never restarts (persistent across epochs), so
    delivery slot g (counted from the start of this loader) comes from worker g mod nw. Rank batch k of an
    epoch is lane k mod nw's batch k // nw; the epoch starting at slot s therefore maps worker w to lane
    (w - s) mod nw. The first epoch may start part-way (batches already consumed before a resume)."""

    def __init__(self, manifest: Manifest, counts: list[int], seed: int, layout: Layout, rank: int, epoch: int,
                 pool: Optional[np.ndarray], batches_done: int, random_flip: bool, max_skip_fraction: float,
                 expected_shape: tuple[int, int, int]):
        self.manifest, self.counts, self.seed, self.layout, self.rank = manifest, counts, seed, layout, rank
        self.epoch, self.pool, self.batches_done = epoch, pool, batches_done
        self.random_flip, self.max_skip_fraction, self.expected_shape = random_flip, max_skip_fraction, expected_shape
        self._index_cache: dict = {}
        self.seen = self.skipped = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        nw = self.layout.lanes
        worker = info.id if info is not None else 0
        if info is None and nw > 1:
            raise RuntimeError("a multi-lane plan needs DataLoader workers")
        epoch, pool, done, slot = self.epoch, self.pool, self.batches_done, 0
        while True:
            plan = EpochPlan(self.counts, self.seed, epoch, self.layout, pool)
            lane = (worker - slot + done) % nw  # for done == 0 this is (w - s) mod nw
            start = plan.consumed_per_lane(done, lane)
            for m, batch in enumerate(self._batches(plan, plan.worker_sequence(self.rank, lane), start)):
                batch.update(epoch=epoch, batch=(start + m) * nw + lane, epoch_batches=plan.batches_per_rank)
                yield batch
            slot += plan.batches_per_rank - done
            epoch, pool, done = epoch + 1, None, 0

    def _read_piece(self, plan: EpochPlan, shard: int, wanted: np.ndarray) -> dict[int, tuple]:
        """Decoded (image, label, key) for the wanted positions of one shard; None for undecodable ones."""
        base = int(plan.offsets[shard])
        local = set((wanted - base).tolist())
        last = max(local)
        out: dict[int, Optional[tuple]] = {}
        url = self.manifest.shard_url(shard)
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            raise DataError(f"shard '{storage.redact(url)}' does not exist") from None
        try:
            for i, sample in self._samples(shard, data, local, last):
                try:
                    img = decode_image(sample)
                    if img.shape != self.expected_shape:
                        raise ShardError(f"shape {img.shape} != {self.expected_shape}")
                    out[base + i] = (img, decode_label(sample), sample["__key__"])
                except Exception:  # noqa: BLE001 - a corrupt sample is skipped and counted
                    out[base + i] = None
        except Exception as e:  # noqa: BLE001 - a truncated tar: what is missing counts as corrupt
            log.warning("shard %s unreadable after some samples: %s", storage.redact(url), e)
        return out

    def _samples(self, shard: int, data: bytes, local: set, last: int):
        """(position in shard, sample) for the wanted positions: sliced by the shard's index when it has
        one (no tar header parsing), else through webdataset's tar reader."""
        idx_url = self.manifest.index_url(shard)
        if idx_url:
            index = self._index_cache.get(idx_url)
            if index is None:
                index = self._index_cache[idx_url] = json.loads(storage.read_bytes(idx_url))
            yield from samples_from_index(data, index, local)
            return
        for i, sample in enumerate(iter_tar_samples(data)):
            if i in local:
                yield i, sample
            if i >= last:
                break

    def _batches(self, plan: EpochPlan, seq: np.ndarray, start_batch: int) -> Iterator[dict]:
        B = self.layout.batch_size
        shard_of = np.searchsorted(plan.offsets, seq, side="right") - 1
        last_good = None
        i = start_batch * B
        pending: list = []
        pending_skipped = 0
        while i < len(seq):
            j = i
            while j < len(seq) and shard_of[j] == shard_of[i]:
                j += 1
            piece = seq[i:j]
            decoded = self._read_piece(plan, int(shard_of[i]), piece)
            items = [decoded.get(int(p)) for p in piece]
            good = [k for k, it in enumerate(items) if it is not None]
            for k, pos in enumerate(piece):
                item = items[k]
                self.seen += 1
                if item is None:  # stand in the nearest decodable sample so every batch stays full
                    self.skipped += 1
                    pending_skipped += 1
                    if good:
                        item = items[min(good, key=lambda g: (g - k) % len(items))]
                    elif last_good is not None:
                        item = last_good
                    else:
                        raise DataError(f"no decodable sample in shard '{self.manifest.shards[int(shard_of[i])].url}'")
                last_good = item
                pending.append((int(pos), item))
                if len(pending) == B:
                    yield self._collate(plan, pending, pending_skipped)
                    pending, pending_skipped = [], 0
            if self.seen >= MIN_SEEN_FOR_SKIP_CHECK and self.skipped > self.max_skip_fraction * self.seen:
                raise DataError(f"{self.skipped} of {self.seen} samples were corrupt, more than data.max_skip_fraction="
                                f"{self.max_skip_fraction} (last in shard '{self.manifest.shards[int(shard_of[i])].url}')")
            i = j
        if self.skipped and self.skipped > self.max_skip_fraction * max(self.seen, 1):
            raise DataError(f"{self.skipped} of {self.seen} samples were corrupt, more than data.max_skip_fraction="
                            f"{self.max_skip_fraction}")

    def _collate(self, plan: EpochPlan, items: list, skipped: int) -> dict:
        imgs = np.stack([it[1][0] for it in items])  # B H W C uint8
        if self.random_flip:
            flips = [k for k, (pos, _) in enumerate(items) if _flip_bit(plan.seed, plan.epoch, pos)]
            imgs[flips] = imgs[flips, :, ::-1]
        x = to_model_range(imgs)
        return {
            "image": x,
            "label": torch.tensor([it[1][1] for it in items], dtype=torch.long),
            "index": torch.tensor([pos for pos, _ in items], dtype=torch.long),
            "key": [it[1][2] for it in items],
            "skipped": skipped,
        }


def open_manifest(source: str) -> Manifest:
    """A manifest URL, or a brace pattern / single tar URL. Errors (before training) if anything is missing."""
    try:
        if source.endswith(".json"):
            return load_manifest(source)
        return manifest_from_pattern(source)
    except ShardError as e:
        raise DataError(str(e)) from None


class TrainStream:
    """Endless iterator of this rank's batches across epochs, with state_dict/load_state_dict (JSON-safe)."""

    def __init__(self, manifest: Manifest, *, rank: int, layout: Layout, seed: int = 0, random_flip: bool = False,
                 max_skip_fraction: float = 0.01, check_shards: bool = True):
        self.manifest, self.rank, self.layout, self.seed = manifest, rank, layout, seed
        self.random_flip, self.max_skip_fraction = random_flip, max_skip_fraction
        self.shape = (manifest.image_size[0], manifest.image_size[1], manifest.channels)
        self.epoch, self.batches_done, self.pool = 0, 0, None
        self.skipped_total = 0
        self.data_wait_seconds = 0.0
        if check_shards:
            missing = [manifest.shard_url(i) for i in range(len(manifest.shards)) if not storage.exists(manifest.shard_url(i))]
            if missing:
                raise DataError(f"{len(missing)} shard(s) listed in the manifest do not exist, first '{storage.redact(missing[0])}'")
        if self._plan().batches_per_rank == 0:
            raise DataError(f"{manifest.num_samples} samples cannot fill one batch of {layout.batch_size} on each of "
                            f"{layout.world_size} ranks")

    def _plan(self) -> EpochPlan:
        return EpochPlan([s.num_samples for s in self.manifest.shards], self.seed, self.epoch, self.layout, self.pool)

    @property
    def samples_per_epoch(self) -> int:
        plan = self._plan()
        return plan.batches_per_rank * self.layout.world_size * self.layout.batch_size

    def __iter__(self) -> Iterator[dict]:
        """One DataLoader for the whole run (workers persist across epochs); the cursor advances per batch."""
        plan = self._plan()
        if self.rank == 0:
            log.info("epoch %d: %d samples due, %d ranks x %d batches x %d used, %d unused this epoch (drop_last)",
                     self.epoch, len(plan.ordered), self.layout.world_size, plan.batches_per_rank,
                     self.layout.batch_size, plan.dropped)
        dataset = _LaneDataset(self.manifest, [s.num_samples for s in self.manifest.shards], self.seed, self.layout,
                               self.rank, self.epoch, self.pool, self.batches_done, self.random_flip,
                               self.max_skip_fraction, self.shape)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.layout.num_workers,
                            prefetch_factor=2 if self.layout.num_workers else None)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it)
            self.data_wait_seconds += time.perf_counter() - t0
            assert (batch["epoch"], batch["batch"]) == (self.epoch, self.batches_done), "stream out of order"
            self.batches_done += 1
            if self.batches_done == batch["epoch_batches"]:
                self.epoch, self.batches_done, self.pool = self.epoch + 1, 0, None
            self.skipped_total += batch["skipped"]
            yield batch

    def state_dict(self) -> dict:
        pool = None if self.pool is None else base64.b64encode(np.packbits(self.pool).tobytes()).decode()
        return {"epoch": self.epoch, "batches_done": self.batches_done, "pool": pool, "seed": self.seed,
                "world_size": self.layout.world_size, "batch_size": self.layout.batch_size,
                "num_workers": self.layout.num_workers, "num_samples": self.manifest.num_samples,
                "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.manifest.num_samples:
            raise DataError(f"data cursor is for {state['num_samples']} samples, the manifest has {self.manifest.num_samples}")
        pool = None
        if state["pool"] is not None:
            bits = np.frombuffer(base64.b64decode(state["pool"]), dtype=np.uint8)
            pool = np.unpackbits(bits)[: state["num_samples"]].astype(bool)
        old = Layout(state["world_size"], state["batch_size"], state["num_workers"])
        self.epoch, self.seed, self.skipped_total = state["epoch"], state["seed"], state.get("skipped_total", 0)
        if old.lanes == self.layout.lanes and old.world_size == self.layout.world_size and old.batch_size == self.layout.batch_size:
            self.pool, self.batches_done = pool, state["batches_done"]
            return
        # Layout changed: drop what the old layout consumed, re-plan the rest of the epoch.
        plan = EpochPlan([s.num_samples for s in self.manifest.shards], self.seed, self.epoch, old, pool)
        remaining = plan.pool.copy()
        remaining[plan.consumed(state["batches_done"])] = False
        self.pool, self.batches_done = remaining, 0
        if self.rank == 0:
            log.info("data layout changed (%s -> %s): %d samples of epoch %d still due", old, self.layout,
                     int(remaining.sum()), self.epoch)
