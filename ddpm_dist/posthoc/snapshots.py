"""Snapshots of the power-function EMA profiles: RUN/ema_snapshots/<images>-<std>/, one DCP checkpoint per profile
(sharded writes under FSDP2, resharding loads), committed like checkpoints: every rank writes into .tmp-<name>, then
rank 0 adds snapshot.json, renames the directory and writes the COMMITTED marker last, with every file's size and
digest (artifacts.digests: a snapshot is verified by load_dcp before it is read). Rank 0 keeps index.json (images
seen, std, gamma, path of every committed snapshot) rebuilt from the directories, which are the truth.

Snapshots are kept: disk cost = profiles x fp32 model size per snapshot. A resumed run first removes the snapshots
newer than the state it resumed (written after that checkpoint by the run that died): replaying the steps writes
them again, so none is lost or duplicated."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass

from ..artifacts import MARKER, CheckpointError
from ..artifacts.digests import digesting_writer, file_record, marker_text
from ..parallel.collectives import barrier, get_world_size
from .phema import exp_to_std

log = logging.getLogger(__name__)
SNAPSHOT_DIR = "ema_snapshots"
SNAPSHOT_META = "snapshot.json"
INDEX = "index.json"
INDEX_FORMAT = "ddpm_dist.ema_snapshots/1"


@dataclass(frozen=True)
class Snapshot:
    path: str
    images: int
    std: float
    gamma: float


def snapshot_name(images: int, std: float) -> str:
    return f"{images:012d}-{std:.4f}"


def committed_snapshots(directory: str) -> list[Snapshot]:
    """Committed snapshots under `directory` (RUN/ema_snapshots), by images then std."""
    found = []
    if not os.path.isdir(directory):
        return found
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(".") or not os.path.exists(os.path.join(path, MARKER)):
            continue
        meta = read_snapshot_meta(path)
        found.append(Snapshot(path, int(meta["images"]), float(meta["std"]), float(meta["gamma"])))
    return sorted(found, key=lambda s: (s.images, s.std))


def read_snapshot_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, SNAPSHOT_META)) as f:
            meta = json.load(f)
        if meta.get("format") != INDEX_FORMAT or not abs(exp_to_std(meta["gamma"]) - meta["std"]) < 1e-9:
            raise ValueError("not a snapshot of this format")
        int(meta["images"])
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"EMA snapshot '{path}': unreadable {SNAPSHOT_META} ({type(e).__name__}: {e})") from None


def _write_durably(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class SnapshotWriter:
    def __init__(self, run_dir: str, rank: int, model_config: dict):
        self.directory = os.path.join(run_dir, SNAPSHOT_DIR)
        self.rank, self.model_config = rank, model_config
        if rank == 0:
            os.makedirs(self.directory, exist_ok=True)
            for name in os.listdir(self.directory):  # leftovers of a run that died mid-write
                if name.startswith(".tmp-") or name.startswith(".old-"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        barrier()
        found = committed_snapshots(self.directory)
        self.last_images = found[-1].images if found else -1

    def discard_after(self, images: int) -> None:
        """Remove the snapshots newer than `images` (the resumed state): the replayed steps write them again."""
        newer = [s for s in committed_snapshots(self.directory) if s.images > images]
        if self.rank == 0:
            for s in newer:
                shutil.rmtree(s.path)
            if newer:
                log.info(
                    "removed %d EMA snapshot(s) newer than the resumed state (%d images): the replay rewrites them",
                    len(newer),
                    images,
                )
            self._write_index()
        barrier()
        found = committed_snapshots(self.directory)
        self.last_images = found[-1].images if found else -1

    def write(self, images: int, power) -> None:
        """One snapshot per profile of `power` (a PowerEMA) at `images` seen (collective: every rank calls it)."""
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        for std, gamma, profile in power.items():
            name = snapshot_name(images, std)
            tmp, final = (os.path.join(self.directory, p + name) for p in (".tmp-", ""))
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            barrier()
            writer = digesting_writer(tmp, self.rank, get_world_size())
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # one process: no process group, by design
                    dcp.save({"ema": profile.state_dict()}, storage_writer=writer)
            except Exception as e:  # noqa: BLE001 - a one-line error; earlier snapshots stay committed
                if self.rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointError(f"EMA snapshot {final} failed: {type(e).__name__}: {e}") from e
            barrier()
            if self.rank == 0:
                self._commit(
                    tmp,
                    final,
                    {
                        "format": INDEX_FORMAT,
                        "images": images,
                        "std": std,
                        "gamma": gamma,
                        "model_config": self.model_config,
                    },
                    writer.files,
                )
        if self.rank == 0:
            self._write_index()
            log.info(
                "EMA snapshots at %d images: %d profile(s) in %.2fs", images, len(power.stds), time.perf_counter() - t0
            )
        barrier()
        self.last_images = images

    def _commit(self, tmp: str, final: str, meta: dict, files: dict) -> None:
        _write_durably(os.path.join(tmp, SNAPSHOT_META), json.dumps(meta, indent=1))
        files = {**files, SNAPSHOT_META: file_record(os.path.join(tmp, SNAPSHOT_META))}
        old = None
        if os.path.exists(final):  # the same images again (a replay after a crash): the new one replaces it
            old = os.path.join(self.directory, ".old-" + os.path.basename(final))
            os.rename(final, old)
        os.rename(tmp, final)
        _write_durably(os.path.join(final, MARKER), marker_text({"images": meta["images"], "time": time.time()}, files))
        if old:
            shutil.rmtree(old, ignore_errors=True)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_index(self) -> None:
        rows = [
            {"images": s.images, "std": s.std, "gamma": s.gamma, "path": os.path.basename(s.path)}
            for s in committed_snapshots(self.directory)
        ]
        tmp = os.path.join(self.directory, INDEX + ".tmp")
        _write_durably(
            tmp, json.dumps({"format": INDEX_FORMAT, "model_config": self.model_config, "snapshots": rows}, indent=1)
        )
        os.replace(tmp, os.path.join(self.directory, INDEX))
