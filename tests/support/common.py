"""Paths and polling every test uses."""

import os
import sys
import time

from ddpm_dist.parallel.env import free_port  # noqa: F401 - the one free-port helper, for the tests too

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
DIGITS = os.path.join(ROOT, "shards", "digits", "manifest.json")


def wait_for(predicate, timeout: float, what: str, every: float = 0.1) -> None:
    """Poll `predicate` until it holds; a TimeoutError naming `what` after `timeout` seconds."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(every)
    raise TimeoutError(f"{what} (after {timeout}s)")
