"""Checkpoints, EMA snapshots and exports that prove themselves (artifacts/digests.py): the digests in a marker are
those of the files on disk, sync and async; a flipped byte, a truncated or a deleted file in the newest checkpoint
makes the restore fall back to the previous one with one line naming the file, the corrupt one kept aside; every
one corrupt is a one-line error; checkpoints and exports written before digests still load."""

import json
import logging
import os

import pytest
import torch

from ddpm_dist.artifacts import CheckpointError, load_dcp, load_export, save_export
from ddpm_dist.artifacts.digests import MARKER, file_record, read_marker, verify_dir
from ddpm_dist.config import ParallelConfig, TrainConfig
from ddpm_dist.models import resolve_model_config
from ddpm_dist.parallel.sharded_ema import ShardedEMA
from ddpm_dist.training.checkpoint import CheckpointManager
from ddpm_dist.training.state import Progress
from tests.support.dist_workers import make_engine

CFG = resolve_model_config("tiny")
LOG = "ddpm_dist.training.checkpoint"


def flip(path, where=0.5):
    data = bytearray(open(path, "rb").read())
    data[int(len(data) * where)] ^= 0x01
    open(path, "wb").write(bytes(data))


def truncate(path):
    os.truncate(path, os.path.getsize(path) - 100)


CORRUPT = {"flipped": flip, "truncated": truncate, "deleted": os.unlink}
SAID = {"flipped": "altered", "truncated": "truncated", "deleted": "missing"}


@pytest.fixture
def parts():
    torch.manual_seed(0)
    engine = make_engine(CFG, ParallelConfig(backend="single"), TrainConfig(lr=1e-3, grad_clip=1.0))
    return {"engine": engine, "ema": ShardedEMA(engine), "progress": Progress()}


def save_steps(directory, parts, steps, **kwargs) -> dict:
    """A checkpoint at each step, the weights changed before each; each step's weights."""
    manager = CheckpointManager(directory, parts, rank=0, keep_last=10, **kwargs)
    weights = {}
    for step in steps:
        with torch.no_grad():
            for p in parts["engine"].module.parameters():
                p.add_(0.01 * step)
        parts["progress"].step, parts["progress"].images = step, 8 * step
        manager.save(step, 8 * step)
        manager.wait()
        weights[step] = parts["engine"].full_model_state()
    return weights


def restore(directory, parts) -> dict:
    return CheckpointManager(directory, parts, rank=0, keep_last=10).restore_latest()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_marker_holds_the_digest_of_every_file_on_disk(tmp_path, parts, mode):
    save_steps(str(tmp_path), parts, [1], async_save=mode == "async")
    ckpt = tmp_path / "step_000000001"
    files = read_marker(str(ckpt))["files"]
    on_disk = {n for n in os.listdir(ckpt) if n != MARKER}
    assert set(files) == on_disk and {".metadata", "__0_0.distcp", "meta.json"} <= on_disk
    assert all(files[n] == file_record(str(ckpt / n)) for n in on_disk)
    assert verify_dir(str(ckpt)).ok


@pytest.mark.parametrize(
    "name,kind",
    [("__0_0.distcp", k) for k in sorted(CORRUPT)] + [(".metadata", "flipped"), ("meta.json", "truncated")],
)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, parts, caplog, kind, name):
    weights = save_steps(str(tmp_path), parts, [1, 2])
    CORRUPT[kind](tmp_path / "step_000000002" / name)
    with caplog.at_level(logging.WARNING, logger=LOG):
        meta = restore(str(tmp_path), parts)
    assert meta["step"] == 1 and parts["progress"].step == 1
    restored = parts["engine"].full_model_state()
    assert all(torch.equal(restored[k], weights[1][k]) for k in weights[1])
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and f"step_000000002/{name}' is {SAID[kind]}" in lines[0], lines
    kept = tmp_path / "corrupt-step_000000002"  # the evidence, out of the way of pruning and resumes
    assert sorted(os.listdir(tmp_path)) == ["corrupt-step_000000002", "step_000000001"]
    assert (kept / MARKER).exists() and not verify_dir(str(kept)).ok


