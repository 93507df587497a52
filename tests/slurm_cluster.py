"""A real single-node SLURM cluster on loopback (munged, slurmctld, slurmd from Debian), for system tests.
Started in a private folder, stopped by PID; every wait is bounded."""
import os
import shutil
import subprocess
import time

import pytest

CONF = """ClusterName=ddpmtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
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
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem}
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} (after {timeout}s)")


def _pid(path):
    try:
        return int(open(path).read().strip())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if not shutil.which("slurmctld") or not shutil.which("munged"):
        pytest.fail("SLURM is not installed: run `make system-deps` (the Makefile's test target does)")
    from tests.conftest import free_port

    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    mem = int(open("/proc/meminfo").readline().split()[1]) // 1024 - 2048
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(d=d, cpus=os.cpu_count(), mem=mem, ctld_port=free_port(), d_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started = []
    munge_pid = None
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        wait_for(lambda: _pid("/run/munge/munged.pid"), 10, "munged")
        munge_pid = _pid("/run/munge/munged.pid")
    subprocess.run(["slurmctld"], env=env, check=True)
    started.append(d / "slurmctld.pid")
    subprocess.run(["slurmd", "-N", "localhost"], env=env, check=True)
    started.append(d / "slurmd.pid")
    wait_for(lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
          == "idle", 30, "slurm node")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield env
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for pidfile in reversed(started):
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
