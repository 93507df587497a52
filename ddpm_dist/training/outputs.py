"""What training writes besides checkpoints: sample grids from the EMA weights, and at the end the export
(EMA and raw weights in safetensors), a final grid and the training curves."""

from __future__ import annotations

import logging
import os
import time

from ..artifacts import save_export
from ..config import to_dict
from ..data import read_all
from ..drawing import auto_scale, plot_curves, save_grid
from ..drawing.figures import mean_pairwise_distance
from ..models import UNet
from ..parallel.collectives import barrier
from ..sampling import SamplingSetup, SuperResolution, make_batch
from ..sampling.tasks import Generate

log = logging.getLogger(__name__)


def ema_model(run) -> UNet:
    """A plain single-device model with the run's EMA weights (gathering is collective: every rank calls it)."""
    model = UNet(run.model_cfg)
    model.load_state_dict(run.ema.full_state())
    return model.to(run.engine.device).eval()


def sample_grid(run, images: int, name: str = "") -> None:
    """A grid from the EMA weights with the run's sampler: one row per class for class-conditional models,
    super-resolutions of the first training images for super-resolution runs."""
    cfg, model_cfg, metrics = run.cfg, run.model_cfg, run.metrics
    model = ema_model(run)
    if run.is_main:
        setup = SamplingSetup.for_model(model, cfg.diffusion, cfg.sample, "EMA")
        classes = model_cfg.num_classes
        n = 100 if classes and cfg.train.sample_grid_classes else cfg.train.sample_grid_images
        labels = sorted(i % classes for i in range(n)) if classes else None  # rows of 10: one class per row
        task = Generate()
        if cfg.train.sr_factor:
            task = SuperResolution(read_all(cfg.data.source, limit=n, split="held-out")[0], cfg.train.sr_factor)
            n = len(task.images)
        t0 = time.perf_counter()
        x = make_batch(setup, list(range(n)), seed=cfg.seed, labels=labels, task=task)
        path = os.path.join(cfg.run_dir, "samples", name or f"grid_{images:09d}.png")
        save_grid(x, path, nrow=10 if labels else 8, scale=auto_scale(model_cfg.image_size))
        log.info("sample grid: %s", path)
        metrics.sampling(images=n, images_per_s=n / max(time.perf_counter() - t0, 1e-9))
        metrics.samples(images=images, diversity=mean_pairwise_distance(x), path=path)
    barrier()


def write_final(run) -> None:
    """Export (EMA + raw weights, safetensors), a final sample grid and the training curves."""
    cfg, progress, is_main = run.cfg, run.progress, run.is_main
    ema_full, raw_full = run.ema.full_state(), run.engine.full_model_state()
    if is_main:
        resolved = to_dict(cfg)
        path = save_export(
            os.path.join(cfg.run_dir, "export.safetensors"),
            ema_full,
            raw_full,
            run.model_cfg,
            {
                "step": progress.step,
                "images": progress.images,
                "diffusion": resolved["diffusion"],
                "sample": resolved["sample"],
            },
        )
        log.info("export: %s", path)
    sample_grid(run, progress.images, name="final_grid.png")
    if is_main and cfg.metrics.jsonl:
        try:
            log.info(
                "curves: %s",
                plot_curves(os.path.join(cfg.run_dir, "metrics.jsonl"), os.path.join(cfg.run_dir, "curves.png")),
            )
        except ValueError as e:  # too short a run to have a logged row
            log.info("no curves: %s", e)
