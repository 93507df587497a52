"""Rank, world, local rank and device from torchrun or SLURM (or neither); process-group set-up;
seeding. The only place that chooses the device and the backend: NCCL with one GPU per local rank
when CUDA is present, gloo on the CPU."""
from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..rng import mix_seed  # noqa: F401 - re-exported for the trainer

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
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                       int(e.get("LOCAL_WORLD_SIZE", e["WORLD_SIZE"])), e.get("MASTER_ADDR", "127.0.0.1"),
                       int(e.get("MASTER_PORT", 29500)))
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
        dist.init_process_group(env.backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=env.device if env.device.type == "cuda" else None)
        from .faults import hosts_summary, share_hosts

        share_hosts(env.device)
        if env.rank == 0:
            log.info("%d ranks on %s; rendezvous %s:%d", env.world_size, hosts_summary(), env.master_addr,
                     env.master_port)
    return env


def shutdown() -> None:
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (model init, dropout): the loop re-seeds them per step from (seed, step, rank)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def seed_device_rng(device: torch.device, seed: int) -> None:
    """Seed only the default generator of `device` (torch.manual_seed touches every backend: ~1 ms)."""
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else 0].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place (nothing to do in one process); returns it."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def sum_across_ranks(array: np.ndarray) -> np.ndarray:
    """The elementwise int64 sum of every rank's `array` (same shape on each), returned on every rank: one
    all_reduce, through a CUDA tensor under NCCL, a CPU one under gloo; a copy of `array` in one process."""
    mine = np.array(array, dtype=np.int64, copy=True)
    if not is_distributed() or dist.get_world_size() == 1:
        return mine
    nccl = "nccl" in str(dist.get_backend()).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.from_numpy(mine).to(device)
    dist.all_reduce(t)
    return t.cpu().numpy()


def all_gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's `values` (the same length on each), in rank order."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    if not is_distributed():
        return [mine.tolist()]
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return [r.tolist() for r in rows]


def all_gather_rows(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's rows (row counts may differ; dtype and trailing shape may not), concatenated in rank order,
    on the CPU. Rows are padded to the longest rank's count for the collective and trimmed after."""
    if not is_distributed() or dist.get_world_size() == 1:
        return rows.cpu()
    counts = [c[0] for c in all_gather_ints([rows.shape[0]], device)]
    if max(counts) == 0:
        return rows.cpu()
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([o[:c] for o, c in zip(out, counts)]).cpu()


def all_reduce_max(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    if not is_distributed():
        return values
    t = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def side_group():
    """A second gloo group for background work (async checkpoint writes) that must not share the
    trainer's collectives; None in one process."""
    return dist.new_group(backend="gloo") if is_distributed() else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launched_externally() -> bool:
    """True under torchrun or a multi-task SLURM step (their environment decides the ranks)."""
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def _spawn_entry(local_rank: int, fn, args, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)


def spawn_local(fn, args: tuple, world_size: int) -> None:
    """Run fn(*args) in `world_size` local processes with torchrun-style variables (one per GPU when
    there are GPUs), unless already launched by torchrun/SLURM or world_size is 1: then run it here."""
    if launched_externally() or world_size <= 1:
        fn(*args)
        return
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(fn, args, world_size, free_port()), nprocs=world_size, join=True)
