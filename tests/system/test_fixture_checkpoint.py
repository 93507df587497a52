"""Checkpoints that survive upgrades: run directories of today's format, committed under tests/fixtures/checkpoint_v2
(tests/support/make_fixture_checkpoints.py wrote them), resume with the current code bitwise as the uninterrupted
run that wrote them continued.

Each case (`single`: one process; `fsdp2`: FSDP2 on 2 gloo ranks under torchrun) holds a tiny digits run stopped
at step 4 — model, Adam, the half-life EMA, two post-hoc EMA profiles with their snapshots, the data cursor, the LR
schedule, each file with its digest — and expected.json: the straight 8-step run's losses of steps 5-8, the samples
each rank drew, and digests of its step-8 checkpoint and post-hoc EMA snapshots. A copy is resumed from its own
config.yaml to step 8 and must give exactly those. A change of the format must ship a converter or keep this green
(tests/fixtures/checkpoint_v2/README.md)."""

import json
import os
import shutil

import pytest

from ddpm_dist.checkpoints import verify_run
from tests.support.make_fixture_checkpoints import CASES, FIXTURE, audits, digests, train_losses
from tests.support.train_helpers import PYTHON, checkpoint_tensors, final_checkpoint, run_command, snapshot_tensors


def resume_cmd(run_dir, nproc: int, images: int) -> list[str]:
    """ddpm_dist.train from the run directory's own config.yaml, as a user resumes a run: another place, more images."""
    train = ["-m", "ddpm_dist.train", "--config", f"{run_dir}/config.yaml", f"run_dir={run_dir}"]
    train.append(f"train.total_images={images}")
    if nproc == 1:
        return [PYTHON, *train]
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *train]


@pytest.mark.parametrize("case", list(CASES))
def test_a_committed_checkpoint_resumes_bitwise(tmp_path, case):
    expected = json.load(open(os.path.join(FIXTURE, case, "expected.json")))
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(FIXTURE, case), run_dir)
    os.unlink(run_dir / "expected.json")
    step = expected["fixture_step"]
    rows = verify_run(str(run_dir))  # the copy proves itself: every checkpoint and snapshot has digests and matches
    assert rows and all(verdict == "OK" and not detail for _, verdict, detail in rows), rows

    r = run_command(resume_cmd(run_dir, expected["nproc"], expected["resumed_to_images"]), timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resumed from {run_dir}/checkpoints/step_{step:09d} (step {step}," in r.stderr, r.stderr[-4000:]
    assert "corrupt" not in r.stderr and "unverified" not in r.stderr, r.stderr[-4000:]

    assert train_losses(run_dir, step) == expected["losses"]  # exact floats, step for step
    assert audits(run_dir, expected["nproc"], step) == expected["audit"]  # the data cursor: the same samples
    final = checkpoint_tensors(final_checkpoint(run_dir))
    assert os.path.basename(final_checkpoint(run_dir)) == f"step_{expected['resumed_to_images'] // 16:09d}"
    got = digests(final)
    assert got == expected["final_checkpoint"], [g for g in got if got[g] != expected["final_checkpoint"].get(g)]
    got = digests(snapshot_tensors(run_dir))  # the fixture's snapshots and those written after the resume
    assert got == expected["snapshots"], [g for g in got if got[g] != expected["snapshots"].get(g)]
