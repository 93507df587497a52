"""What one DataLoader worker runs: its lane of each epoch's plan (plan.py), read in blocks, decoded and
batched in the worker, so the training process receives ready batches (stream.py builds the loader)."""

from __future__ import annotations

import gc
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..cpu_malloc import keep_freed_memory
from ..rng import mix_seed
from . import storage
from .errors import DataError
from .manifest import Manifest, ShardError
from .member_index import parse_index
from .plan import DueSet, EpochPlan, Layout
from .reader import read_blocks
from .samples import decode_for_training, decode_label

MIN_SEEN_FOR_SKIP_CHECK = 100


def _flip_bit(seed: int, epoch: int, pos: int) -> bool:
    return bool(mix_seed(seed, epoch, pos, 0xF11B) & 1)


class LaneDataset(IterableDataset):
    """What one DataLoader worker runs, epoch after epoch: its lane of each epoch's plan, as ready batches.

    The DataLoader hands out worker outputs round robin and never restarts (persistent across epochs), so
    delivery slot g (counted from the start of this loader) comes from worker g mod nw. Rank batch k of an
    epoch is lane k mod nw's batch k // nw; the epoch starting at slot s therefore maps worker w to lane
    (w - s) mod nw. The first epoch may start part-way (batches already consumed before a resume)."""

    def __init__(
        self,
        manifest: Manifest,
        counts,
        seed: int,
        layout: Layout,
        rank: int,
        epoch: int,
        due: Optional[DueSet],
        batches_done: int,
        random_flip: bool,
        max_skip_fraction: float,
        expected_shape: tuple[int, int, int],
        shard_bytes,
        resize: str = "none",
    ):
        self.shard_bytes = shard_bytes  # each shard's real size: index entries are checked against it
        self.manifest = manifest
        self.counts = counts
        self.seed = seed
        self.layout = layout
        self.rank = rank
        self.epoch, self.due, self.batches_done = epoch, due, batches_done
        self.random_flip, self.max_skip_fraction, self.expected_shape = random_flip, max_skip_fraction, expected_shape
        self.resize = resize
        self._index_cache: dict = {}
        self.seen = self.skipped = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        nw = self.layout.lanes
        worker = info.id if info is not None else 0
        if info is None and nw > 1:
            raise RuntimeError("a multi-lane plan needs DataLoader workers")
        epoch, due, done, slot = self.epoch, self.due, self.batches_done, 0
        while True:
            plan = EpochPlan(self.counts, self.seed, epoch, self.layout, due)
            lane = (worker - slot + done) % nw  # for done == 0 this is (w - s) mod nw
            start = plan.consumed_per_lane(done, lane)
            for m, batch in enumerate(self._batches(plan, lane, start)):
                batch.update(epoch=epoch, batch=(start + m) * nw + lane, epoch_batches=plan.batches_per_rank)
                yield batch
            slot += plan.batches_per_rank - done
            epoch, due, done = epoch + 1, None, 0

    def _index(self, shard: int, lo: int, hi: int) -> Optional[list]:
        """Entries lo..hi-1 of the shard's per-sample index, checked (member_index.parse_index), or None (a foreign
        tar: streamed). Only the current shard's is kept, with the span it covers."""
        idx_url = self.manifest.index_url(shard)
        if not idx_url:
            return None
        cached = self._index_cache.get(idx_url)
        if cached is None or not (cached[0] <= lo and hi <= cached[1]):
            index = parse_index(
                storage.read_bytes(idx_url), idx_url, self.counts[shard], self.shard_bytes[shard], span=(lo, hi)
            )
            cached = (lo, hi, index)
            self._index_cache = {idx_url: cached}
        return cached[2]

    def _visits(self, plan: EpochPlan, lane: int, begin: int) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(shard, its blocks in serving order) per shard the lane visits, from the lane's `begin`-th position on."""
        shard, blocks = -1, []
        for s, served in plan.blocks(self.rank, lane, begin):
            if s != shard and blocks:
                yield shard, blocks
                blocks = []
            shard = s
            blocks.append(served)
        if blocks:
            yield shard, blocks

    def _blocks(self, plan: EpochPlan, lane: int, begin: int) -> Iterator[tuple[int, np.ndarray, dict]]:
        """(shard, positions in serving order, {position: raw sample}) per block from `begin` on: each visit of a
        shard reads its blocks in one pass (one stream for a foreign tar), one block resident at a time."""
        for shard, visit in self._visits(plan, lane, begin):
            base, url = int(plan.offsets[shard]), self.manifest.shard_url(shard)
            local = [np.sort(served) - base for served in visit]
            try:
                index = self._index(shard, min(int(b[0]) for b in local), max(int(b[-1]) for b in local) + 1)
                for served, raw in zip(visit, read_blocks(url, index, local)):
                    block, raw = {base + p: sample for p, sample in raw.items()}, None
                    yield shard, served, block
                    block = None  # the consumer is done with it: its bytes go before the next block is read
            except FileNotFoundError:
                raise DataError(f"shard '{storage.redact(url)}' does not exist") from None
            except ShardError as e:  # a bad index or a compressed shard: fatal, one line
                raise DataError(str(e)) from None

    def _decode(self, sample: Optional[dict], epoch: int, pos: int) -> Optional[tuple]:
        """(image, label, key), or None for a sample that is missing or undecodable. The image is fitted to the
        training shape by data.resize (`none`: it must have that shape); a random crop is a function of (seed,
        epoch, position), so a resumed run crops the same way."""
        if sample is None:
            return None
        try:
            img = decode_for_training(sample, self.expected_shape, self.resize, mix_seed(self.seed, epoch, pos, 0xC209))
            return img, decode_label(sample, self.manifest.num_classes), sample["__key__"]
        except Exception:  # noqa: BLE001 - a corrupt sample is skipped and counted
            return None

    def _batches(self, plan: EpochPlan, lane: int, start_batch: int) -> Iterator[dict]:
        B = self.layout.batch_size
        last_good = None
        pending: list = []
        pending_skipped = 0
        for shard, piece, raw in self._blocks(plan, lane, start_batch * B):
            decoded: dict[int, Optional[tuple]] = {}  # decoded on demand: only encoded bytes stay resident

            def item_at(k: int, decoded=decoded, raw=raw, piece=piece) -> Optional[tuple]:  # this block's
                if k not in decoded:
                    decoded[k] = self._decode(raw.get(int(piece[k])), plan.epoch, int(piece[k]))
                return decoded[k]

            for k, pos in enumerate(piece):
                item = item_at(k)
                self.seen += 1
                if item is None:  # stand in the next decodable sample of the block so every batch stays full
                    self.skipped += 1
                    pending_skipped += 1
                    item = next((it for g in range(1, len(piece)) if (it := item_at((k + g) % len(piece)))), last_good)
                    if item is None:
                        raise DataError(
                            f"no decodable sample in shard '{storage.redact(self.manifest.shard_url(shard))}'"
                        )
                decoded.pop(k, None)
                last_good = item
                pending.append((int(pos), item))
                if len(pending) == B:
                    yield self._collate(plan, pending, pending_skipped)
                    pending, pending_skipped = [], 0
            raw = decoded = None  # the block's bytes (views) go before the next block is fetched
            if self.seen >= MIN_SEEN_FOR_SKIP_CHECK and self.skipped > self.max_skip_fraction * self.seen:
                raise DataError(
                    f"{self.skipped} of {self.seen} samples were corrupt, more than data.max_skip_fraction="
                    f"{self.max_skip_fraction} (last in shard '{storage.redact(self.manifest.shard_url(shard))}')"
                )
        if self.skipped and self.skipped > self.max_skip_fraction * max(self.seen, 1):
            raise DataError(
                f"{self.skipped} of {self.seen} samples were corrupt, more than data.max_skip_fraction="
                f"{self.max_skip_fraction}"
            )

    def _collate(self, plan: EpochPlan, items: list, skipped: int) -> dict:
        imgs = np.stack([it[1][0] for it in items])  # B H W C uint8
        if self.random_flip:
            flips = [k for k, (pos, _) in enumerate(items) if _flip_bit(plan.seed, plan.epoch, pos)]
            imgs[flips] = imgs[flips, :, ::-1]
        # Labels and positions travel as lists (pickled inline): each tensor from a worker costs a shared-memory
        # file and a descriptor hand-over, 28% of the throughput measured at 64x64 (TrainStream makes them tensors).
        return {
            "image": torch.from_numpy(imgs).permute(0, 3, 1, 2),  # uint8 NCHW: the step converts (images.model_range)
            "label": [it[1][1] for it in items],
            "index": [pos for pos, _ in items],
            "key": [it[1][2] for it in items],
            "skipped": skipped,
        }


def as_is(batch: dict) -> dict:
    """The DataLoader's collate for ready batches: its default walks every list element (8 us per image)."""
    return batch


def init_worker(_: int) -> None:
    keep_freed_memory()  # block buffers reused from the heap, not mapped and faulted in anew per block
    # What the worker inherited (torch, the plan) is never garbage: full collections that scanned it all took
    # 15-25% of a worker's time (more with a large shard's index alive) and touched its copy-on-write pages.
    gc.freeze()
