"""When a host goes away. Workers exit with their launcher (a parent-death signal set before the rendezvous,
so none is left holding a GPU inside a blocking store connect), and a collective that fails because other
ranks vanished becomes one line naming them: which ranks on which host, from a table every rank shares at
start. The process-group timeout (parallel.dist_timeout_s) bounds how long a rank waits for a silent peer; the
heartbeat (heartbeat.py, parallel.heartbeat_timeout_s) notices a silent peer sooner."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import signal
import socket
from typing import Optional

import torch
import torch.distributed as dist

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
# What gloo, NCCL and the TCP store say when the other side is gone.
PEER_GONE = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "No route to host",
    "Connection refused",
    "Socket Timeout",
    "Timed out waiting",
    "timed out",
    "NCCL communicator was aborted",
    "Watchdog caught collective operation timeout",
)
_hosts: dict[int, tuple[str, str]] = {}  # rank -> (hostname, address)
HOST_ROW = 256  # bytes per rank in the exchange


class PeerLost(RuntimeError):
    """Other ranks went away mid-run (a host died, its network went down, or a rank crashed)."""


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` when this process's parent (torchrun's agent, srun's step, a spawning process)
    dies; exit now if it already has. Linux only; False where it does not apply."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        prctl = ctypes.CDLL(name, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:  # the launcher died before we got here (while we imported torch)
        os.kill(os.getpid(), sig)
    return True


def share_hosts(device: torch.device) -> None:
    """Every rank learns every rank's host and address: one all_gather of fixed-size byte rows, no pickle."""
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        addr = ""
    row = torch.zeros(HOST_ROW, dtype=torch.uint8)
    data = f"{host} {addr}".encode()[:HOST_ROW]
    row[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    rows = [torch.empty_like(row, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row.to(device))
    _hosts.clear()
    for r, t in enumerate(rows):
        name, _, a = bytes(t.cpu().tolist()).rstrip(b"\0").decode().partition(" ")
        _hosts[r] = (name, a)


def hosts_summary() -> str:
    """'n1 (ranks 0,1), n2 (ranks 2,3)': where the ranks run, from the shared table."""
    by_host: dict[str, list[int]] = {}
    for r, (host, _) in sorted(_hosts.items()):
        by_host.setdefault(host, []).append(r)
    return ", ".join(f"{h} (rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))})" for h, rs in by_host.items())


def host_names() -> list[str]:
    """The hosts the ranks run on, in rank order (this host alone before any process group)."""
    if not _hosts:
        return [socket.gethostname()]
    return list(dict.fromkeys(host for _, (host, _) in sorted(_hosts.items())))


def where(rank: int) -> tuple[str, str]:
    """(hostname, address) of `rank`, from the shared table."""
    return _hosts.get(rank, ("?", "?"))


def host_at(addr: str) -> str:
    """The hostname at `addr` (an address or a hostname) in the shared table, else `addr` itself."""
    return next((host for host, a in _hosts.values() if addr in (host, a)), addr)


def _ranks_at(addr: str) -> list[int]:
    me = dist.get_rank() if dist.is_initialized() else -1
    return [r for r, (host, a) in _hosts.items() if (a == addr or host == addr) and r != me]


def describe_lost_peer(error: BaseException, timeout_s: float) -> Optional[str]:
    """One line on what was lost, if `error` is a collective failing for lack of peers; else None."""
    text = str(error)
    dist_error = getattr(dist, "DistError", ())
    if not (isinstance(error, dist_error) or (isinstance(error, RuntimeError) and any(p in text for p in PEER_GONE))):
        return None
    me = socket.gethostname()
    m = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", text)
    ranks = _ranks_at(m.group(1)) if m else []
    if ranks:
        host = _hosts[ranks[0]][0]
        what = f"lost rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))} on {host} ({m.group(1)})"
    else:
        others = sorted({h for h, _ in _hosts.values() if h != me})
        what = (
            f"no answer from the other ranks within parallel.dist_timeout_s={timeout_s:g}s (a host died or its "
            f"network is down{'; other hosts: ' + ', '.join(others) if others else ''})"
        )
    reason = "connection closed" if m else re.sub(r"^\[[^\]]*:\d+\]\s*", "", text.strip().splitlines()[0])[:160]
    return f"{what}: {reason}"
