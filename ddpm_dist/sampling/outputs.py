"""Rank 0, once every image of a sampling job exists: check completeness, then the pictures (grid,
trajectory, reverse-process GIF, the task's own figure), samples.npz and WebDataset shards."""

from __future__ import annotations

import io
import logging
import os

import numpy as np

from ..data import storage
from ..diffusion import TrajectoryRecorder
from ..drawing import auto_scale, grid, save_gif, save_image, trajectory_grid
from . import folder
from .setup import make_batch

log = logging.getLogger(__name__)
GRID_MAX = 100
TRAJECTORY_IMAGES = 8


def write_outputs(job, setup, task) -> dict:
    """Write what the job asked for; the task's measurements go into sampling.json under 'result'."""
    missing = set(range(job.num_images)) - folder.existing_indices(job.out)
    if missing:
        raise RuntimeError(f"{len(missing)} images missing after sampling (first {min(missing)})")
    local = storage.is_local(job.out)
    extras = job.extras == "yes" or (job.extras == "auto" and job.num_images <= 1000 and local)
    result = {}
    if not (extras or job.npz or job.tar or task.kind != "generate"):
        return result
    images = np.stack([folder.read_image(job.out, i) for i in range(job.num_images)])
    labels = task.labels(list(range(job.num_images)), job.classes, setup.num_classes, job.seed)
    if extras:
        out_dir = storage.local_path(job.out)
        order = sorted(range(min(len(images), GRID_MAX)), key=lambda i: (labels[i] if labels else 0, i))
        path = save_image(
            grid(images[order], job.grid_width or None, scale=auto_scale(images.shape[1])),
            os.path.join(out_dir, "grid.png"),
        )  # sorted by class: rows of one class each
        log.info("grid: %s", path)
        _trajectory(job, setup, task, labels, out_dir)
    if task.kind != "generate" and local:
        rows = task.rows(dict(enumerate(images)))
        width = max(len(r) for r in rows)
        pad = [np.concatenate([r, np.full((width - len(r), *r.shape[1:]), 255, np.uint8)]) for r in rows]
        result = task.measure(dict(enumerate(images)))
        result["picture"] = save_image(
            grid(np.concatenate(pad), nrow=width, scale=auto_scale(images.shape[1])),
            os.path.join(storage.local_path(job.out), task.picture),
        )
    if job.npz:
        buf = io.BytesIO()
        np.savez(buf, images=images, labels=np.array(labels if labels else [-1] * len(images)))
        storage.write_bytes_atomic(storage.join(job.out, "samples.npz"), buf.getvalue())
        log.info("npz: %s", storage.redact(storage.join(job.out, "samples.npz")))
    if job.tar:
        from ..data.shard_sets import build_shards

        src = ((f"sample{i:06d}", images[i], labels[i] if labels else None) for i in range(len(images)))
        build_shards(
            src, storage.join(job.out, "shards"), prefix="samples", shuffle_seed=None, overwrite=True, progress=False
        )
    if result:
        folder.write_provenance(job.out, {**folder.read_provenance(job.out), "result": result})
    return result


def _trajectory(job, setup, task, labels, out_dir: str) -> None:
    """The reverse process of the first images: x_t and predicted x0 as pictures, x_t as a GIF."""
    rec = TrajectoryRecorder(record_at=None)
    k = min(TRAJECTORY_IMAGES, job.num_images)
    x = make_batch(
        setup, list(range(k)), seed=job.seed, labels=labels[:k] if labels else None, task=task, callback=rec
    ).cpu()
    keep = np.unique(np.linspace(0, len(rec.x_t) - 1, min(10, len(rec.x_t))).round().astype(int))
    log.info(
        "trajectory: %s", trajectory_grid([rec.x_t[i] for i in keep] + [x], os.path.join(out_dir, "trajectory.png"))
    )
    trajectory_grid([rec.x0[i] for i in keep] + [x], os.path.join(out_dir, "trajectory_x0.png"))
    log.info(
        "animation: %s", save_gif(rec.x_t[:: max(1, len(rec.x_t) // 40)] + [x], os.path.join(out_dir, "reverse.gif"))
    )
