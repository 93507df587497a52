"""What the multi-host tests share: torchrun on every host of the `cluster` fixture (tests/support/common.py) and
evidence waits."""

import os
import subprocess
import time
import uuid

from tests.support.common import PYTHON, ROOT, free_port, wait_for  # noqa: F401 - wait_for re-exported
from tests.support.train_helpers import child_env, train_args

LOSS_STEPS = 40
COMMON = ["checkpoint.every_images=128", "parallel.dist_timeout_s=15"]  # a checkpoint every 8 steps
TIMEOUT = 15


def launch(cluster, run_dir, steps, nproc, *extra, launcher="torch.distributed.run", env=None, module=None):
    """One torchrun per host, c10d rendezvous on n1, training the digits config (or `module` with `extra` as its
    arguments): the Popen per host, output in RUN.HOST.log beside run_dir."""
    rdzv, rdzv_id, procs = f"{free_port()}", uuid.uuid4().hex[:8], []
    target = [module, *extra] if module else ["ddpm_dist.train", *train_args(run_dir, steps, *extra)]
    for i, h in enumerate(cluster.hosts):
        cmd = [
            PYTHON,
            "-m",
            launcher,
            "--nnodes",
            str(len(cluster.hosts)),
            "--nproc-per-node",
            str(nproc),
            "--node-rank",
            str(i),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"n1:{rdzv}",
            "--rdzv-id",
            rdzv_id,
            "-m",
            *target,
        ]
        log = open(f"{run_dir}.{h.name}.log", "a")
        procs.append(
            cluster.popen(h, cmd, cwd=ROOT, env=child_env(**(env or {})), stdout=log, stderr=subprocess.STDOUT)
        )
    return procs


def wait_all(procs, timeout=600) -> list[int]:
    end = time.time() + timeout
    for p in procs:
        p.wait(timeout=max(1, end - time.time()))
    return [p.returncode for p in procs]


def log_of(run_dir, host) -> str:
    return open(f"{run_dir}.{host}.log", errors="replace").read()


def audit_lines(run_dir) -> int:
    path = os.path.join(run_dir, "data_audit", "rank0.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0
