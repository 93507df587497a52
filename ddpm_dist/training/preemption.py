"""Preemption: SIGUSR1 / SIGUSR2 / SIGTERM only set a flag; at each step boundary the ranks agree with one
small all_reduce(MAX), so every rank stops at the same step, saves, and exits with REQUEUE_EXIT_CODE.
A wall-clock budget (train.max_wall_seconds) raises the same flag before a job's time limit."""

from __future__ import annotations

import logging
import os
import signal
import time

import torch

from ..parallel.collectives import all_reduce_max

log = logging.getLogger(__name__)
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" — launchers read it as "requeue me"
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class Preemption:
    def __init__(self, device: torch.device, max_wall_seconds: float = 0.0):
        self.device = device
        self.deadline = time.time() + max_wall_seconds if max_wall_seconds > 0 else None
        self.received: int = 0
        self.reason = ""
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # async-signal context: set the flag, nothing else
        self.received = signum

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank got a signal or passed the deadline."""
        local = 1.0 if self.received else 0.0
        if self.deadline is not None and time.time() >= self.deadline:
            local = max(local, 2.0)
        agreed = all_reduce_max(local, self.device)
        if agreed and not self.reason:
            self.reason = (
                "wall-clock budget"
                if agreed == 2.0 and not self.received
                else (f"signal {signal.Signals(self.received).name}" if self.received else "a signal on another rank")
            )
        return agreed > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# Launchers that must forward signals (launchers/torchrun.py) pass a folder in DDPM_SIGNAL_DIR: each
# worker leaves its PID there at start and its exit code at the end.
SIGNAL_DIR_ENV = "DDPM_SIGNAL_DIR"


def register_worker(rank: int) -> None:
    d = os.environ.get(SIGNAL_DIR_ENV)
    if d:
        with open(os.path.join(d, f"rank{rank}.pid.tmp"), "w") as f:
            f.write(str(os.getpid()))
        os.replace(os.path.join(d, f"rank{rank}.pid.tmp"), os.path.join(d, f"rank{rank}.pid"))


def record_exit(rank: int, code: int) -> None:
    d = os.environ.get(SIGNAL_DIR_ENV)
    if d:
        with open(os.path.join(d, f"rank{rank}.exit"), "w") as f:
            f.write(str(code))
