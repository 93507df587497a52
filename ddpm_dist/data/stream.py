"""The training stream: manifest shards -> (rank, DataLoader worker) split -> shuffled, decoded batches,
with a cursor that resumes exactly.

The plan of an epoch is index arithmetic over the shards' cumulative counts (plan.py): O(shards) per process, each
worker's positions made one block at a time. The cursor is (epoch, layout, batches consumed) plus the layouts that
ran earlier in the epoch and how far each got: the due set is made again from them (plan.DueSet), so the cursor's
size grows with layout changes, never with samples. Same layout: workers skip what was consumed. New world size /
workers / batch / block: the rest of the epoch is planned for the new layout over what is still due: nothing
repeats, and at most new_world*B - 1 positions (the epoch's drop_last tail) go unseen in that epoch.
"""
from __future__ import annotations

import base64
import dataclasses
import gc
import logging
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..cpu_malloc import keep_freed_memory
from ..rng import mix_seed
from . import storage
from .manifest import MIN_SAMPLE_BYTES, Manifest, ShardError, load_manifest, parse_index
from .plan import DueSet, EpochPlan, Layout, Order
from .reader import read_blocks
from .samples import RESIZE_MODES, decode_for_training, decode_label
from .startup import check_shards
from .shard_sets import manifest_from_pattern

log = logging.getLogger(__name__)
MIN_SEEN_FOR_SKIP_CHECK = 100


from .errors import DataError  # noqa: E402,F401 - defined there so startup.py can raise it too


