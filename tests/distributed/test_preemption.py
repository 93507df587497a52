"""Preemption of a 2-process run: a signal to one rank, or to the launcher the README tells users to run."""

import os
import re
import signal
import subprocess
import time

import pytest

from tests.support.train_helpers import assert_runs_equal, audit, run_train, start_command, train_cmd

STEPS = 48  # the signal lands after step 17: a post-hoc EMA snapshot (every 16 steps) before the stop, two after
OPTS = ["parallel.backend=fsdp", "ema.stds=[0.05,0.1]", "ema.snapshot_every_images=256"]  # post-hoc EMA profiles too
pytestmark = pytest.mark.distributed


def worker_pids(run_dir):
    """PIDs of the training workers of this run, by rank (from /proc: cmdline and environment)."""
    pids = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = dict(x.split(b"=", 1) for x in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in x)
        except OSError:
            continue
        if (
            b"ddpm_dist.train" in cmd
            and f"run_dir={run_dir}".encode() in cmd
            and b"torch.distributed.run" not in cmd
            and b"launchers.torchrun" not in cmd
            and b"RANK" in env
        ):
            pids[int(env[b"RANK"])] = int(pid)
    return pids


def wait_for_step(run_dir, step, timeout=120):
    path = os.path.join(run_dir, "data_audit", "rank0.jsonl")
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"run did not reach step {step}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref")
    run_train(ref, STEPS, *OPTS, nproc=2)
    return ref


def preempt_and_resume(tmp_path, uninterrupted, send, launcher):
    run = tmp_path / "run"
    p = start_command(
        train_cmd(run, STEPS, *OPTS, nproc=2, launcher=launcher),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_step(run, 17)
        send(p, run)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 75, out[-3000:]
    stops = re.findall(r"\[rank(\d)\] stopping at step (\d+)", out)
    assert stops, out[-3000:]
    ckpts = sorted(os.listdir(run / "checkpoints"))
    assert len(ckpts) == 1 and os.path.exists(run / "checkpoints" / ckpts[0] / "COMMITTED")
    stop_step = int(stops[0][1])
    assert ckpts[0] == f"step_{stop_step:09d}" and 17 <= stop_step < STEPS
    # every rank stopped at the same step: both audits end there
    assert max(audit(run, 0)) == max(audit(run, 1)) == stop_step - 1
    resumed = run_train(run, STEPS, *OPTS, nproc=2, launcher=launcher)
    assert f"resumed from {run}/checkpoints/step_{stop_step:09d}" in resumed.stderr + resumed.stdout
    final = assert_runs_equal(uninterrupted, run, ranks=(0, 1), snapshots=True)  # the profiles' snapshots too
    assert any(k.startswith("power_ema") for k in final), sorted(final)[:20]


@pytest.mark.parametrize("sig", [signal.SIGUSR1])
def test_signal_to_one_rank(tmp_path, uninterrupted, sig):
    # One handler takes SIGUSR1, SIGUSR2 and SIGTERM (preemption.SIGNALS); SIGTERM to the whole job ends the run in
    # tests/system/test_prometheus.py with a checkpoint and exit 75, so SIGUSR1 alone is sent to a rank here.
    # (Under bare torchrun the workers exit 75 too, but torchrun reports 1: the launcher passes 75 on.)
    preempt_and_resume(tmp_path, uninterrupted, lambda p, run: os.kill(worker_pids(run)[1], sig), launcher="launcher")


@pytest.mark.parametrize("sig", [signal.SIGUSR1])
def test_signal_to_the_launcher(tmp_path, uninterrupted, sig):
    # SIGTERM to the launcher: tests/system/test_prometheus.py ends its run that way and checks exit code 75.
    preempt_and_resume(tmp_path, uninterrupted, lambda p, run: os.kill(p.pid, sig), launcher="launcher")
