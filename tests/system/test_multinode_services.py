"""Services across hosts: a two-node SLURM cluster (slurmctld here, one slurmd per host namespace) running a
preemptible training job through submitit, and a real Prometheus here scraping every rank of both hosts."""

import json
import re
import signal
import subprocess

import pytest

from ddpm_dist.parallel.env import first_host, read_env
from tests.support.common import PYTHON, free_port
from tests.support.multinode_helpers import COMMON, LOSS_STEPS, launch, log_of, wait_all, wait_for
from tests.support.slurm_cluster import preempt_and_finish, slurm_cluster, submit
from tests.support.train_helpers import FAST, assert_bitwise_equal, audit, checkpoint_tensors, final_checkpoint
from tests.system.test_prometheus import dashboard_expressions, prometheus, query  # noqa: F401 - a fixture

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def slurm2(cluster, tmp_path_factory):
    nodes = [(h.name, h.addr, cluster.prefix(h, cwd="/")) for h in cluster.hosts]
    with slurm_cluster(tmp_path_factory.mktemp("slurm2"), nodes, ctld_addr=cluster.ctl, name="ddpm2n") as env:
        yield env


def test_ranks_and_master_come_from_the_two_node_jobs_slurm_variables(cluster, slurm2, tmp_path):
    """read_env's SLURM branch and first_host on the variables of a real `srun -N2` step, not a hand-made dict."""
    code = (
        "import json, os, socket; e = dict(os.environ, HOSTNAME_SEEN=socket.gethostname()); "
        f"json.dump(e, open('{tmp_path}/env-' + e['SLURM_PROCID'] + '.json', 'w'))"
    )
    r = subprocess.run(
        ["srun", "-N2", "-n2", "--gpus-per-node=1", PYTHON, "-c", code],
        env=slurm2,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        e = json.load(open(tmp_path / f"env-{rank}.json"))
        env = read_env(e)
        assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (rank, 2, 0, 1)
        assert e["SLURM_JOB_NODELIST"] == "n[1-2]" and first_host(e["SLURM_JOB_NODELIST"]) == "n1" == env.master_addr
        assert env.master_port == 20000 + int(e["SLURM_JOB_ID"]) % 20000
        assert e["HOSTNAME_SEEN"] == e["SLURMD_NODENAME"] == f"n{rank + 1}"  # each task on its own host


def test_two_node_job_is_preempted_requeued_and_resumes_exactly(cluster, slurm2, reference, tmp_path):
    """`launchers.slurm train --nodes 2 --gpus-per-node 1` through submitit: ranks on n1 and n2 meet at the first
    host of SLURM_JOB_NODELIST; `scancel --signal=USR2` stops every rank at one step with one committed checkpoint,
    the job is requeued and finishes bitwise equal to an uninterrupted run."""
    run = tmp_path / "run"
    entry = [
        "--config",
        "configs/digits.yaml",
        f"run_dir={run}",
        *FAST,
        f"train.total_images={16 * LOSS_STEPS}",
        "parallel.backend=fsdp",
        *COMMON,
    ]
    job = submit(tmp_path, "train", entry, "--nodes", "2", tasks=("--gpus-per-node", "1"))
    text, _ = preempt_and_finish(tmp_path, job, run, after_steps=10)
    assert re.search(r"2 ranks on n1 \(rank 0\), n2 \(rank 1\); rendezvous n1:\d+", text), text[-3000:]
    for rank in (0, 1):
        assert audit(reference, rank) == audit(run, rank)
    assert_bitwise_equal(checkpoint_tensors(final_checkpoint(reference)), checkpoint_tensors(final_checkpoint(run)))


def test_prometheus_here_scrapes_every_rank_of_both_hosts(cluster, prometheus, tmp_path):  # noqa: F811
    """Each rank's exporter listens on its host's address and announces it for file-based discovery; the real
    Prometheus in this namespace sees up == 1 for both hosts and every dashboard expression returns data, with a
    series for each host wherever the expression keeps the instance."""
    port, sd = prometheus
    run, exporter = tmp_path / "run", free_port()
    procs = launch(
        cluster,
        run,
        100_000,
        1,
        "parallel.backend=ddp",
        "metrics.prometheus=true",
        f"metrics.prometheus_port={exporter}",
        f"metrics.sd_dir={sd}",
        "metrics.job=4343",
        "checkpoint.every_images=320",
        "train.sample_every_images=640",
        "eval.every_images=640",
        "eval.num_images=32",
        "train.max_wall_seconds=240",
        launcher="launchers.torchrun",
        env={"DDPM_CACHE": str(tmp_path / "cache")},
    )
    hosts = {f"{h.addr}:{exporter}" for h in cluster.hosts}
    try:
        exprs = dashboard_expressions()
        missing = exprs
        wait_for(lambda: len(list(sd.glob("*.json"))) == 2, 180, "both ranks' discovery files")
        targets = {t for f in sd.glob("*.json") for entry in json.load(open(f)) for t in entry["targets"]}
        assert targets == hosts  # addresses Prometheus (another host) can reach, not 127.0.0.1

        def seen():
            nonlocal missing
            assert all(p.poll() is None for p in procs), log_of(run, "n1")[-3000:]
            up = {r["metric"]["instance"] for r in query(port, "up == 1")}
            missing = [(name, e) for name, e in missing if not query(port, e)]
            return up >= hosts and not missing

        wait_for(seen, 240, f"up on both hosts and data for {missing}")
        for name, e in exprs:
            instances = {r["metric"].get("instance") for r in query(port, e)}
            assert None in instances or instances >= hosts, (name, instances)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = wait_all(procs, timeout=180)
    assert codes == [75, 75], log_of(run, "n1")[-3000:]  # saved and asked for a requeue
    assert not list(sd.glob("*.json"))  # targets withdrawn at exit
