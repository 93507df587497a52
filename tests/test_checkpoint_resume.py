"""Exact resume: 2N steps straight == N steps, stop, fresh process(es), N more (bitwise on the CPU)."""
import os

import pytest

from tests.train_helpers import assert_bitwise_equal, audit, checkpoint_tensors, final_checkpoint, run_train

N = 8


@pytest.mark.parametrize("backend,nproc,extra", [
    ("single", 1, []),
    ("fsdp", 2, []),
    ("zero", 2, ["parallel.zero_stage=3"]),
])
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
        # DeepSpeed's own files: compare the consolidated fp32 weights and our EMA export bitwise.
        from safetensors.torch import load_file
        for name in ("export.safetensors",):
            a, b = load_file(straight / name), load_file(resumed / name)
            assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
        a, b = load_file(os.path.join(final_checkpoint(straight), "ema.safetensors")), \
            load_file(os.path.join(final_checkpoint(resumed), "ema.safetensors"))
        assert all((a[k] == b[k]).all() for k in a)
        return
    assert_bitwise_equal(checkpoint_tensors(final_checkpoint(straight)), checkpoint_tensors(final_checkpoint(resumed)))
