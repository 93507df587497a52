"""CheckpointManager: torch.distributed.checkpoint (or DeepSpeed's own format behind the same rules),
written to a temporary directory and committed atomically; only committed checkpoints are loaded.

Commit (rank 0, after every rank finished writing): meta.json into the temp dir, rename the temp dir
to step_XXXXXXXXX, then write the COMMITTED marker last. A directory without the marker is ignored.
Non-tensor state (counters, data cursor, config) is JSON, never pickled."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..parallel.env import barrier

log = logging.getLogger(__name__)
MARKER = "COMMITTED"
META = "meta.json"
EMA_FILE = "ema.safetensors"  # DeepSpeed checkpoints: the gathered EMA (DCP ones keep it inside DCP)


class CheckpointError(RuntimeError):
    pass


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


def step_name(step: int) -> str:
    return f"step_{step:09d}"


def committed_checkpoints(directory: str) -> list[str]:
    """Committed checkpoint paths, oldest first; uncommitted ones are skipped (with a warning)."""
    if not os.path.isdir(directory):
        return []
    out = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not name.startswith("step_") or not os.path.isdir(path):
            continue
        if os.path.exists(os.path.join(path, MARKER)):
            out.append(path)
        else:
            log.warning("ignoring uncommitted checkpoint %s", path)
    return out


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


@dataclass
class _Pending:
    future: object
    tmp: str
    final: str
    meta: dict
    started: float


class CheckpointManager:
    def __init__(self, directory: str, *, rank: int, keep_last: int = 2, keep_every_step: int = 0,
                 async_save: bool = False):
        self.directory, self.rank, self.keep_last = directory, rank, keep_last
        self.keep_every_step, self.async_save = keep_every_step, async_save
        self.pending: Optional[_Pending] = None
        self.last_duration = 0.0
        self.last_success_time = 0.0
        self.last_stall = 0.0
        self._pg = None
        distributed = dist.is_available() and dist.is_initialized()
        if async_save and distributed:  # the background write's collectives must not share the trainer's group
            self._pg = dist.new_group(backend="gloo")
        if rank == 0:
            os.makedirs(directory, exist_ok=True)
            for name in os.listdir(directory):  # leftovers of a run that died mid-save
                if name.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        barrier()

    def latest(self) -> Optional[str]:
        found = committed_checkpoints(self.directory)
        return found[-1] if found else None

    # -- save ----------------------------------------------------------------------------------------
    def save(self, step: int, meta: dict, engine, ema, *, force_sync: bool = False) -> None:
        """Save everything at `step`. Async saves return after staging; call poll()/wait() to commit."""
        self.wait()
        t0 = time.perf_counter()
        final = os.path.join(self.directory, step_name(step))
        tmp = os.path.join(self.directory, ".tmp-" + step_name(step))
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        meta = dict(meta, step=step, format="deepspeed" if engine.name == "zero" else "dcp")
        try:
            if engine.name == "zero":
                engine.save_native(tmp)
                ema_full = ema.full_state()
                if self.rank == 0:
                    from safetensors.torch import save_file
                    save_file(ema_full, os.path.join(tmp, EMA_FILE))
                barrier()
            else:
                state = {**engine.checkpoint_state(), "ema": ema.state_dict()}
                if self.async_save and not force_sync:
                    future = dcp.async_save(state, checkpoint_id=tmp, process_group=self._pg)
                    self.pending = _Pending(future, tmp, final, meta, t0)
                    self.last_stall = time.perf_counter() - t0
                    return
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # single process: no process group, by design
                    dcp.save(state, checkpoint_id=tmp)
                barrier()
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint at step {step} failed, previous one kept: {type(e).__name__}: {e}") from e
        if self.rank == 0:
            self._commit(tmp, final, meta)
        barrier()
        self.last_stall = self.last_duration = time.perf_counter() - t0
        self.last_success_time = time.time()

    def _commit(self, tmp: str, final: str, meta: dict) -> None:
        _write_file(os.path.join(tmp, META), json.dumps(meta, indent=1))
        if os.path.exists(final):  # an uncommitted leftover with the same step
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_file(os.path.join(final, MARKER), json.dumps({"step": meta["step"], "time": time.time()}))
        _fsync_dir(self.directory)
        log.info("checkpoint committed: %s", final)
        self._prune()

    def _prune(self) -> None:
        found = committed_checkpoints(self.directory)
        keep = set(found[-self.keep_last:])
        for path in found:
            step = int(os.path.basename(path).split("_")[1])
            if path in keep or (self.keep_every_step and step % self.keep_every_step == 0):
                continue
            shutil.rmtree(path, ignore_errors=True)

    def poll(self) -> bool:
        """Commit a finished async save (rank 0: its future completes only after every rank wrote).
        True when an async save has just finished (committed or failed)."""
        p = self.pending
        if p is None or not p.future.done():
            return False
        self.pending = None
        try:
            p.future.result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - the previous checkpoint stays; training goes on
            log.error("async checkpoint %s failed, previous one kept: %s", p.final, e)
            if self.rank == 0:
                shutil.rmtree(p.tmp, ignore_errors=True)
            return True
        if self.rank == 0:
            self._commit(p.tmp, p.final, p.meta)
        self.last_duration = time.perf_counter() - p.started
        self.last_success_time = time.time()
        return True

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.future.result()
            self.poll()

    # -- load ----------------------------------------------------------------------------------------
    def load(self, path: str, engine, ema, expect: dict) -> dict:
        """Restore engine and EMA from a committed checkpoint; returns its meta (counters, cursor)."""
        meta = read_meta(path)
        check_compatible(meta, expect, path)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if meta["format"] == "deepspeed" and meta.get("world_size") != world:
            raise CheckpointError(f"checkpoint '{path}' is a DeepSpeed ZeRO checkpoint of {meta.get('world_size')} ranks; "
                                  f"it resumes only at that world size, not {world} (its EMA and the run's export are "
                                  f"portable; to reshard the optimizer, convert it with DeepSpeed's ds_to_universal)")
        if meta["format"] == "deepspeed":
            engine.load_native(path)
            from safetensors.torch import load_file
            ema.load_state_dict(engine.scatter_ema(load_file(os.path.join(path, EMA_FILE))))
        else:
            state = {**engine.checkpoint_state(), "ema": ema.state_dict()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, checkpoint_id=path)
            engine.load_checkpoint_state(state)
            ema.load_state_dict(state["ema"])
        barrier()
        return meta


def check_compatible(meta: dict, expect: dict, path: str) -> None:
    """A clear error when the checkpoint is for another model shape or checkpoint format."""
    fmt = "deepspeed" if expect.get("backend") == "zero" else "dcp"
    if meta.get("format") != fmt:
        raise CheckpointError(f"checkpoint '{path}' was written by backend '{meta.get('backend')}' "
                              f"({meta.get('format')} format); this run uses '{expect.get('backend')}' ({fmt}): "
                              f"use a new run_dir or the same backend family")
    old, new = meta.get("model_config", {}), expect.get("model_config", {})
    diff = [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint '{path}' is for another model ({'; '.join(diff)})")


def load_checkpoint_weights(run_or_ckpt: str, which: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """EMA ('ema') or raw ('model') weights of the newest committed checkpoint in a run dir (or of one
    checkpoint dir), in one process without a process group: DCP reshards whatever world size wrote them."""
    path = run_or_ckpt
    if not os.path.exists(os.path.join(path, MARKER)):
        found = committed_checkpoints(os.path.join(run_or_ckpt, "checkpoints"))
        if not found:
            raise FileNotFoundError(f"no committed checkpoint under '{run_or_ckpt}'")
        path = found[-1]
    meta = read_meta(path)
    if meta["format"] == "deepspeed":
        if which != "ema":
            raise ValueError("raw weights of a DeepSpeed checkpoint: use the run's export.safetensors")
        from safetensors.torch import load_file
        return load_file(os.path.join(path, EMA_FILE)), meta
    from ..models import build_model
    model = build_model(meta["model_config"])
    state = {which: {k: v.detach().clone().float() for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process"
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return state[which], meta
