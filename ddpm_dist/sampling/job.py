"""A sampling job: every rank generates its share of the images into a folder (or any fsspec URL) and
rank 0 finishes the extras. A re-run with the same job only makes what is missing."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm import tqdm

from ..artifacts import load_trained
from ..config import MetricsConfig
from ..data import storage
from ..obs.log import setup_logging
from ..obs.metrics import Metrics
from ..parallel.collectives import all_reduce_sum_, barrier
from ..parallel.env import init_distributed, read_env, shutdown
from . import folder
from .outputs import write_outputs
from .plan import plan_batches, rank_share
from .setup import make_share, prepare
from .tasks import TaskSpec, build_task

log = logging.getLogger(__name__)


@dataclass
class SampleJob:
    source: str  # a run directory (newest committed checkpoint) or an export file
    out: str  # a folder or fsspec URL
    weights: str = "ema"  # or "model" (raw weights)
    checkpoint: str = "latest"  # of a run directory: latest, or best (lowest in-training Fréchet distance)
    num_images: int = 64
    batch_size: int = 64
    seed: int = 0
    classes: Optional[str] = None  # 'random', 'none' or a comma list (see plan.labels_for)
    sampler: dict = field(default_factory=dict)  # SamplerOptions fields overriding the run's sample section
    task: TaskSpec = field(default_factory=TaskSpec)
    extras: str = "auto"  # grid, trajectory, GIF: yes | no | auto (<= 1000 images and a local folder)
    grid_width: int = 0  # images per grid row (0: square)
    npz: bool = False
    tar: bool = False
    compile: bool = False  # torch.compile the network
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(jsonl=False))

    def validate(self) -> None:
        if self.num_images <= 0 or self.batch_size <= 0:
            raise ValueError("--num-images and --batch-size must be positive")
        if self.checkpoint != "latest" and os.path.isfile(self.source):
            raise ValueError(f"--checkpoint {self.checkpoint} chooses among a run's checkpoints: use --run DIR")


def sample_to_folder(job: SampleJob) -> None:
    """One rank's share: load the model, generate its batches, write PNGs; rank 0 finishes the extras."""
    env = read_env()
    setup_logging(env.rank)
    env = init_distributed(env)
    metrics = None
    try:
        trained = load_trained(job.source, job.weights, job.checkpoint)
        setup = prepare(trained, env.device, job.sampler, compile=job.compile)
        task = build_task(job.task, trained.config, job.seed)
        if env.rank == 0:
            log.info(
                "sampling %d images (%s) from %s: %s, %d worker(s), batch %d",
                job.num_images,
                task.kind,
                setup.source,
                setup.options.describe(),
                env.world_size,
                job.batch_size,
            )
            labels = task.labels(list(range(job.num_images)), job.classes, setup.num_classes, job.seed)
            folder.write_provenance(
                job.out,
                {
                    "source": setup.source,
                    "num_images": job.num_images,
                    "seed": job.seed,
                    "batch_size": job.batch_size,
                    "classes": job.classes,
                    "weights": job.weights,
                    "task": task.kind,
                    **setup.options.to_dict(),
                    "labels": labels,
                },
            )
            folder.remove_debris(job.out)
        barrier()
        done = folder.existing_indices(job.out)
        share = rank_share(plan_batches(job.num_images, job.batch_size, done), env.rank, env.world_size)
        metrics = Metrics(
            job.metrics,
            rank=env.rank,
            local_rank=env.local_rank,
            world_size=env.world_size,
            run=os.path.basename(str(job.out).rstrip("/")),
        )
        _generate(job, setup, task, share, done, env, metrics)
        barrier()
        if env.rank == 0:
            write_outputs(job, setup, task)
    finally:
        if metrics is not None:
            metrics.close()
        shutdown()


def _generate(job, setup, task, share, done, env, metrics) -> None:
    bar = tqdm(
        total=job.num_images,
        initial=len(done & set(range(job.num_images))),
        desc="sampling",
        unit="img",
        disable=env.rank != 0,
        dynamic_ncols=True,
    )
    t0, made, local_made = time.perf_counter(), 0, 0
    for indices, images, _, fresh in make_share(
        setup, share, seed=job.seed, classes=job.classes, num_images=job.num_images, task=task
    ):
        count = 0
        for i, img in zip(indices, images):
            if fresh and i not in done:
                folder.write_image(job.out, i, img)
                count += 1
        local_made += count
        metrics.sampling(images=count, images_per_s=local_made / max(time.perf_counter() - t0, 1e-9))
        # The bar shows the global count; every rank runs the same number of batches.
        count = int(all_reduce_sum_(torch.tensor([float(count)], device=env.device)).item())
        made += count
        bar.update(count)
        bar.set_postfix(img_per_s=f"{made / max(time.perf_counter() - t0, 1e-9):.2f}")
    bar.close()


def summary(job: SampleJob) -> list[str]:
    """What the finished job reports (read back from its provenance)."""
    info = folder.read_provenance(job.out)
    lines = [f"{job.num_images} images in {storage.redact(job.out)}"]
    result = info.get("result", {})
    if "summary" in result:
        lines.append(f"{result['summary']} -> {result.get('picture')}")
    return lines
