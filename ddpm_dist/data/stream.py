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
import logging
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import storage
from .errors import DataError  # noqa: F401 - re-exported; defined there so startup.py can raise it too
from .lane import LaneDataset, as_is, init_worker
from .manifest import MIN_SAMPLE_BYTES, Manifest, ShardError, load_manifest
from .plan import DueSet, EpochPlan, Layout, Order
from .samples import RESIZE_MODES
from .shard_sets import manifest_from_pattern
from .startup import check_shards

log = logging.getLogger(__name__)


def block_size(manifest: Manifest, buffer_bytes: int) -> int:
    """Positions per resident block so a worker's shard bytes stay within `buffer_bytes`: a block's samples are
    views of its requests' buffers, and the holes read through are no larger than the samples after them, so at
    most twice the block's sample bytes are resident (once when all its samples are due). Sized by the mean bytes
    per sample of the manifest (a block of many samples averages out). 0 when a whole shard fits."""
    per_sample = max(MIN_SAMPLE_BYTES, -(-int(manifest.sizes.sum()) // max(manifest.num_samples, 1)))
    block = max(1, buffer_bytes // (2 * per_sample))
    return 0 if block >= int(manifest.counts.max(initial=0)) else block


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

    def __init__(
        self,
        manifest: Manifest,
        *,
        rank: int,
        layout: Layout,
        seed: int = 0,
        random_flip: bool = False,
        max_skip_fraction: float = 0.01,
        buffer_bytes: int = 256 << 20,
        share: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        image_size: Optional[tuple[int, int]] = None,
        resize: str = "none",
    ):
        """`image_size` (H, W) with `resize` (samples.RESIZE_MODES) fits images of any size to the training shape in
        the workers; by default every image must have the manifest's size. `share`: a sum of int64 arrays across the
        job's ranks (parallel.collectives.sum_across_ranks), so each rank checks only its slice of the shards at
        start-up; without it this process checks every shard itself."""
        layout = dataclasses.replace(layout, block=block_size(manifest, buffer_bytes))
        self.manifest = manifest
        self.rank = rank
        self.layout = layout
        self.seed = seed
        self.random_flip, self.max_skip_fraction = random_flip, max_skip_fraction
        height, width = image_size or manifest.image_size
        self.shape, self.resize = (int(height), int(width), manifest.channels), resize
        _check_resize(manifest, self.shape, resize)
        self.counts = manifest.counts
        self.epoch, self.batches_done = 0, 0
        self.pool: Optional[DueSet] = None  # what this epoch still owes, when not every sample (after a layout change)
        self.earlier: list[
            list[int]
        ] = []  # [world, batch, workers, block, batches done] of this epoch's earlier layouts
        self.legacy_pool: Optional[str] = None  # a bit-mask cursor of before plan.py that started this epoch
        self.skipped_total = 0
        self.data_wait_seconds = 0.0
        # every shard exists and can hold its claimed samples: checked once per job, a slice per rank (startup.py)
        where = (rank, layout.world_size) if share is not None else (0, 1)
        self.shard_bytes = check_shards(manifest, manifest.counts, *where, share=share)
        if self._plan().batches_per_rank == 0:
            raise DataError(
                f"{manifest.num_samples} samples cannot fill one batch of {layout.batch_size} on each of "
                f"{layout.world_size} ranks"
            )

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
            log.info(
                "epoch %d: %d samples due, %d ranks x %d batches x %d used, %d unused this epoch (drop_last)",
                self.epoch,
                plan.due.total,
                self.layout.world_size,
                plan.batches_per_rank,
                self.layout.batch_size,
                plan.dropped,
            )
        dataset = LaneDataset(
            self.manifest,
            self.counts,
            self.seed,
            self.layout,
            self.rank,
            self.epoch,
            self.pool,
            self.batches_done,
            self.random_flip,
            self.max_skip_fraction,
            self.shape,
            self.shard_bytes,
            self.resize,
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.layout.num_workers,
            collate_fn=as_is,
            worker_init_fn=init_worker,
            prefetch_factor=2 if self.layout.num_workers else None,
        )
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
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "seed": self.seed,
            "world_size": self.layout.world_size,
            "batch_size": self.layout.batch_size,
            "num_workers": self.layout.num_workers,
            "block": self.layout.block,
            "earlier": [list(e) for e in self.earlier],
            "pool": self.legacy_pool,
            "num_samples": self.manifest.num_samples,
            "skipped_total": self.skipped_total,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.manifest.num_samples:
            raise DataError(
                f"data cursor is for {state['num_samples']} samples, the manifest has {self.manifest.num_samples}"
            )
        earlier = _checked_layouts(state.get("earlier", []))
        old = _checked_layouts(
            [
                [
                    state["world_size"],
                    state["batch_size"],
                    state["num_workers"],
                    state.get("block", 0),
                    state["batches_done"],
                ]
            ]
        )[0]
        self.epoch, self.seed, self.skipped_total = state["epoch"], state["seed"], state.get("skipped_total", 0)
        self.legacy_pool = state.get("pool")
        if Layout(*old[:4]).lanes_equal(self.layout):
            self.earlier, self.batches_done = earlier, old[4]
        else:  # layout changed: the rest of the epoch is planned for the new one over what is still due
            self.earlier, self.batches_done = earlier + [old], 0
        self.pool = self._due_set()
        if self.earlier and self.rank == 0 and not Layout(*old[:4]).lanes_equal(self.layout):
            log.info(
                "data layout changed (%s -> %s): %d samples of epoch %d still due",
                Layout(*old[:4]),
                self.layout,
                self.pool.total,
                self.epoch,
            )

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
        found = (
            f"{len(sizes)} image sizes"
            if len(sizes) > 1
            else f"images of {manifest.image_size[0]}x{manifest.image_size[1]}"
        )
        raise DataError(
            f"the manifest has {found} and data.resize is none: set data.image_size and data.resize "
            f"({' | '.join(RESIZE_MODES[1:])}) to fit them to {shape[0]}x{shape[1]}"
        )


def _checked_layouts(entries) -> list[list[int]]:
    """[world, batch, workers, block, batches done] lists from a cursor, each field an int in range."""
    if not isinstance(entries, list):
        raise DataError(f"data cursor: expected a list of layouts, got {type(entries).__name__}")
    out = []
    for e in entries:
        if not (
            isinstance(e, list)
            and len(e) == 5
            and all(isinstance(v, int) and not isinstance(v, bool) for v in e)
            and e[0] >= 1
            and e[1] >= 1
            and min(e[2:]) >= 0
        ):
            raise DataError(
                f"data cursor: a layout must be [world >= 1, batch >= 1, workers, block, batches], got {e!r:.80}"
            )
        out.append(list(e))
    return out
