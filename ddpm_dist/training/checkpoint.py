"""CheckpointManager: built once with the run's named stateful components, it saves them all at a step and
restores the newest committed checkpoint by itself. The layout is artifacts/'s.

A component is anything with state_dict() / load_state_dict(state); the manager knows no backend:
- a state with tensors (model, optimizer, EMA) goes to torch.distributed.checkpoint: sharded writes,
  resharding loads;
- a state without tensors (counters, data cursor, LR schedule) goes to meta.json: JSON, never pickled;
- a component with a `native_format` (DeepSpeed's engine) writes its own files into its own sub-folder
  with save_native(dir) and reads them back with load_native(dir).

Commit (rank 0, after every rank finished writing): meta.json into the temp dir, rename the temp dir
to step_XXXXXXXXX, then write the COMMITTED marker last, with the size and digest of every file (artifacts.digests:
DCP's as they were written, on each rank). A directory without the marker is ignored; one whose files differ from
their digests is moved aside to corrupt-step_XXXXXXXXX at resume, which falls back to the previous one."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..artifacts import (
    CHECKPOINT_FORMAT,
    MARKER,
    META,
    PORTABLE_FORMATS,
    CheckpointError,
    best_checkpoint,
    committed_checkpoints,
    digests,
    load_dcp,
    read_meta,
    step_name,
)
from ..artifacts.digests import Verdict
from ..models import RUNTIME_FIELDS, UNetConfig
from ..parallel.collectives import barrier, get_world_size, side_group, sum_across_ranks
from ..redact import to_json
from .async_save import AsyncSaver

log = logging.getLogger(__name__)
SAVE_ERRORS = (Exception, CheckpointException)  # DCP's CheckpointException is a BaseException
QUARANTINE = "corrupt-"  # a corrupt checkpoint found at resume is renamed to corrupt-step_XXXXXXXXX, and kept


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _has_tensors(value) -> bool:
    if torch.is_tensor(value):
        return True
    if isinstance(value, dict):
        return any(_has_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensors(v) for v in value)
    return False


def _quiet_dcp(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one process: no process group, by design
        return fn(*args, **kwargs)


@dataclass
class _Pending:
    future: object
    writer: object
    tmp: str
    final: str
    meta: dict
    started: float


class CheckpointManager:
    def __init__(
        self,
        directory: str,
        components: dict,
        *,
        rank: int,
        identity: Optional[dict] = None,
        keep_last: int = 2,
        keep_every_images: int = 0,
        keep_best: bool = False,
        async_save: bool = False,
        pinned_staging: bool = False,
    ):
        """`identity` (backend, world size, model config, the resolved config) goes into every meta.json; a
        checkpoint whose model_config differs is refused on load. keep_best: pruning also spares the checkpoint
        with the lowest in-training Fréchet distance (its meta.json 'eval', given to save())."""
        self.directory, self.components, self.rank = directory, components, rank
        self.identity = identity or {}
        self.keep_last, self.keep_every_images, self.async_save = keep_last, keep_every_images, async_save
        self.keep_best = keep_best
        self.pending: Optional[_Pending] = None
        self._verdicts: dict[str, Verdict] = {}  # checkpoints verified (or written) by this manager
        self.last_duration = self.last_success_time = self.last_stall = 0.0
        self.last_images = 0  # images seen by the newest committed checkpoint
        self._group = side_group() if async_save else None  # the background write's collectives
        self._async = AsyncSaver(pinned_staging) if async_save else None  # one stager for the run (async_save.py)
        self._save_returned = 0.0
        if rank == 0:
            os.makedirs(directory, exist_ok=True)
            for name in os.listdir(directory):  # leftovers of a run that died mid-save
                if name.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        barrier()

    def latest(self) -> Optional[str]:
        """The newest committed checkpoint whose files match their digests (collective: every rank calls it). Each
        newer, corrupt one is moved aside to corrupt-step_XXXXXXXXX (kept as evidence, out of the way of pruning and
        of later resumes) with one line naming the file. Every one corrupt: a CheckpointError, and nothing moved."""
        found = committed_checkpoints(self.directory)
        corrupt = []
        for path in reversed(found):
            verdict = self._verify(path)
            if verdict.ok:
                break
            corrupt.append(verdict)
        else:
            if corrupt:
                raise CheckpointError(
                    f"every committed checkpoint under '{self.directory}' is corrupt ({len(corrupt)}; the newest: "
                    f"{corrupt[0].problem}): nothing loaded, nothing removed"
                )
            return None
        if corrupt:
            for bad in corrupt:
                if self.rank == 0:
                    log.warning(
                        "checkpoint %s is corrupt: %s; moved to %s (kept as evidence), falling back to %s",
                        bad.path,
                        bad.problem,
                        self._quarantine(bad.path),
                        os.path.basename(path),
                    )
                self._verdicts.pop(bad.path, None)
            barrier()
        return path

    def _verify(self, path: str) -> Verdict:
        """Every file of `path` against its marker's record, each rank checking a share (collective)."""
        if path in self._verdicts:
            return self._verdicts[path]
        try:
            files = digests.read_marker(path).get("files")
        except CheckpointError as e:
            verdict = Verdict(path, str(e))
        else:
            if files is None:
                verdict = Verdict(path, unverified=True)
                if self.rank == 0:
                    log.info("checkpoint %s has no digests (written before ddpm_dist recorded them): unverified", path)
            else:
                names, world = sorted(files), get_world_size()
                codes = np.zeros(len(names), dtype=np.int64)
                mine = names[self.rank :: world]
                codes[self.rank :: world] = [code for code, _ in digests.check_files(path, files, mine)]
                bad = np.flatnonzero(sum_across_ranks(codes))
                verdict = Verdict(path)
                if bad.size:
                    name = names[bad[0]]
                    code, what = digests.check_file(path, name, files[name])
                    verdict = Verdict(
                        path, what if code != digests.OK else f"'{os.path.join(path, name)}' did not verify"
                    )
        self._verdicts[path] = verdict
        return verdict

    def _quarantine(self, path: str) -> str:
        target, n = os.path.join(self.directory, QUARANTINE + os.path.basename(path)), 2
        while os.path.exists(target):
            target, n = os.path.join(self.directory, f"{QUARANTINE}{os.path.basename(path)}-{n}"), n + 1
        os.rename(path, target)
        _fsync_dir(self.directory)
        return target

    def _native(self) -> dict:
        return {n: c for n, c in self.components.items() if getattr(c, "native_format", None)}

    # -- save ----------------------------------------------------------------------------------------
    def save(self, step: int, images: int, *, force_sync: bool = False, evaluation: Optional[dict] = None) -> None:
        """Save every component at `step`. Async saves return after staging; poll()/wait() commit them.
        `evaluation` ({'frechet_distance', 'extractor', 'images'} of these very weights) goes into meta.json."""
        self.wait()
        t0 = time.perf_counter()
        final = os.path.join(self.directory, step_name(step))
        tmp = os.path.join(self.directory, ".tmp-" + step_name(step))
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        native = self._native()
        meta = {
            "checkpoint_format": CHECKPOINT_FORMAT,
            "step": step,
            "images": images,
            **self.identity,
            "formats": {n: c.native_format for n, c in native.items()},
            "state": {},
        }
        if evaluation:
            meta["eval"] = evaluation
        tensors = {}
        writer = digests.digesting_writer(tmp, self.rank, get_world_size(), tuple(native))
        try:
            for name, component in native.items():
                component.save_native(os.path.join(tmp, name))
            for name, component in self.components.items():
                if name in native:
                    continue
                state = component.state_dict()
                if _has_tensors(state):
                    tensors[name], meta["formats"][name] = state, "dcp"
                else:
                    meta["state"][name], meta["formats"][name] = state, "json"
            json.dumps(meta)  # a non-JSON value fails here, before anything is committed
            if self.async_save and not force_sync:
                self.pending = _Pending(self._async.start(tensors, writer, self._group), writer, tmp, final, meta, t0)
                self.last_stall = self._save_returned = time.perf_counter() - t0
                return
            _quiet_dcp(dcp.save, tensors, storage_writer=writer)
            barrier()
        except SAVE_ERRORS as e:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint at step {step} failed, previous one kept: {type(e).__name__}: {e}"
            ) from e
        if self.rank == 0:
            self._commit(tmp, final, meta, writer.files)
        barrier()
        self.last_stall = self.last_duration = time.perf_counter() - t0
        self.last_success_time, self.last_images = time.time(), images

    def _commit(self, tmp: str, final: str, meta: dict, files: dict) -> None:
        _write_file(os.path.join(tmp, META), to_json(meta, indent=1))
        files = {**files, META: digests.file_record(os.path.join(tmp, META))}
        if os.path.exists(final):  # an uncommitted leftover with the same step
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_file(
            os.path.join(final, MARKER), digests.marker_text({"step": meta["step"], "time": time.time()}, files)
        )
        _fsync_dir(self.directory)
        self._verdicts[final] = Verdict(final)
        log.info("checkpoint committed: %s", final)
        self._prune()

    def kept(self, found: list[str]) -> set[str]:
        """The last keep_last, per period of keep_every_images the first checkpoint that reached it (counted in
        images, so a batch size changed across a resume does not shift which ones stay), and with keep_best the
        one with the lowest in-training Fréchet distance."""
        keep = set(found[-self.keep_last :])
        if self.keep_best and (best := best_checkpoint(found)):
            keep.add(best)
        if self.keep_every_images:
            periods = set()
            for path in found:  # oldest first: the first to reach a period keeps it
                period = read_meta(path)["images"] // self.keep_every_images
                if period >= 1 and period not in periods:
                    periods.add(period)
                    keep.add(path)
        return keep

    def _prune(self) -> None:
        found = committed_checkpoints(self.directory)
        try:
            keep = self.kept(found)
        except (CheckpointError, OSError, ValueError) as e:  # an unreadable meta.json: remove nothing (evidence)
            log.warning("not pruning checkpoints this time: %s", e)
            return
        for path in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def wait_for_staging(self) -> None:
        """Block until an async save's staging copy is complete: before anything changes what it copies (the
        optimizer step, the EMA updates). The time blocked counts into the save's stall."""
        if self._async is not None and self._async.staging is not None:
            self.last_stall = self._save_returned + self._async.wait_for_staging(SAVE_ERRORS)

    def poll(self) -> bool:
        """Commit a finished async save (rank 0: its future completes only after every rank wrote).
        True when an async save has just finished (committed or failed)."""
        p = self.pending
        if p is None or not p.future.done():
            return False
        self.pending = None
        try:
            p.future.result()
        except SAVE_ERRORS as e:  # noqa: BLE001 - the previous checkpoint stays; training goes on
            log.error("async checkpoint %s failed, previous one kept: %s", p.final, e)
            if self.rank == 0:
                shutil.rmtree(p.tmp, ignore_errors=True)
            return True
        if self.rank == 0:
            self._commit(p.tmp, p.final, p.meta, p.writer.files)
        self.last_duration = time.perf_counter() - p.started
        self.last_success_time, self.last_images = time.time(), p.meta["images"]
        return True

    def wait(self) -> None:
        self.wait_for_staging()
        if self.pending is not None:
            self.pending.future.result()
            self.poll()

    # -- load ----------------------------------------------------------------------------------------
    def restore_latest(self) -> Optional[dict]:
        """Restore every component from the newest committed checkpoint that verifies (latest()); its meta (with its
        'path'), or None when there is none."""
        path = self.latest()
        if path is None:
            return None
        return self.load(path)

    def load(self, path: str) -> dict:
        """Restore every component from checkpoint `path` (collective), verified first: a corrupt one is an error."""
        verdict = self._verify(path)
        if not verdict.ok:
            raise CheckpointError(f"corrupt checkpoint '{path}': {verdict.problem}")
        meta = read_meta(path)
        self._check_compatible(meta, path)
        native = self._native()
        try:
            for name, component in native.items():
                component.load_native(os.path.join(path, name))
            portable = {n: c for n, c in self.components.items() if n not in native}
            tensors = {n: c.state_dict() for n, c in portable.items() if meta["formats"][n] == "dcp"}
            if tensors:
                _quiet_dcp(load_dcp, tensors, path, verify=False)  # verified; unpickles only DCP's metadata classes
            for name, component in portable.items():
                component.load_state_dict(tensors[name] if name in tensors else meta["state"][name])
        except CheckpointError:
            raise
        except SAVE_ERRORS as e:
            raise CheckpointError(f"checkpoint '{path}': {type(e).__name__}: {e}") from e
        barrier()
        return {**meta, "path": path}

    def _check_compatible(self, meta: dict, path: str) -> None:
        """A clear error for a checkpoint of another model shape, or one whose components are stored in
        formats this run's components cannot read."""
        # A field added after the checkpoint was written has its default there (what that network computed).
        defaults = dataclasses.asdict(UNetConfig())
        old = {**defaults, **meta.get("model_config", {})}
        new = {**defaults, **self.identity.get("model_config", {})}
        diff = [
            f"{k}: {old.get(k)} -> {new.get(k)}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in RUNTIME_FIELDS
        ]  # e.g. activation checkpointing: same weights
        if diff:
            raise CheckpointError(f"checkpoint '{path}' is for another model ({'; '.join(diff)})")
        for name, component in self.components.items():
            saved = meta["formats"].get(name)
            mine = getattr(component, "native_format", None)
            if saved is None or (saved if saved not in PORTABLE_FORMATS else None) != mine:
                raise CheckpointError(
                    f"checkpoint '{path}' holds '{name}' as {saved or 'nothing'} (backend '{meta.get('backend')}'); "
                    f"this run's '{name}' uses {mine or 'DCP/JSON'} (backend '{self.identity.get('backend')}'): "
                    f"use a new run_dir or the same backend family"
                )