def block_size(manifest: Manifest, buffer_bytes: int) -> int:
    """Positions per resident block so a worker's shard bytes stay within `buffer_bytes`: a block's samples are
    views of its requests' buffers, and the holes read through are no larger than the samples after them, so at
    most twice the block's sample bytes are resident (once when all its samples are due). Sized by the mean bytes
    per sample of the manifest (a block of many samples averages out). 0 when a whole shard fits."""
    per_sample = max(MIN_SAMPLE_BYTES, -(-int(manifest.sizes.sum()) // max(manifest.num_samples, 1)))
    block = max(1, buffer_bytes // (2 * per_sample))
    return 0 if block >= int(manifest.counts.max(initial=0)) else block


def _flip_bit(seed: int, epoch: int, pos: int) -> bool:
    return bool(mix_seed(seed, epoch, pos, 0xF11B) & 1)


class _LaneDataset(IterableDataset):
    """What one DataLoader worker runs, epoch after epoch: its lane of each epoch's plan, as ready batches.

    The DataLoader hands out worker outputs round robin and never restarts (persistent across epochs), so
    delivery slot g (counted from the start of this loader) comes from worker g mod nw. Rank batch k of an
    epoch is lane k mod nw's batch k // nw; the epoch starting at slot s therefore maps worker w to lane
    (w - s) mod nw. The first epoch may start part-way (batches already consumed before a resume)."""

    def __init__(self, manifest: Manifest, counts, seed: int, layout: Layout, rank: int, epoch: int,
                 due: Optional[DueSet], batches_done: int, random_flip: bool, max_skip_fraction: float,
                 expected_shape: tuple[int, int, int], shard_bytes, resize: str = "none"):
        self.shard_bytes = shard_bytes  # each shard's real size: index entries are checked against it
        self.manifest, self.counts, self.seed, self.layout, self.rank = manifest, counts, seed, layout, rank
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
        """Entries lo..hi-1 of the shard's per-sample index, checked (manifest.parse_index), or None (a foreign
        tar: streamed). Only the current shard's is kept, with the span it covers."""
        idx_url = self.manifest.index_url(shard)
        if not idx_url:
            return None
        cached = self._index_cache.get(idx_url)
        if cached is None or not (cached[0] <= lo and hi <= cached[1]):
            index = parse_index(storage.read_bytes(idx_url), idx_url, self.counts[shard], self.shard_bytes[shard],
                                span=(lo, hi))
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

            def item_at(k: int) -> Optional[tuple]:
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
                        raise DataError(f"no decodable sample in shard '{storage.redact(self.manifest.shard_url(shard))}'")
                decoded.pop(k, None)
                last_good = item
                pending.append((int(pos), item))
                if len(pending) == B:
                    yield self._collate(plan, pending, pending_skipped)
                    pending, pending_skipped = [], 0
            raw = decoded = None  # the block's bytes (views) go before the next block is fetched
            if self.seen >= MIN_SEEN_FOR_SKIP_CHECK and self.skipped > self.max_skip_fraction * self.seen:
                raise DataError(f"{self.skipped} of {self.seen} samples were corrupt, more than data.max_skip_fraction="
                                f"{self.max_skip_fraction} (last in shard '{storage.redact(self.manifest.shard_url(shard))}')")
        if self.skipped and self.skipped > self.max_skip_fraction * max(self.seen, 1):
            raise DataError(f"{self.skipped} of {self.seen} samples were corrupt, more than data.max_skip_fraction="
                            f"{self.max_skip_fraction}")

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


def _as_is(batch: dict) -> dict:
    """The DataLoader's collate for ready batches: its default walks every list element (8 us per image)."""
    return batch


def _init_worker(_: int) -> None:
    keep_freed_memory()  # block buffers reused from the heap, not mapped and faulted in anew per block
    # What the worker inherited (torch, the plan) is never garbage: full collections that scanned it all took
    # 15-25% of a worker's time (more with a large shard's index alive) and touched its copy-on-write pages.
    gc.freeze()


def open_manifest(source: str) -> Manifest:
    """A manifest URL, or a brace pattern / single tar URL. Errors (before training) if anything is missing."""
    try:
        if source.split("?", 1)[0].endswith(".json"):  # a presigned manifest URL ends in its query
            return load_manifest(source)
        return manifest_from_pattern(source)
    except ShardError as e:
        raise DataError(str(e)) from None


class TrainStream:
    """Endless iterator of this rank's batches across epochs, with state_dict/load_state_dict (JSON-safe)."""

    def __init__(self, manifest: Manifest, *, rank: int, layout: Layout, seed: int = 0, random_flip: bool = False,
                 max_skip_fraction: float = 0.01, buffer_bytes: int = 256 << 20,
                 share: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                 image_size: Optional[tuple[int, int]] = None, resize: str = "none"):
        """`image_size` (H, W) with `resize` (samples.RESIZE_MODES) fits images of any size to the training shape in
        the workers; by default every image must have the manifest's size. `share`: a sum of int64 arrays across the
        job's ranks (parallel.collectives.sum_across_ranks), so each rank checks only its slice of the shards at
        start-up; without it this process checks every shard itself."""
        layout = dataclasses.replace(layout, block=block_size(manifest, buffer_bytes))
        self.manifest, self.rank, self.layout, self.seed = manifest, rank, layout, seed
        self.random_flip, self.max_skip_fraction = random_flip, max_skip_fraction
        height, width = image_size or manifest.image_size
        self.shape, self.resize = (int(height), int(width), manifest.channels), resize
        _check_resize(manifest, self.shape, resize)
        self.counts = manifest.counts
        self.epoch, self.batches_done = 0, 0
        self.pool: Optional[DueSet] = None  # what this epoch still owes, when not every sample (after a layout change)
        self.earlier: list[list[int]] = []  # [world, batch, workers, block, batches done] of this epoch's earlier layouts
        self.legacy_pool: Optional[str] = None  # a bit-mask cursor of before plan.py that started this epoch
        self.skipped_total = 0
        self.data_wait_seconds = 0.0
        # every shard exists and can hold its claimed samples: checked once per job, a slice per rank (startup.py)
        where = (rank, layout.world_size) if share is not None else (0, 1)
        self.shard_bytes = check_shards(manifest, manifest.counts, *where, share=share)
        if self._plan().batches_per_rank == 0:
            raise DataError(f"{manifest.num_samples} samples cannot fill one batch of {layout.batch_size} on each of "
                            f"{layout.world_size} ranks")

    def _plan(self) -> EpochPlan:
        return EpochPlan(self.counts, self.seed, self.epoch, self.layout, self.pool)

    @property
    def samples_per_epoch(self) -> int:
        plan = self._plan()
        return plan.batches_per_rank * self.layout.world_size * self.layout.batch_size

    def __iter__(self) -> Iterator[dict]:
        """One DataLoader for the whole run (workers persist across epochs); the cursor advances per batch."""
        plan = self._plan()
        if self.rank == 0:
            log.info("epoch %d: %d samples due, %d ranks x %d batches x %d used, %d unused this epoch (drop_last)",
                     self.epoch, plan.due.total, self.layout.world_size, plan.batches_per_rank,
                     self.layout.batch_size, plan.dropped)
        dataset = _LaneDataset(self.manifest, self.counts, self.seed, self.layout,
                               self.rank, self.epoch, self.pool, self.batches_done, self.random_flip,
                               self.max_skip_fraction, self.shape, self.shard_bytes, self.resize)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.layout.num_workers, collate_fn=_as_is,
                            worker_init_fn=_init_worker, prefetch_factor=2 if self.layout.num_workers else None)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except (DataError, storage.StorageError) as e:  # from a worker: its own one-line message, not the wrapper
                lines = str(e).strip().splitlines()
                if len(lines) > 1 and lines[0].startswith("Caught "):
                    raise type(e)(lines[-1].split(": ", 1)[-1]) from None
                raise
            batch["label"] = torch.tensor(batch["label"], dtype=torch.long)
            batch["index"] = torch.tensor(batch["index"], dtype=torch.long)
            self.data_wait_seconds += time.perf_counter() - t0
            assert (batch["epoch"], batch["batch"]) == (self.epoch, self.batches_done), "stream out of order"
            self.batches_done += 1
            if self.batches_done == batch["epoch_batches"]:
                self.epoch, self.batches_done, self.pool = self.epoch + 1, 0, None
                self.earlier, self.legacy_pool = [], None
            self.skipped_total += batch["skipped"]
            yield batch

    def state_dict(self) -> dict:
        """JSON of O(layout changes this epoch): the due set is made again from the earlier layouts on load."""
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed,
                "world_size": self.layout.world_size, "batch_size": self.layout.batch_size,
                "num_workers": self.layout.num_workers, "block": self.layout.block,
                "earlier": [list(e) for e in self.earlier], "pool": self.legacy_pool,
                "num_samples": self.manifest.num_samples, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.manifest.num_samples:
            raise DataError(f"data cursor is for {state['num_samples']} samples, the manifest has {self.manifest.num_samples}")
        earlier = _checked_layouts(state.get("earlier", []))
        old = _checked_layouts([[state["world_size"], state["batch_size"], state["num_workers"], state.get("block", 0),
                                 state["batches_done"]]])[0]
        self.epoch, self.seed, self.skipped_total = state["epoch"], state["seed"], state.get("skipped_total", 0)
        self.legacy_pool = state.get("pool")
        if Layout(*old[:4]).lanes_equal(self.layout):
            self.earlier, self.batches_done = earlier, old[4]
        else:  # layout changed: the rest of the epoch is planned for the new one over what is still due
            self.earlier, self.batches_done = earlier + [old], 0
        self.pool = self._due_set()
        if self.earlier and self.rank == 0 and not Layout(*old[:4]).lanes_equal(self.layout):
            log.info("data layout changed (%s -> %s): %d samples of epoch %d still due", Layout(*old[:4]), self.layout,
                     self.pool.total, self.epoch)

    def _due_set(self) -> Optional[DueSet]:
        """This epoch's due set from the cursor: everything (or an old cursor's bit mask), less what each earlier
        layout consumed, in turn. None when nothing was consumed by an earlier layout."""
        if not self.earlier and self.legacy_pool is None:
            return None
        order = Order(self.counts, self.seed, self.epoch)
        if self.legacy_pool is None:
            due = DueSet.everything(order)
        else:
            bits = np.frombuffer(base64.b64decode(self.legacy_pool), dtype=np.uint8)
            due = DueSet.from_mask(order, np.unpackbits(bits)[: self.manifest.num_samples].astype(bool))
        for *layout, done in self.earlier:
            due = EpochPlan(self.counts, self.seed, self.epoch, Layout(*layout), due).remaining(done)
        return due


def _check_resize(manifest: Manifest, shape: tuple, resize: str) -> None:
    if resize not in RESIZE_MODES:
        raise DataError(f"data.resize '{resize}' is not one of {', '.join(RESIZE_MODES)}")
    if resize != "none":
        return
    sizes = manifest.extra.get("image_shapes") or {}
    if len(sizes) > 1 or list(shape[:2]) != list(manifest.image_size):
        found = f"{len(sizes)} image sizes" if len(sizes) > 1 else f"images of {manifest.image_size[0]}x{manifest.image_size[1]}"
        raise DataError(f"the manifest has {found} and data.resize is none: set data.image_size and data.resize "
                        f"({' | '.join(RESIZE_MODES[1:])}) to fit them to {shape[0]}x{shape[1]}")


def _checked_layouts(entries) -> list[list[int]]:
    """[world, batch, workers, block, batches done] lists from a cursor, each field an int in range."""
    if not isinstance(entries, list):
        raise DataError(f"data cursor: expected a list of layouts, got {type(entries).__name__}")
    out = []
    for e in entries:
        if not (isinstance(e, list) and len(e) == 5 and all(isinstance(v, int) and not isinstance(v, bool) for v in e)
                and e[0] >= 1 and e[1] >= 1 and min(e[2:]) >= 0):
            raise DataError(f"data cursor: a layout must be [world >= 1, batch >= 1, workers, block, batches], got {e!r:.80}")
        out.append(list(e))
    return out
