import os
import sys

import pytest

from ddpm_dist.parallel.env import free_port  # noqa: F401 - the one free-port helper, for the tests too

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
DIGITS = os.path.join(ROOT, "shards", "digits", "manifest.json")


@pytest.fixture
def cpu_env(monkeypatch):
    """A child-process environment: one thread per process, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = ROOT
    env["OMP_NUM_THREADS"] = "1"
    return env
