"""Multi-node for real: two hosts in network namespaces on this machine (tests/support/netns_cluster.py), each with its
own address, hostname and /etc/hosts. torchrun rendezvous across them (DDP, FSDP2, hybrid FSDP2, ZeRO-2),
shards from an S3 API server on one host, checkpoints on the shared filesystem, a real Prometheus scraping
every rank of both hosts, and the loss of a host (killed, or its link cut) handled rather than hung on."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.support.common import DIGITS, PYTHON, ROOT
from tests.support.multinode_helpers import COMMON, LOSS_STEPS, TIMEOUT, audit_lines, launch, log_of, wait_all, wait_for
from tests.support.train_helpers import (
    assert_bitwise_equal,
    checkpoint_tensors,
    child_env,
    final_checkpoint,
    train_args,
)

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def single():
    """The parity reference of tests/distributed/test_parallel.py: one process, global batch 8, 20 steps, fp32."""
    from tests.support.dist_workers import train_steps

    losses, params, ema, _, _ = train_steps("single", 1, 0, steps=20, global_batch=8)
    return losses, params, ema


@pytest.mark.parametrize(
    "backend,nproc,kwargs",
    [  # DDP's all-reduce across the cable is what hybrid FSDP's replication does; DDP's parity is test_parallel's
        ("fsdp", 1, {}),
        ("fsdp", 2, {"hybrid": True}),  # shard within a host, replicate across hosts
        ("zero", 1, {"zero_stage": 2}),
    ],
)
def test_two_hosts_match_one_process(cluster, single, tmp_path, backend, nproc, kwargs):
    """The engine parity test of the suite (a fixed global batch, 20 AdamW steps) with its ranks on two hosts:
    losses within 1e-5 relative, parameters and EMA within 1e-4 of one process; traffic crossed n2's cable."""
    from safetensors.torch import load_file

    from tests.distributed.test_parallel import assert_close

    out = tmp_path / "out"
    out.mkdir()
    before = cluster.link_bytes(cluster.host("n2"))
    codes = wait_all(
        launch(
            cluster,
            out,
            0,
            nproc,
            str(out),
            backend,
            json.dumps({"steps": 20, **kwargs}),
            module="tests.support.parity_main",
        )
    )
    assert codes == [0, 0], log_of(out, "n1")[-3000:] + log_of(out, "n2")[-3000:]
    assert cluster.link_bytes(cluster.host("n2")) - before > 500_000
    got = (
        json.load(open(out / "losses.json")),
        load_file(out / "params.safetensors"),
        load_file(out / "ema.safetensors"),
    )
    assert_close(single, got)
    if kwargs.get("hybrid"):  # each rank holds one host's shard: half the parameters, the same on both hosts
        full = sum(v.numel() * 4 for v in single[1].values())
        per_rank = [json.load(open(out / f"bytes-{r}.json"))["params"] for r in range(4)]
        # one host's two ranks hold the whole model once (shards differ by padding), the other host the same
        assert full <= per_rank[0] + per_rank[1] <= 1.01 * full and per_rank[:2] == per_rank[2:], (per_rank, full)


