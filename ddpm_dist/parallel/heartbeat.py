"""Liveness beside the process group: a lost or silent peer is noticed within parallel.heartbeat_timeout_s, however
long parallel.dist_timeout_s lets a collective wait (a checkpoint, an evaluation, a first torch.compile).

A daemon thread per rank beats through the c10d store the process group already uses (a clone of the default
group's store: its own connection beside the main thread's): it adds 1 to its counter `heartbeat/<rank>` every
timeout/6 s and reads the counter of the next rank in a ring (rank+1 mod world), so each rank's store traffic is
O(1) whatever the world size, and every rank is watched by the one before it. A watched counter that has not moved
for heartbeat_timeout_s (measured on this rank's own clock: counters, not timestamps, so clocks need not agree) is a
lost peer; a store that does not answer for that long is a lost store host (judged by a second thread that never
touches the store: a TCPStore call to a frozen or cut-off host blocks past the store's timeout). The detecting rank
writes its one line to `heartbeat/lost`, which every rank reads each beat, so all survivors stop within a beat,
naming the same host.
Values are plain integers and bytes, never pickles. The thread beats whatever the main thread does: it measures that
the process is alive, not that it makes progress (a slow rank, a long save, a compile are alive).

When a peer is lost the thread prints the one line (`error: ...`, as command_line.run_cli does for PeerLost), flushes
the logs, aborts the process group and leaves with os._exit(2). Why not raise in the main thread: it may be blocked
in a collective, and on gloo (torch 2.14) ProcessGroup.abort() is a no-op, so an all_reduce waiting for a silent peer
keeps waiting until dist_timeout_s (measured: abort returned at once, the all_reduce stayed blocked); a Python signal
would not be handled either until that C++ call returns. Exiting is what the PeerLost path does anyway (run_cli's
os._exit(2): a group with a lost peer cannot be torn down politely). The abort first is for NCCL, where it tears the
communicators down (as torch's own NCCL watchdog does before it kills the process) so no kernel keeps spinning on a
GPU; a timer exits regardless if the abort or a flush hangs."""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import threading
import time
from typing import Callable, Optional

import torch.distributed as dist

from .faults import host_at, where

log = logging.getLogger(__name__)
LOST_KEY = "heartbeat/lost"
EXIT_CODE = 2
HARD_EXIT_AFTER_S = 5.0  # if aborting the group or flushing hangs, the exit happens anyway


def beat_key(rank: int) -> str:
    return f"heartbeat/{rank}"


def done_key(rank: int) -> str:
    return f"heartbeat/{rank}/done"


