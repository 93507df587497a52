"""Fixtures for every test; tests/unit, tests/distributed and tests/system get their marker from the folder."""

import os

import pytest

from tests.support.common import ROOT

GROUPS = ("unit", "distributed", "system")


# Files that start a SLURM cluster: one munged serves the machine and the first cluster up stops it, so under
# pytest-xdist they run in one worker, one after the other.
SLURM_FILES = ("test_slurm.py", "test_shard_index.py", "test_multinode_services.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group markers
def pytest_collection_modifyitems(items):
    """`pytest -m "not system"` and friends work by folder, whatever a file declares itself. Under pytest-xdist
    (`make test`: `-n 2 --dist loadgroup`) a file's tests stay in one worker, so its module fixtures run once: most
    tests leave one of the two cores idle (a one-process training run has one thread), and two files at a time fill
    it."""
    for item in items:
        path = os.path.relpath(str(item.path), os.path.join(ROOT, "tests"))
        group = path.split(os.sep)[0]
        if group in GROUPS:
            item.add_marker(getattr(pytest.mark, group))
        item.add_marker(pytest.mark.xdist_group("slurm" if os.path.basename(path) in SLURM_FILES else path))


@pytest.fixture
def cpu_env(monkeypatch):
    """A child-process environment: one thread per process, no inherited launcher variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    }
    env["PYTHONPATH"] = ROOT
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def cluster():
    """Two hosts in network namespaces (tests/support/netns_cluster.py), removed by name and PID at the end."""
    from tests.support.netns_cluster import running

    with running(2) as c:
        yield c


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank FSDP2 run on loopback: interrupted runs across hosts must end bitwise equal to it."""
    from tests.support.multinode_helpers import COMMON, LOSS_STEPS
    from tests.support.train_helpers import run_train

    run = tmp_path_factory.mktemp("reference") / "run"
    run_train(run, LOSS_STEPS, "parallel.backend=fsdp", *COMMON, nproc=2)
    return run
