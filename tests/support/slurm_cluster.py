"""Real SLURM clusters for system tests (munged, slurmctld, slurmd from Debian): one node on loopback, or
one slurmd per host of a tests.support.netns_cluster. Started in a private folder, stopped by PID; every wait is
bounded."""

import contextlib
import os
import re
import shutil
import socket
import subprocess

import pytest

from tests.support.common import wait_for

CONF = """ClusterName={name}
SlurmctldHost={ctld_host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.%n.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=5
MinJobAge=300
GresTypes=gpu
{nodes}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""
# CPU tasks asked for with --gpus-per-node: one "GPU" per node, backed by no real device.
GRES = "AutoDetect=off\nNodeName={node_names} Name=gpu File=/dev/null\n"


def _pid(path):
    try:
        return int(open(path).read().strip())
    except (OSError, ValueError):
        return None


def submit(tmp_path, verb, entry_args, *launcher_args, tasks=("--tasks-per-node", "2")):
    """`python -m launchers.slurm VERB ...`: the job id, after checking what the launcher prints."""
    from tests.support.train_helpers import run_module

    log_folder = str(tmp_path / "logs" / "%j")
    options = [*tasks, "--cpus-per-task", "1", "--time", "30", "--log-folder", log_folder, *launcher_args]
    r = run_module("launchers.slurm", verb, *options, "--", *entry_args, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    assert "follow: tail -f" in r.stdout and "logs:" in r.stdout
    return job


def job_state(job):
    r = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    state = re.search(r"JobState=(\S+)", r.stdout)
    restarts = re.search(r"Restarts=(\d+)", r.stdout)
    return (state.group(1) if state else "GONE"), int(restarts.group(1)) if restarts else 0


def logs(tmp_path, job):
    text = ""
    folder = tmp_path / "logs" / job
    for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
        if name.endswith((".out", ".err")):
            text += open(folder / name, errors="replace").read()
    return text


def preempt_and_finish(tmp_path, job: str, run, after_steps: int) -> tuple[str, int]:
    """Once the job's rank 0 has taken `after_steps` steps, `scancel --signal=USR2`; wait for the requeue and
    the completion; (the job's logs, the step every rank stopped at), after checking the resume from it."""
    audit_file = run / "data_audit" / "rank0.jsonl"
    wait_for(
        lambda: audit_file.exists() and sum(1 for _ in open(audit_file)) >= after_steps,
        240,
        "job did not start training",
        every=0.5,
    )
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for(lambda: job_state(job)[1] >= 1, 120, "job was not requeued", every=0.5)
    wait_for(lambda: job_state(job)[0] == "COMPLETED", 300, f"job did not complete: {job_state(job)}", every=0.5)
    text = logs(tmp_path, job)
    stop = re.search(r"stopping at step (\d+) \(signal SIGUSR2\)", text)
    assert stop, text[-3000:]
    step = int(stop.group(1))
    assert f"requeuing job {job}" in text and f"resumed from {run}/checkpoints/step_{step:09d}" in text, text[-3000:]
    return text, step


@contextlib.contextmanager
def slurm_cluster(d, nodes: list[tuple[str, str, list[str]]], ctld_addr: str = "127.0.0.1", name: str = "ddpmtest"):
    """slurmctld here and one slurmd per (node name, address, command prefix that runs on that node); yields the
    environment (SLURM_CONF) with every node idle; stops every daemon it started by PID."""
    if not shutil.which("slurmctld") or not shutil.which("munged"):
        pytest.fail("SLURM is not installed: run `make system-deps` (the Makefile's test target does)")
    from tests.support.common import free_port

    for sub in ("state", "spool"):
        (d / sub).mkdir()
    mem = (int(open("/proc/meminfo").readline().split()[1]) // 1024 - 2048) // len(nodes)
    lines = [f"NodeName={n} NodeAddr={a} CPUs={os.cpu_count()} RealMemory={mem} Gres=gpu:1" for n, a, _ in nodes]
    names = ",".join(n for n, _, _ in nodes)
    ctld_host = "localhost" if ctld_addr == "127.0.0.1" else f"{socket.gethostname()}({ctld_addr})"
    conf = d / "slurm.conf"
    conf.write_text(
        CONF.format(
            d=d,
            name=name,
            ctld_host=ctld_host,
            ctld_port=free_port(),
            d_port=free_port(),
            nodes="\n".join(lines),
            node_names=names,
        )
    )
    (d / "gres.conf").write_text(GRES.format(node_names=names))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pidfiles = [d / "slurmctld.pid"] + [d / f"slurmd.{n}.pid" for n, _, _ in nodes]
    munge_pid = None
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        wait_for(lambda: _pid("/run/munge/munged.pid"), 10, "munged", every=0.5)
        munge_pid = _pid("/run/munge/munged.pid")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        subprocess.run(["slurmctld"], env=env, check=True)
        for node, _, prefix in nodes:
            subprocess.run([*prefix, "slurmd", "-N", node], env=env, check=True)
        wait_for(
            lambda: (
                set(
                    subprocess.run(
                        ["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True
                    ).stdout.split()
                )
                == {"idle"}
            ),
            60,
            "slurm nodes idle",
            every=0.5,
        )
        yield env
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for pidfile in reversed(pidfiles):
            pid = _pid(pidfile)
            if pid:
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass
        if munge_pid:
            try:
                os.kill(munge_pid, 15)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), [("localhost", "127.0.0.1", [])]) as env:
        yield env