class Heartbeat:
    """Beat `rank`'s counter in `store` and watch rank+1's; call `on_lost(line)` once when the watched rank, or the
    store itself (at `store_addr`), is silent for `timeout_s`. `step()` gives the step named in the line."""

    def __init__(
        self,
        store,
        rank: int,
        world_size: int,
        timeout_s: float,
        *,
        step: Callable[[], int] = lambda: -1,
        store_addr: str = "",
        on_lost: Optional[Callable[[str], None]] = None,
    ):
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, float(timeout_s)
        self.interval = self.timeout_s / 6
        self.step, self.store_addr = step, store_addr
        self.on_lost = on_lost or exit_lost
        self.watched: Optional[int] = (rank + 1) % world_size if world_size > 1 else None
        self.lost: Optional[str] = None
        self.beats = 0  # beats answered by the store
        self._stop, self._once = threading.Event(), threading.Lock()
        self._clean, self._error, self._last_ok = True, None, 0.0
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{rank}", daemon=True)
        self._watchdog = threading.Thread(target=self._watch_store, name=f"heartbeat-store-{rank}", daemon=True)

    def start(self) -> Heartbeat:
        self.store.delete_key(done_key(self.rank))  # a run before this one in the same process group marked it
        self.store.add(beat_key(self.rank), 1)  # before the threads: the first beat is on record when start returns
        self._last_ok = time.monotonic()
        self._thread.start()
        self._watchdog.start()
        return self

    def stop(self, clean: bool = True) -> None:
        """Stop beating. Clean (the run ended): mark this rank done, so its watcher does not take the silence for a
        loss while the others finish. Not clean (the main thread is already reporting a lost peer): just go quiet."""
        self._clean = clean
        self._stop.set()
        if clean:
            self._thread.join(timeout=self.timeout_s)  # it marks this rank done on its way out

    # -- the threads -----------------------------------------------------------------------------------
    def _run(self) -> None:
        """Beat, read the announcement and the watched counter; judge the watched rank."""
        now = time.monotonic()
        seen_at = ended = now  # when the watched counter last moved; when the last beat ended
        seen = -1
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - ended > 2 * self.interval + 1.0:  # this process was not scheduled (stopped, swapped): not theirs
                seen_at = now
            try:
                self.store.add(beat_key(self.rank), 1)
                announced = self.store.get(LOST_KEY) if self.store.check([LOST_KEY]) else None
                value = self.store.add(beat_key(self.watched), 0) if self.watched is not None else seen
                done = value == seen and self.watched is not None and self.store.check([done_key(self.watched)])
            except Exception as e:  # noqa: BLE001 - the store's errors are RuntimeError/DistError subclasses
                self._error, ended = e, time.monotonic()  # the watchdog judges how long the store has been silent
                continue
            ended = self._last_ok = time.monotonic()
            self.beats += 1
            if self._stop.is_set():
                break
            if announced:
                return self._declare(bytes(announced).decode(errors="replace"), announce=False)
            if self.watched is None:
                continue
            if value != seen:
                seen, seen_at = value, now
            elif done:  # it finished cleanly: watch the one it watched (the collectives of the shutdown see the rest)
                nxt = (self.watched + 1) % self.world_size
                self.watched, seen, seen_at = (None if nxt == self.rank else nxt), -1, now
            elif now - seen_at >= self.timeout_s:
                return self._declare(self._peer_lost(self.watched, now - seen_at), announce=True)
        if self._clean:
            try:
                self.store.set(done_key(self.rank), b"1")
            except Exception as e:  # noqa: BLE001 - the run is over; its watcher may then report it
                log.warning("heartbeat: could not mark rank %d done: %s", self.rank, e)

    def _watch_store(self) -> None:
        """A store call that hangs (its host frozen or cut off: the TCPStore client's recv does not time out) blocks
        the beating thread, so the store's silence is judged here, by a thread that never touches it."""
        ticked = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - ticked > 2 * self.interval + 1.0:  # this process was not scheduled: the store is not to blame
                self._last_ok = now
            ticked = now
            if now - self._last_ok >= self.timeout_s:
                return self._declare(self._store_lost(self._error, now - self._last_ok), announce=False)

    def _peer_lost(self, rank: int, silent_s: float) -> str:
        host, addr = where(rank)
        return (
            f"lost rank {rank} on {host} ({addr}): no heartbeat for {silent_s:.0f}s "
            f"(parallel.heartbeat_timeout_s={self.timeout_s:g})"
        )

    def _store_lost(self, error: Optional[BaseException], silent_s: float) -> str:
        addr = self.store_addr.rsplit(":", 1)[0]
        text = str(error).strip() if error is not None else "no reply"
        reason = re.sub(r"^\[[^\]]*\]\s*", "", (text.splitlines() or [type(error).__name__])[0])[:160]
        return (
            f"lost the rendezvous store on {host_at(addr)} ({self.store_addr}): no answer for {silent_s:.0f}s "
            f"(parallel.heartbeat_timeout_s={self.timeout_s:g}): {reason}"
        )

    def _declare(self, what: str, announce: bool) -> None:
        if self._stop.is_set() or not self._once.acquire(blocking=False):  # stopped meanwhile, or said already
            return
        step = self.step()
        self.lost = f"{what}; at step {step}: relaunch to resume from the newest committed checkpoint"
        if announce:
            try:
                self.store.set(LOST_KEY, what.encode())
            except Exception:  # noqa: BLE001 - the others then find out by themselves
                pass
        self.on_lost(self.lost)


class _Off:
    lost = None

    def stop(self, clean: bool = True) -> None:
        pass


def exit_lost(line: str) -> None:
    """Leave now, as a lost peer does (exit code 2, one line), even with the main thread blocked in a collective."""
    timer = threading.Timer(HARD_EXIT_AFTER_S, os._exit, (EXIT_CODE,))
    timer.daemon = True
    timer.start()
    print(f"error: {line}", file=sys.stderr, flush=True)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001
            pass
    sys.stdout.flush()
    try:
        if dist.is_initialized():
            dist.distributed_c10d._get_default_group().abort()  # NCCL: communicators down; gloo: nothing
    finally:
        os._exit(EXIT_CODE)


def start_heartbeat(env, timeout_s: float, step: Callable[[], int] = lambda: -1):
    """Start this rank's heartbeat (a no-op for one process, or timeout_s <= 0); `.stop()` it when the run ends."""
    if timeout_s <= 0 or not env.distributed or not dist.is_initialized():
        return _Off()
    store = dist.distributed_c10d._get_default_store().clone()  # its own connection: safe beside the main thread
    store.set_timeout(datetime.timedelta(seconds=timeout_s))  # not the group's long one (the watchdog judges hangs)
    addr = f"{os.environ.get('MASTER_ADDR', env.master_addr)}:{os.environ.get('MASTER_PORT', env.master_port)}"
    return Heartbeat(store, env.rank, env.world_size, timeout_s, step=step, store_addr=addr).start()