@pytest.fixture(scope="module")
def s3_on_n1(cluster):
    """An S3 API server (moto) on host n1, holding the digits shards; the other hosts read them over the network."""
    h = cluster.host("n1")
    server = cluster.popen(
        h,
        [PYTHON, "-m", "moto.server", "-H", h.addr, "-p", "5000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import boto3
        import fsspec

        url = f"http://{h.addr}:5000"  # from this (root) namespace; on the hosts it is http://n1:5000
        wait_for(lambda: _answers(h.addr, 5000), 60, "S3 API server on n1")
        boto3.client(
            "s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        ).create_bucket(Bucket="ddpm")
        fsspec.filesystem("s3", endpoint_url=url, key="test", secret="test").put(
            os.path.dirname(DIGITS) + "/", "ddpm/digits/", recursive=True
        )
        yield {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL": "http://n1:5000",
            "FSSPEC_S3_ENDPOINT_URL": "http://n1:5000",
        }
    finally:
        server.kill()
        server.wait()


def _answers(addr, port) -> bool:
    import socket

    try:
        socket.create_connection((addr, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    "backend,nproc,extra",
    [
        ("fsdp", 2, ["parallel.hybrid_shard=true"]),
        ("zero", 1, ["parallel.zero_stage=2"]),
    ],
)
def test_torchrun_trains_the_digits_config_across_hosts(cluster, s3_on_n1, tmp_path, backend, nproc, extra):
    """`torchrun --nnodes 2 --rdzv-backend c10d` on each host trains the digits config from shards served by an
    S3 API server on n1, checkpoints on the shared filesystem (DDP and FSDP2 across hosts: the Prometheus, node
    loss and SLURM tests). Hybrid FSDP2: every rank holds half the parameters."""
    run = tmp_path / "run"
    codes = wait_all(
        launch(
            cluster,
            run,
            12,
            nproc,
            f"parallel.backend={backend}",
            *extra,
            *COMMON,
            "data.source=s3://ddpm/digits/manifest.json",
            env=s3_on_n1,
        )
    )
    text = log_of(run, "n1") + log_of(run, "n2")
    assert codes == [0, 0], text[-4000:]
    hosts = "n1 (rank 0), n2 (rank 1)" if nproc == 1 else "n1 (ranks 0,1), n2 (ranks 2,3)"
    assert f"{2 * nproc} ranks on {hosts}; rendezvous n1:" in text
    assert (run / "export.safetensors").exists() and "step_000000012" in os.listdir(run / "checkpoints")
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    per_rank = next(r["per_rank"] for r in rows if r["event"] == "state_bytes")
    if nproc == 2:
        assert per_rank[0]["params"] == per_rank[2]["params"] and per_rank[1]["params"] == per_rank[3]["params"]
        assert 0.49 <= per_rank[0]["params"] / (per_rank[0]["params"] + per_rank[1]["params"]) <= 0.51


@pytest.mark.parametrize("fault", ["host killed", "link down"])
def test_losing_a_host_is_a_clear_error_and_a_relaunch_resumes_exactly(cluster, reference, tmp_path, fault):
    """n2 dies (SIGKILL to every process in its namespace) or its cable goes down at a random step: n1's rank exits
    non-zero within the process-group timeout + 30 s with one line naming what was lost, no uncommitted checkpoint
    is visible, and relaunching both hosts ends bitwise equal to an uninterrupted run."""
    import random

    run, n2 = tmp_path / "run", cluster.host("n2")
    procs = launch(cluster, run, LOSS_STEPS, 1, "parallel.backend=fsdp", *COMMON)
    try:
        k = random.Random(fault).randint(10, 30)
        wait_for(lambda: audit_lines(run) >= k, 180, f"step {k}")
        t0 = time.time()
        if fault == "host killed":
            cluster.kill_host(n2)
        else:
            cluster.set_link(n2, False)
        procs[0].wait(timeout=TIMEOUT + 30)
        elapsed = time.time() - t0
    finally:
        cluster.kill_host(n2)  # cut off, its launcher still waits for its rendezvous store
        cluster.set_link(n2, True)
        wait_all(procs, timeout=60)
    text = log_of(run, "n1")
    line = next((x for x in text.splitlines() if x.startswith("error: ")), "")
    expected = (
        "lost rank 1 on n2"
        if fault == "host killed"
        else f"no answer from the other ranks within parallel.dist_timeout_s={TIMEOUT}s"
    )
    assert procs[0].returncode != 0 and expected in line and "relaunch to resume" in line, text[-3000:]
    assert elapsed <= TIMEOUT + 30, elapsed
    ck = run / "checkpoints"
    assert all((ck / d / "COMMITTED").exists() for d in os.listdir(ck) if d.startswith("step_"))
    committed = max(int(d.split("_")[1]) for d in os.listdir(ck) if d.startswith("step_"))
    codes = wait_all(launch(cluster, run, LOSS_STEPS, 1, "parallel.backend=fsdp", *COMMON))
    assert codes == [0, 0], log_of(run, "n1")[-3000:]
    assert f"resumed from {ck}/step_{committed:09d}" in log_of(run, "n1") + log_of(run, "n2")
    assert_bitwise_equal(checkpoint_tensors(final_checkpoint(reference)), checkpoint_tensors(final_checkpoint(run)))


def children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return out


def alive(pid: int) -> bool:
    try:
        state_field = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        return state_field != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("when", ["worker start-up", "training"])
def test_a_killed_launcher_leaves_no_worker_behind(tmp_path, when):
    """torchrun SIGKILLed while its workers start (they may sit in the rendezvous) or mid-training: every worker
    exits within the process-group timeout + 30 s (checked by PID). Mid-training they stop as on a preemption."""
    run, workers = tmp_path / "run", []
    p = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "ddpm_dist.train",
            *train_args(run, 10_000, "parallel.backend=fsdp", *COMMON),
        ],
        cwd=ROOT,
        env=child_env(),
        stdout=open(tmp_path / "log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        if when == "training":
            wait_for(lambda: audit_lines(run) >= 5, 180, "training")
        else:
            wait_for(lambda: len(children(p.pid)) >= 2, 60, "workers")
        workers = children(p.pid)
        assert len(workers) == 2
        p.kill()
        p.wait()
        t0 = time.time()
        wait_for(lambda: not any(alive(w) for w in workers), TIMEOUT + 30, f"workers {workers} after their launcher")
        assert time.time() - t0 <= TIMEOUT + 30
    finally:
        for w in children(p.pid) + workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if when == "training":
        assert re.search(r"stopping at step \d+ \(signal SIGTERM\)", open(tmp_path / "log").read())
