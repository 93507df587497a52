"""Exact resume: 2N steps straight == N steps, stop, fresh process(es), N more (bitwise on the CPU)."""

import pytest

from tests.support.train_helpers import assert_bitwise_equal, audit, checkpoint_tensors, final_checkpoint, run_train

N = 8


@pytest.mark.parametrize(
    "backend,nproc,extra",
    [
        ("single", 1, []),
        ("fsdp", 2, []),
        ("zero", 2, ["parallel.zero_stage=3"]),
    ],
)
def test_exact_resume(tmp_path, backend, nproc, extra):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    opts = [f"parallel.backend={backend}", *extra]
    run_train(straight, 2 * N, *opts, nproc=nproc)
    first = run_train(resumed, N, *opts, nproc=nproc)
    assert "resumed from" not in first.stderr
    second = run_train(resumed, 2 * N, *opts, nproc=nproc)
    assert f"resumed from {resumed}/checkpoints/step_{N:09d}" in second.stderr
    for rank in range(nproc):
        assert audit(straight, rank) == audit(resumed, rank)  # the data stream saw the same samples
    if backend == "zero":
        # DeepSpeed's own files: compare the consolidated fp32 weights (the export) and the EMA bitwise.
        from safetensors.torch import load_file

        from ddpm_dist.artifacts import load_checkpoint_weights

        a, b = load_file(straight / "export.safetensors"), load_file(resumed / "export.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
        a, b = (load_checkpoint_weights(final_checkpoint(r), "ema")[0] for r in (straight, resumed))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
        return
    assert_bitwise_equal(checkpoint_tensors(final_checkpoint(straight)), checkpoint_tensors(final_checkpoint(resumed)))


@pytest.mark.distributed
@pytest.mark.parametrize("backend,world_size,zero_stage", [("single", 1, 2), ("fsdp", 2, 2), ("zero", 2, 3)])
def test_resume_is_one_call_of_the_manager(tmp_path, backend, world_size, zero_stage):
    """Engine, EMA, progress, data cursor and LR schedule restored by CheckpointManager.restore_latest() alone:
    two more steps from fresh components (another initial seed) equal two more steps of the originals, bitwise."""
    import json

    import torch
    from safetensors.torch import load_file

    from tests.support.dist_workers import resume_worker, spawn

    spawn(resume_worker, world_size, str(tmp_path), backend, zero_stage)
    a, b = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and len(a) > 20
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert json.load(open(tmp_path / "straight.json")) == json.load(open(tmp_path / "resumed.json"))
