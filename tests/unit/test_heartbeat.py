"""The heartbeat (ddpm_dist/parallel/heartbeat.py) on a real TCPStore, in-process, with a 1.2 s timeout: a silent
peer is named within the timeout + a beat, a cleanly stopped one is not, every rank stops on the announced line, and
a store that stops answering (its process frozen, so its sockets stay open) is a lost store host."""

import datetime
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from ddpm_dist.parallel import faults
from ddpm_dist.parallel.heartbeat import LOST_KEY, Heartbeat, start_heartbeat
from tests.support.common import wait_for

TIMEOUT = 1.2


@pytest.fixture
def hosts(monkeypatch):
    monkeypatch.setattr(faults, "_hosts", {0: ("n1", "198.18.9.2"), 1: ("n2", "198.18.9.3"), 2: ("n2", "198.18.9.3")})


def client(port: int, timeout_s: float = TIMEOUT):
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    return store


@pytest.fixture
def master():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield store


def ring(master, n: int, **kw):
    found: dict[int, str] = {}
    beats = [
        Heartbeat(
            client(master.port), r, n, TIMEOUT, step=lambda: 7, on_lost=lambda line, r=r: found.setdefault(r, line)
        )
        for r in range(n)
    ]
    return [b.start() for b in beats], found


def test_a_silent_peer_is_named_within_the_timeout_and_every_rank_stops(master, hosts):
    beats, found = ring(master, 3)
    try:
        t0 = time.monotonic()
        beats[1].stop(clean=False)  # rank 1 goes silent (as a killed process would), rank 0 watches it
        wait_for(lambda: len(found) == 2, TIMEOUT * 3, "ranks 0 and 2 stopping")
        elapsed = time.monotonic() - t0
    finally:
        for b in beats:
            b.stop(clean=False)
    line = "lost rank 1 on n2 (198.18.9.3): no heartbeat for 1s (parallel.heartbeat_timeout_s=1.2); at step 7: relaunch"
    assert found[0].startswith(line) and found[2] == found[0], found  # rank 2 read rank 0's announcement
    assert TIMEOUT <= elapsed <= TIMEOUT + 2 * beats[0].interval + 0.5, elapsed
    assert master.get(LOST_KEY).decode().startswith("lost rank 1 on n2")


def test_a_cleanly_stopped_peer_and_a_busy_main_thread_are_no_alarm(master, hosts):
    beats, found = ring(master, 3)
    try:
        beats[1].stop()  # finished first; the others go on (e.g. writing the export) for more than the timeout
        end = time.monotonic() + 3 * TIMEOUT
        while time.monotonic() < end:  # the main thread busy in Python the whole time: the beats go on
            sum(i * i for i in range(10_000))
        assert beats[0].watched == 2 and beats[0]._thread.is_alive() and not found, found  # rank 0 watches on
        beats[2].stop()
        wait_for(lambda: beats[0].watched is None, 3 * TIMEOUT, "rank 0 seeing everyone done")
        assert not found, found
    finally:
        beats[0].stop()
    assert master.check(["heartbeat/0/done", "heartbeat/1/done", "heartbeat/2/done"])


@pytest.mark.parametrize("how", ["frozen", "killed"])
def test_a_store_that_stops_answering_is_a_lost_store_host(hosts, how):
    code = (
        "import sys, time, torch.distributed as d\n"
        "s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
        "print(s.port, flush=True)\n"
        "time.sleep(120)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    found: list[str] = []
    try:
        port = int(server.stdout.readline())
        beat = Heartbeat(client(port), 1, 2, TIMEOUT, store_addr=f"198.18.9.2:{port}", on_lost=found.append).start()
        t0 = time.monotonic()
        server.send_signal(signal.SIGSTOP if how == "frozen" else signal.SIGKILL)
        wait_for(lambda: found, TIMEOUT * 4, "the store declared lost")
        elapsed = time.monotonic() - t0
        beat.stop(clean=False)
    finally:
        server.kill()
        server.wait(timeout=30)
    assert found[0].startswith(f"lost the rendezvous store on n1 (198.18.9.2:{port}): no answer for"), found
    assert elapsed <= 2 * TIMEOUT + 2 * beat.interval + 0.5, elapsed


def test_off_for_one_process_or_a_zero_timeout():
    from ddpm_dist.parallel.env import DistEnv

    assert start_heartbeat(DistEnv(), 45).lost is None
    assert start_heartbeat(DistEnv(rank=0, world_size=2), 0).lost is None
