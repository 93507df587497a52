"""The collectives the rest of the code uses, each a no-op (or a copy) in one process: sums, gathers, maxima,
barriers, and a side group for background work. Device-agnostic: the caller passes the device its backend needs."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


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
