"""System tests on a real single-node SLURM cluster: a 2-task training job preempted with scancel --signal,
requeued, resumed, finishing equal to an uninterrupted run; a 2-task sampling job."""

import os

import pytest

from tests.support.slurm_cluster import job_state, logs, preempt_and_finish, slurm, submit, wait_for  # noqa: F401 - fixture
from tests.support.train_helpers import assert_runs_equal, run_module, run_train, train_args

pytestmark = pytest.mark.system
STEPS = 60  # the preemption signal goes out after 20 steps, from evidence
OPTS = ["parallel.backend=fsdp"]
SAMPLE = "--num-images 10 --batch-size 4 --steps 3 --extras no".split()


def test_training_job_is_preempted_requeued_and_resumes_exactly(tmp_path, slurm):  # noqa: F811
    ref = tmp_path / "ref"
    run_train(ref, STEPS, *OPTS, nproc=2)
    run = tmp_path / "run"
    job = submit(tmp_path, "train", train_args(run, STEPS, *OPTS))
    preempt_and_finish(tmp_path, job, run, after_steps=20)
    assert job_state(job)[1] == 1
    assert_runs_equal(ref, run, ranks=(0, 1))


def test_sampling_job(tmp_path, slurm):  # noqa: F811
    run = tmp_path / "run"
    run_train(run, 4)
    out, local = tmp_path / "samples", tmp_path / "local"

    def args(folder) -> list[str]:
        return ["--export", str(run / "export.safetensors"), "--out", str(folder), *SAMPLE]

    job = submit(tmp_path, "sample", args(out))
    wait_for(lambda: job_state(job)[0] in ("COMPLETED", "FAILED", "CANCELLED"), 240, "sampling job did not end")
    assert job_state(job)[0] == "COMPLETED", logs(tmp_path, job)[-3000:]
    r = run_module("ddpm_dist.sample", *args(local))
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    assert names == [f"{i:06d}.png" for i in range(10)]
    assert all(open(out / n, "rb").read() == open(local / n, "rb").read() for n in names)
    assert "2 worker(s)" in logs(tmp_path, job)
