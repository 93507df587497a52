import os
import sys
import time

import pytest

from ddpm_dist.parallel.env import free_port  # noqa: F401 - the one free-port helper, for the tests too

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


@pytest.fixture
def cpu_env(monkeypatch):
    """A child-process environment: one thread per process, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = ROOT
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def cluster():
    """Two hosts in network namespaces (tests/netns_cluster.py), removed by name and PID at the end."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.fail("the multi-host tests need root, iproute2 and nsenter (`make system-deps` installs them)")
    from tests.netns_cluster import Cluster

    c = Cluster(2).up()
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank FSDP2 run on loopback: interrupted runs across hosts must end bitwise equal to it."""
    from tests.multinode_helpers import COMMON, LOSS_STEPS
    from tests.train_helpers import run_train

    run = tmp_path_factory.mktemp("reference") / "run"
    run_train(run, LOSS_STEPS, "parallel.backend=fsdp", *COMMON, nproc=2)
    return run