def test_the_corrupt_one_is_not_pruned_nor_replaced_by_later_saves(tmp_path, parts):
    save_steps(str(tmp_path), parts, [1, 2])
    flip(tmp_path / "step_000000002" / "__0_0.distcp")
    before = sorted(os.listdir(tmp_path / "step_000000002"))
    manager = CheckpointManager(str(tmp_path), parts, rank=0, keep_last=1)
    assert manager.restore_latest()["step"] == 1
    manager.save(2, 16)  # the same step again, then pruning keeps the newest only
    manager.save(3, 24)
    assert sorted(os.listdir(tmp_path)) == ["corrupt-step_000000002", "step_000000003"]
    assert sorted(os.listdir(tmp_path / "corrupt-step_000000002")) == before


def test_every_checkpoint_corrupt_is_one_error_and_nothing_moves(tmp_path, parts):
    save_steps(str(tmp_path), parts, [1, 2])
    flip(tmp_path / "step_000000001" / "__0_0.distcp")
    truncate(tmp_path / "step_000000002" / "__0_0.distcp")
    with pytest.raises(CheckpointError) as e:
        restore(str(tmp_path), parts)
    line = str(e.value)
    assert "\n" not in line and "every committed checkpoint" in line and "step_000000002/__0_0.distcp" in line
    assert sorted(os.listdir(tmp_path)) == ["step_000000001", "step_000000002"]


def test_a_checkpoint_without_digests_loads_unverified(tmp_path, parts, caplog):
    weights = save_steps(str(tmp_path), parts, [1])
    ckpt = tmp_path / "step_000000001"
    (ckpt / MARKER).write_text(json.dumps({"step": 1, "time": 0.0}))  # as the code before digests wrote it
    with caplog.at_level(logging.INFO, logger=LOG):
        assert restore(str(tmp_path), parts)["step"] == 1
    assert [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()][0].count("step_000000001") == 1
    restored = parts["engine"].full_model_state()
    assert all(torch.equal(restored[k], weights[1][k]) for k in weights[1])


def test_load_dcp_refuses_a_corrupt_directory(tmp_path, parts):
    save_steps(str(tmp_path), parts, [1])
    ckpt = str(tmp_path / "step_000000001")
    state = {"ema": {k: torch.zeros_like(v) for k, v in parts["ema"].state_dict().items()}}
    load_dcp(state, ckpt, no_dist=True)
    flip(os.path.join(ckpt, "__0_0.distcp"), 0.9)
    with pytest.raises(CheckpointError, match="corrupt checkpoint .*__0_0.distcp' is altered"):
        load_dcp(state, ckpt, no_dist=True)


def test_an_ema_snapshot_proves_itself(tmp_path, parts):
    from ddpm_dist.posthoc.power import PowerEMA
    from ddpm_dist.posthoc.snapshots import SnapshotWriter, committed_snapshots

    SnapshotWriter(str(tmp_path), 0, {}).write(64, PowerEMA(parts["engine"], [0.05]))
    (snap,) = committed_snapshots(str(tmp_path / "ema_snapshots"))
    assert set(read_marker(snap.path)["files"]) == {".metadata", "__0_0.distcp", "snapshot.json"}
    assert verify_dir(snap.path).ok
    truncate(os.path.join(snap.path, "__0_0.distcp"))
    state = {"ema": {k: torch.zeros_like(v) for k, v in parts["ema"].state_dict().items()}}
    with pytest.raises(CheckpointError, match="__0_0.distcp' is truncated"):
        load_dcp(state, snap.path, no_dist=True)  # what ema reconstruct and sweep read snapshots with


def test_an_export_proves_itself(tmp_path):
    ema = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    path = str(tmp_path / "export.safetensors")
    save_export(path, ema, None, {"image_size": 8}, {"step": 3})
    weights, _, info = load_export(path)
    assert torch.equal(weights["a"], ema["a"]) and info == {"step": 3}
    flip(path, 0.97)  # in the tensor bytes, at the end of the file
    with pytest.raises(CheckpointError, match="corrupt export: .* is altered \\(tensor 'ema\\."):
        load_export(path)
    os.truncate(path, os.path.getsize(path) - 3)
    with pytest.raises(CheckpointError, match="corrupt export"):
        load_export(path)
    from safetensors.torch import save_file

    meta = {"format": "ddpm_dist.export/1", "model_config": json.dumps({"image_size": 8})}
    save_file({f"ema.{k}": v for k, v in ema.items()}, path, metadata=meta)  # as the code before digests wrote it
    assert torch.equal(load_export(path)[0]["b"], ema["b"])
