"""Post-hoc EMA runs for tests/distributed/test_posthoc_ema.py: the tiny UNet on a fixed batch, power-function EMA
profiles and their snapshots, plus a ground-truth profile tracked in full (never snapshotted). Top level, so spawn
can pickle."""

import dataclasses
import json
import os

import torch

GLOBAL_BATCH = 8


def profiles_run(rank, world_size, run_dir, backend, stds, truth_stds, steps, snapshot_every_steps, zero_stage=2):
    """`steps` optimizer steps; profiles at `stds` snapshotted every `snapshot_every_steps` under run_dir; rank 0 writes
    truth.safetensors (the full power EMAs at `truth_stds`, tracked explicitly) and every rank bytes-<rank>.json."""
    from safetensors.torch import save_file

    from ddpm_dist.config import ParallelConfig, TrainConfig, load_config
    from ddpm_dist.models import UNet, resolve_model_config
    from ddpm_dist.parallel.seeding import seed_everything
    from ddpm_dist.posthoc.power import PowerEMA
    from ddpm_dist.posthoc.snapshots import SnapshotWriter
    from ddpm_dist.training.loop import StepRecipe, run_step
    from tests.support.dist_workers import make_engine, synthetic_batch

    cfg = load_config(None, ["model.preset=tiny", f"train.global_batch={GLOBAL_BATCH}", "diffusion.num_steps=100"])
    model_cfg = resolve_model_config(cfg.model)
    seed_everything(0)
    micro = GLOBAL_BATCH // world_size
    engine = make_engine(
        model_cfg, ParallelConfig(backend=backend, zero_stage=zero_stage), TrainConfig(lr=2e-3, grad_clip=1.0), micro
    )
    power, truth = PowerEMA(engine, stds), PowerEMA(engine, truth_stds)
    writer = SnapshotWriter(run_dir, rank, dataclasses.asdict(model_cfg))
    schedule = cfg.diffusion.make_schedule()
    x, y = synthetic_batch(GLOBAL_BATCH, model_cfg.in_channels, model_cfg.image_size, model_cfg.num_classes)
    for step in range(steps):
        s = slice(rank * micro, (rank + 1) * micro)
        run_step(
            engine,
            schedule,
            [{"image": x[s], "label": y[s]}],
            step=step,
            rank=rank,
            world_size=world_size,
            recipe=StepRecipe.of(cfg, 0),
            lr=2e-3,
        )
        images = (step + 1) * GLOBAL_BATCH
        power.update(images, GLOBAL_BATCH)
        truth.update(images, GLOBAL_BATCH)
        if (step + 1) % snapshot_every_steps == 0:
            writer.write(images, power)
    with open(os.path.join(run_dir, f"bytes-{rank}.json"), "w") as f:
        json.dump({"power_ema": power.local_bytes(), "numel": sum(p.numel() for p in UNet(model_cfg).parameters())}, f)
    full = {f"{std:.4f}.{k}": v for std, _, p in truth.items() for k, v in p.full_state().items()}
    full.update({f"raw.{k}": v for k, v in engine.full_model_state().items()})
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(run_dir, "truth.safetensors"))


def snapshot_weights(path: str) -> dict[str, torch.Tensor]:
    """A snapshot's full fp32 weights, read in one process without a process group (DCP reshards)."""
    import warnings

    from ddpm_dist.artifacts import load_dcp
    from ddpm_dist.posthoc.reconstruct import param_shapes
    from ddpm_dist.posthoc.snapshots import read_snapshot_meta

    template = {k: torch.empty(s) for k, s in param_shapes(read_snapshot_meta(path)["model_config"]).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        load_dcp({"ema": template}, path, no_dist=True)
    return template
