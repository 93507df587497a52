"""Checkpoints that survive upgrades: run directories of today's format, committed under tests/fixtures/checkpoint_v2
(tests/support/make_fixture_checkpoints.py wrote them), resume with the current code bitwise as the uninterrupted
run that wrote them continued.

Each case (`single`: one process; `fsdp2`: FSDP2 on 2 gloo ranks under torchrun) holds a tiny digits run stopped
at step 4 — model, Adam, the half-life EMA, two post-hoc EMA profiles with their snapshots, the data cursor, the LR
schedule, each file with its digest — and expected.json: the straight 8-step run's losses of steps 5-8, the samples
each rank drew, and digests of its step-8 checkpoint and post-hoc EMA snapshots. A copy is resumed from its own
config.yaml to step 8 and must give exactly those. A change of the format must ship a converter or keep this green
(tests/fixtures/checkpoint_v2/README.md).

Exactly means bitwise on a CPU whose kernels round as the generating machine's did (the digests say so). Elsewhere
(another instruction set: oneDNN picks other convolution algorithms) every value that is not a float tensor must
still be equal, and each float tensor within 1e-4 of expected.safetensors in relative L2 norm (the straight run's
tensors): rounding differences only, amplified by Adam's normalised steps (measured across two CPUs: 6.6e-7
single, 3.6e-6 fsdp2), while one AdamW step at lr 1e-3 moves a weight of ~0.1 by ~1e-2. Losses within 1e-5
relative."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ddpm_dist.checkpoints import verify_run
from tests.support.make_fixture_checkpoints import (
    CASES,
    EXPECTED_TENSORS,
    FIXTURE,
    audits,
    digests,
    split_values,
    train_losses,
)
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
    os.unlink(run_dir / EXPECTED_TENSORS)
    step = expected["fixture_step"]
    rows = verify_run(str(run_dir))  # the copy proves itself: every checkpoint and snapshot has digests and matches
    assert rows and all(verdict == "OK" and not detail for _, verdict, detail in rows), rows

    r = run_command(resume_cmd(run_dir, expected["nproc"], expected["resumed_to_images"]), timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resumed from {run_dir}/checkpoints/step_{step:09d} (step {step}," in r.stderr, r.stderr[-4000:]
    assert "corrupt" not in r.stderr and "unverified" not in r.stderr, r.stderr[-4000:]

    losses = train_losses(run_dir, step)
    assert losses.keys() == expected["losses"].keys()
    assert all(abs(losses[k] / expected["losses"][k] - 1) <= 1e-5 for k in losses), (losses, expected["losses"])
    assert audits(run_dir, expected["nproc"], step) == expected["audit"]  # the data cursor: the same samples
    assert os.path.basename(final_checkpoint(run_dir)) == f"step_{expected['resumed_to_images'] // 16:09d}"
    stored = load_file(os.path.join(FIXTURE, case, EXPECTED_TENSORS))
    final = checkpoint_tensors(final_checkpoint(run_dir))
    snapshots = snapshot_tensors(run_dir)  # the fixture's snapshots and those written after the resume
    bitwise = digests(final) == expected["final_checkpoint"] and digests(snapshots) == expected["snapshots"]
    print(
        f"\n{case}: resumed {'bitwise' if bitwise else 'within rounding'} as the straight run ({expected['made_by']})"
    )
    assert_continues(final, "final/", stored, expected["final_values"])
    assert_continues(snapshots, "snapshots/", stored, expected["snapshot_values"])


def assert_continues(flat: dict, prefix: str, stored: dict, values: dict) -> None:
    tensors, other = split_values(flat, prefix)
    assert other == values
    assert tensors.keys() == {k for k in stored if k.startswith(prefix)}
    far = {}
    for key, got in tensors.items():
        want = stored[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if not want.is_floating_point():
            assert torch.equal(got, want), key
            continue
        error = (got.double() - want.double()).norm() / max(want.double().norm().item(), 1e-30)
        if error > 1e-4:
            far[key] = error.item()
    assert not far, far
