"""Resharding, wall-clock budget, and the faults a checkpoint must survive."""

import errno
import json
import os
import shutil

import pytest
import torch

from tests.support.dist_workers import make_engine, reshard_worker, spawn
from tests.support.train_helpers import checkpoint_tensors, final_checkpoint, run_train


def flatten(state, prefix=""):
    out = {}
    for k, v in state.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, (list, tuple)):
            out.update(flatten(dict(enumerate(v)), key))
        else:
            out[key] = v
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("saved_at,load_at", [(2, 1), (2, 4), (1, 2)])
def test_fsdp_checkpoint_reshards(tmp_path, saved_at, load_at):
    run = tmp_path / "run"
    run_train(run, 6, "parallel.backend=fsdp", nproc=saved_at)
    ckpt = final_checkpoint(run)
    expected = checkpoint_tensors(ckpt)  # every tensor, loaded without any process group
    out = tmp_path / "loaded.pt"
    spawn(reshard_worker, load_at, ckpt, str(out))
    got = flatten(torch.load(out, weights_only=True))
    tensors = {k: v for k, v in expected.items() if torch.is_tensor(v) and v.dim() > 0}
    assert len(tensors) > 100
    for k, v in tensors.items():
        assert torch.equal(got[k].float(), v.float()), k


def test_wall_clock_budget_saves_and_asks_for_requeue(tmp_path):
    r = run_train(tmp_path / "run", 100000, "train.max_wall_seconds=4", check=False)
    assert r.returncode == 75, r.stderr[-2000:]
    assert "wall-clock budget" in r.stderr
    ckpts = os.listdir(tmp_path / "run" / "checkpoints")
    assert len(ckpts) == 1 and os.path.exists(tmp_path / "run" / "checkpoints" / ckpts[0] / "COMMITTED")


def test_uncommitted_newer_checkpoint_is_ignored(tmp_path):
    run = tmp_path / "run"
    run_train(run, 4)
    good = final_checkpoint(run)
    fake = run / "checkpoints" / "step_000000099"  # newer, but no COMMITTED marker (e.g. died after the rename)
    shutil.copytree(good, fake)
    os.unlink(fake / "COMMITTED")
    with open(fake / "meta.json") as f:
        meta = json.load(f)
    meta["step"] = 99
    (fake / "meta.json").write_text(json.dumps(meta))
    truncated = run / "checkpoints" / "step_000000050"  # a truncated one
    truncated.mkdir()
    (truncated / "__0_0.distcp").write_bytes(b"\0" * 10)
    r = run_train(run, 8)
    assert f"resumed from {good} (step 4" in r.stderr
    assert "ignoring uncommitted checkpoint" in r.stderr


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run_train(run, 2)
    r = run_train(run, 4, "model.base_channels=32", check=False)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "another model" in line and "base_channels: 16 -> 32" in line


def test_checkpoint_of_another_backend_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run_train(run, 2)
    r = run_train(run, 4, "parallel.backend=zero", check=False)
    assert r.returncode == 2
    assert "backend" in r.stderr.strip().splitlines()[-1]


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from ddpm_dist.artifacts import CheckpointError
    from ddpm_dist.config import ParallelConfig, TrainConfig
    from ddpm_dist.models import resolve_model_config
    from ddpm_dist.parallel.sharded_ema import ShardedEMA
    from ddpm_dist.training.checkpoint import CheckpointManager

    cfg = resolve_model_config("tiny")
    engine = make_engine(cfg, ParallelConfig(backend="single"), TrainConfig(lr=1e-3, grad_clip=1.0))
    ema = ShardedEMA(engine)
    manager = CheckpointManager(str(tmp_path / "ck"), {"engine": engine, "ema": ema}, rank=0, keep_last=2)
    manager.save(1, 8)
    before = checkpoint_tensors(manager.latest())

    import torch.distributed.checkpoint.filesystem as fs

    real = fs._write_item

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "_write_item", full)
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    with pytest.raises(CheckpointError, match="previous one kept"):
        manager.save(2, 16)
    monkeypatch.setattr(fs, "_write_item", real)
    assert manager.latest().endswith("step_000000001")
    assert sorted(os.listdir(tmp_path / "ck")) == ["step_000000001"]
    after = checkpoint_tensors(manager.latest())
    assert all(torch.equal(before[k], after[k]) for k in before if torch.is_tensor(before[k]))


@pytest.mark.parametrize("backend,nproc", [("single", 1), ("fsdp", 2)])
def test_async_save_commits_the_same_state_as_sync(tmp_path, backend, nproc):
    """Async saves at steps 4 and 8: each is staged in the stager's thread while the next step's forward and
    backward run (the step waits for it before the optimizer update), the second into the first one's buffers."""
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    args = ["checkpoint.every_images=64", f"parallel.backend={backend}"]
    run_train(sync, 8, *args, nproc=nproc)
    run_train(asyn, 8, *args, "checkpoint.async_save=true", nproc=nproc)
    for step in (4, 8):
        a = checkpoint_tensors(str(sync / "checkpoints" / f"step_{step:09d}"))
        b = checkpoint_tensors(str(asyn / "checkpoints" / f"step_{step:09d}"))
        assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


@pytest.mark.distributed
def test_deepspeed_checkpoint_at_another_world_size_is_a_clear_error(tmp_path):
    """A ZeRO checkpoint resumes only at the world size that wrote it (docs/CHECKPOINTS.md); its EMA still
    loads anywhere."""
    run = tmp_path / "run"
    run_train(run, 4, "parallel.backend=zero", "parallel.zero_stage=2", nproc=2)
    r = run_train(run, 8, "parallel.backend=zero", "parallel.zero_stage=2", check=False)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "DeepSpeed ZeRO checkpoint of 2 ranks" in line and "not 1" in line, line
    from ddpm_dist.artifacts import load_checkpoint_weights

    weights, meta = load_checkpoint_weights(str(run))
    assert meta["formats"]["engine"] == "deepspeed" and len(weights) > 10
