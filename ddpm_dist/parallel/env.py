"""Rank, world, local rank and device from torchrun or SLURM (or neither); process-group set-up; local
spawning. The only place that chooses the device and the backend: NCCL with one GPU per local rank
when CUDA is present, gloo on the CPU."""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        return device_for(self.local_rank)

    @property
    def backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,010],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list '{nodelist}'")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_env(environ: Optional[dict] = None) -> DistEnv:
    """torchrun's variables win; then SLURM's (srun with one task per GPU); else a single process."""
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(
            int(e["RANK"]),
            int(e["WORLD_SIZE"]),
            int(e.get("LOCAL_RANK", 0)),
            int(e.get("LOCAL_WORLD_SIZE", e["WORLD_SIZE"])),
            e.get("MASTER_ADDR", "127.0.0.1"),
            int(e.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in e and int(e.get("SLURM_NTASKS", "1")) > 1:
        job = int(e.get("SLURM_JOB_ID", "0"))
        ntasks = int(e["SLURM_NTASKS"])
        nnodes = int(e.get("SLURM_JOB_NUM_NODES", e.get("SLURM_NNODES", "1")))
        local_ws = int(e.get("SLURM_NTASKS_PER_NODE", str(ntasks // max(1, nnodes))).split("(")[0])
        addr = e.get("MASTER_ADDR") or first_host(e.get("SLURM_JOB_NODELIST", e.get("SLURM_NODELIST", "127.0.0.1")))
        port = int(e.get("MASTER_PORT") or 20000 + job % 20000)  # one port per job: jobs sharing a node do not collide
        return DistEnv(int(e["SLURM_PROCID"]), ntasks, int(e.get("SLURM_LOCALID", 0)), local_ws, addr, port)
    return DistEnv()


def init_distributed(env: Optional[DistEnv] = None, timeout_s: int = 600) -> DistEnv:
    """Join the process group (when there is more than one process) and bind this rank's device."""
    env = env or read_env()
    if env.distributed or launched_externally():
        from .faults import exit_with_parent

        exit_with_parent()  # before the rendezvous: a worker never outlives its launcher
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    else:
        from ..cpu_malloc import keep_freed_memory

        keep_freed_memory()
        if env.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            # CPU processes sharing a machine: oversubscribed OpenMP threads slow every rank several-fold.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    if env.distributed and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            env.backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=env.device if env.device.type == "cuda" else None,
        )
        from .faults import hosts_summary, share_hosts

        share_hosts(env.device)
        if env.rank == 0:
            log.info(
                "%d ranks on %s; rendezvous %s:%d", env.world_size, hosts_summary(), env.master_addr, env.master_port
            )
    return env


def shutdown() -> None:
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launched_externally() -> bool:
    """True under torchrun or a multi-task SLURM step (their environment decides the ranks)."""
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def local_rank_env(local_rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun would give one of `world_size` processes on this host (the rendezvous on 127.0.0.1)."""
    return dict(
        RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _spawn_entry(local_rank: int, fn, args, world_size: int, port: int) -> None:
    os.environ.update(local_rank_env(local_rank, world_size, port))
    fn(*args)


def spawn_local(fn, args: tuple, world_size: int) -> None:
    """Run fn(*args) in `world_size` local processes with torchrun-style variables (one per GPU when
    there are GPUs), unless already launched by torchrun/SLURM or world_size is 1: then run it here."""
    if launched_externally() or world_size <= 1:
        fn(*args)
        return
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(fn, args, world_size, free_port()), nprocs=world_size, join=True)
