"""Checkpoints that prove themselves across ranks: 2 gloo ranks under FSDP2 and ZeRO-3 save four checkpoints, then
the newest is corrupted again and again (a flipped byte in a file another rank wrote, a truncated file, a deleted
file): each restore by fresh managers falls back to the previous checkpoint, bitwise, with one line naming the file;
with every one corrupt, every rank raises the same one-line error (no rank hangs)."""

import json
import logging
import os

import pytest
import torch

from tests.support.dist_workers import make_engine, spawn


def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def _victims(ckpt: str, backend: str) -> list[tuple[str, str]]:
    """(kind, file) for the corruptions of steps 4, 3, 2: what rank 1 wrote first (its DCP file, or a DeepSpeed file of
    rank 1's share), then rank 0's DCP file, then the DCP metadata."""
    files = sorted(json.load(open(os.path.join(ckpt, "COMMITTED")))["files"])
    native = [f for f in files if f.startswith("engine/") and "rank_1" in f]
    first = native[0] if backend == "zero" else "__1_0.distcp"
    assert first in files and "__0_0.distcp" in files, files
    return [("flipped", first), ("truncated", "__0_0.distcp"), ("deleted", ".metadata")]


def integrity_worker(rank, world_size, out_dir, backend):
    from ddpm_dist.artifacts import CheckpointError
    from ddpm_dist.config import ParallelConfig, TrainConfig, load_config
    from ddpm_dist.models import resolve_model_config
    from ddpm_dist.parallel.sharded_ema import ShardedEMA
    from ddpm_dist.training.checkpoint import CheckpointManager
    from ddpm_dist.training.loop import StepRecipe, run_step
    from ddpm_dist.training.state import Progress
    from tests.support.dist_workers import synthetic_batch

    cfg = load_config(None, ["model.preset=tiny", "train.global_batch=4", "diffusion.num_steps=100"])
    model_cfg = resolve_model_config(cfg.model)
    parallel = ParallelConfig(backend=backend, zero_stage=3)
    engine = make_engine(model_cfg, parallel, TrainConfig(lr=1e-3, grad_clip=1.0), micro_batch=2)
    parts = {"engine": engine, "ema": ShardedEMA(engine), "progress": Progress()}
    directory = os.path.join(out_dir, "ck")

    def manager():
        return CheckpointManager(directory, parts, rank=rank, keep_last=10, identity={"backend": backend})

    x, y = synthetic_batch(4, channels=model_cfg.in_channels, size=model_cfg.image_size)
    batch = {"image": x[rank * 2 : rank * 2 + 2], "label": y[rank * 2 : rank * 2 + 2]}
    saving, weights = manager(), {}
    for step in range(1, 5):
        recipe = StepRecipe.of(cfg, model_cfg.num_classes)
        run_step(
            engine, cfg.diffusion.make_schedule(), [batch], step=step, rank=rank, world_size=2, recipe=recipe, lr=1e-3
        )
        parts["progress"].step = step
        saving.save(step, 4 * step)
        weights[step] = engine.full_model_state()

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("ddpm_dist.training.checkpoint").addHandler(handler)
    result = {"restored": [], "equal": [], "lines": lines}
    victims = _victims(os.path.join(directory, "step_000000004"), backend)
    for step, (kind, name) in zip((4, 3, 2), victims):
        if rank == 0:
            path = os.path.join(directory, f"step_{step:09d}", name)
            {"flipped": _flip, "truncated": lambda p: os.truncate(p, 1000), "deleted": os.unlink}[kind](path)
        torch.distributed.barrier()
        with torch.no_grad():  # the restore must bring back every weight
            for p in engine.module.parameters():
                p.zero_() if backend != "zero" else None
        meta = manager().restore_latest()
        now = engine.full_model_state()
        result["restored"].append([meta["step"], parts["progress"].step])
        result["equal"].append(all(torch.equal(now[k], weights[step - 1][k]) for k in now))
    if rank == 0:
        first = os.path.join(directory, "step_000000001")
        _flip(os.path.join(first, _victims(first, backend)[0][1]))
    torch.distributed.barrier()
    try:
        manager().restore_latest()
    except CheckpointError as e:
        result["error"] = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["fsdp", "zero"])
def test_a_corrupt_checkpoint_falls_back_on_every_rank(tmp_path, backend):
    spawn(integrity_worker, 2, str(tmp_path), backend)
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r in results:
        assert r["restored"] == [[3, 3], [2, 2], [1, 1]] and r["equal"] == [True, True, True], r
        assert "every committed checkpoint under" in r["error"] and "step_000000001/" in r["error"], r["error"]
    lines = results[0]["lines"]
    warned = [line for line in lines if "is corrupt" in line]
    assert len(warned) == 3 and not results[1]["lines"], lines  # one line per corrupt checkpoint, from rank 0
    said = ["altered", "truncated", "missing"]
    for line, step, (kind, name) in zip(warned, (4, 3, 2), zip(said, ["", "__0_0.distcp", ".metadata"])):
        assert f"step_{step:09d}/" in line and f"' is {kind}" in line and name in line, line
        assert f"falling back to step_{step - 1:09d}" in line
    ck = sorted(os.listdir(tmp_path / "ck"))
    assert ck == ["corrupt-step_000000002", "corrupt-step_000000003", "corrupt-step_000000004", "step_000000001"]
