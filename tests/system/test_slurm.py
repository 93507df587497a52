"""System tests on a real single-node SLURM cluster: a 2-task training job preempted with scancel --signal,
requeued, resumed, finishing equal to an uninterrupted run; a 2-task sampling job."""

import os
import subprocess

import pytest

from tests.support.common import PYTHON, ROOT
from tests.support.slurm_cluster import job_state, logs, preempt_and_finish, slurm, submit, wait_for  # noqa: F401 - fixture
from tests.support.train_helpers import (
    FAST,
    assert_bitwise_equal,
    audit,
    checkpoint_tensors,
    child_env,
    final_checkpoint,
    run_train,
)

pytestmark = pytest.mark.system
STEPS = 60  # the preemption signal goes out after 20 steps, from evidence
OPTS = ["parallel.backend=fsdp"]


def test_training_job_is_preempted_requeued_and_resumes_exactly(tmp_path, slurm):  # noqa: F811
    ref = tmp_path / "ref"
    run_train(ref, STEPS, *OPTS, nproc=2)
    run = tmp_path / "run"
    entry = ["--config", "configs/digits.yaml", f"run_dir={run}", *FAST, f"train.total_images={16 * STEPS}", *OPTS]
    job = submit(tmp_path, "train", entry)
    preempt_and_finish(tmp_path, job, run, after_steps=20)
    assert job_state(job)[1] == 1
    assert_bitwise_equal(checkpoint_tensors(final_checkpoint(ref)), checkpoint_tensors(final_checkpoint(run)))
    for rank in (0, 1):
        assert audit(ref, rank) == audit(run, rank)


def test_sampling_job(tmp_path, slurm):  # noqa: F811
    run = tmp_path / "run"
    run_train(run, 4)
    out = tmp_path / "samples"
    job = submit(
        tmp_path,
        "sample",
        [
            "--export",
            str(run / "export.safetensors"),
            "--out",
            str(out),
            "--num-images",
            "10",
            "--batch-size",
            "4",
            "--steps",
            "3",
            "--extras",
            "no",
        ],
    )
    wait_for(lambda: job_state(job)[0] in ("COMPLETED", "FAILED", "CANCELLED"), 240, "sampling job did not end")
    assert job_state(job)[0] == "COMPLETED", logs(tmp_path, job)[-3000:]
    local = tmp_path / "local"
    r = subprocess.run(
        [
            PYTHON,
            "-m",
            "ddpm_dist.sample",
            "--export",
            str(run / "export.safetensors"),
            "--out",
            str(local),
            "--num-images",
            "10",
            "--batch-size",
            "4",
            "--steps",
            "3",
            "--extras",
            "no",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    assert names == [f"{i:06d}.png" for i in range(10)]
    assert all(open(out / n, "rb").read() == open(local / n, "rb").read() for n in names)
    assert "2 worker(s)" in logs(tmp_path, job)
