"""What the elastic tests share: a real etcd on its own namespace host, torchrun agents in elastic mode
(`--nnodes MIN:MAX --max-restarts K`) on training hosts, evidence read from the run directory and the logs."""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid

from tests.support.common import PYTHON, ROOT, wait_for
from tests.support.train_helpers import FAST, child_env

BATCH = 12  # divisible by world sizes 2 and 3
EVERY = 4  # steps between periodic checkpoints
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see launchers/torchrun.py
RDZV_CONF = "join_timeout=90,last_call_timeout=2,close_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3"


def elastic_train_args(run_dir, steps, *extra) -> list[str]:
    """The digits config made fast, `steps` steps of BATCH images, a committed checkpoint every EVERY steps."""
    return [
        "--config",
        "configs/digits.yaml",
        f"run_dir={run_dir}",
        *FAST,
        f"train.global_batch={BATCH}",
        f"train.total_images={BATCH * steps}",
        f"checkpoint.every_images={BATCH * EVERY}",
        "checkpoint.keep_last=100",
        "train.stop_check_every=1",
        "train.log_every=1",
        "parallel.backend=ddp",
        "parallel.dist_timeout_s=20",
        *extra,
    ]


def start_etcd(cluster, host, data_dir) -> subprocess.Popen:
    """etcd 3.4 (v2 API on, as torch's etcd-v2 rendezvous needs) on `host`'s address; waits until it is healthy."""
    etcd = shutil.which("etcd")
    if not etcd:
        raise RuntimeError("etcd not found (`make system-deps` installs Debian's etcd-server)")
    url, peer = f"http://{host.addr}:2379", f"http://{host.addr}:2380"
    cmd = [
        etcd,
        "--name=rdzv",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=rdzv={peer}",
        "--enable-v2",
    ]
    log = open(f"{data_dir}.log", "w")
    proc = cluster.popen(host, cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _healthy(url), 30, f"etcd on {host.name}")
    except BaseException:
        stop(proc)
        raise
    return proc


def _healthy(url) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return json.loads(r.read()).get("health") == "true"
    except OSError:
        return False


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """The process by its PID: SIGTERM, then SIGKILL (bounded)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def agent_cmd(nnodes, endpoint, rdzv_id, train_args, backend="etcd-v2", launcher="launchers.torchrun", restarts=3):
    return [
        PYTHON,
        "-m",
        launcher,
        "--nnodes",
        nnodes,
        "--nproc-per-node",
        "1",
        "--max-restarts",
        str(restarts),
        "--rdzv-backend",
        backend,
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        rdzv_id,
        "--rdzv-conf",
        RDZV_CONF,
        "-m",
        "ddpm_dist.train",
        *train_args,
    ]


def start_agent(cluster, host, run_dir, cmd) -> subprocess.Popen:
    """One agent on `host`, its output appended to RUN.HOST.log beside run_dir. Bare torchrun gets what
    launchers.torchrun sets by itself for elastic runs (NO_SHARED_STORE)."""
    log = open(f"{run_dir}.{host.name}.log", "a")
    env = child_env(**NO_SHARED_STORE)
    return cluster.popen(host, cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def new_id() -> str:
    return uuid.uuid4().hex[:8]


def log_of(run_dir, host) -> str:
    path = f"{run_dir}.{host}.log"
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def committed(run_dir) -> list[int]:
    ck = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ck):
        return []
    return sorted(
        int(d.split("_")[1])
        for d in os.listdir(ck)
        if d.startswith("step_") and os.path.exists(os.path.join(ck, d, "COMMITTED"))
    )


def train_rows(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a row being written
    return rows


def audit_rows(run_dir, rank) -> list[dict]:
    """The rows of rank's data audit, in the order written."""
    path = os.path.join(run_dir, "data_audit", f"rank{rank}.jsonl")
    return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


def last_step(run_dir, rank=0) -> int:
    rows = audit_rows(run_dir, rank)
    return rows[-1]["step"] if rows else -1


def resumes(text) -> list[int]:
    """The steps the workers resumed from, in the order the log says so."""
    return [int(m) for m in re.findall(r"resumed from \S*step_(\d+)", text)]


def wait_until(predicate, timeout, what, every=0.05) -> float:
    """wait_for, returning the time it held."""
    wait_for(predicate, timeout, what, every)
    return time.time()
