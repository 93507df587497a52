"""Seed-addressed generation, shared by `sample` (PNG files), `evaluate` (features in memory) and training
(sample grids, the in-training Fréchet distance). Image i of a run with seed s comes from its own
generator seeded by image_seed(s, i), with its own label and task input: the same image whatever batch
or rank makes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from ..artifacts import TrainedModel
from ..config import DiffusionConfig
from ..diffusion import SamplerOptions, Schedule, denoise_from_seeds, image_seed
from ..images import to_uint8
from .tasks import Generate

PLAIN = Generate()


@dataclass
class SamplingSetup:
    """A network ready to sample (on its device, eval mode) with its schedule and resolved sampler options."""

    model: torch.nn.Module
    schedule: Schedule
    options: SamplerOptions
    prediction: str
    shape: tuple  # C, H, W
    num_classes: int
    source: str

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, diffusion: DiffusionConfig, options: SamplerOptions, source: str
    ) -> "SamplingSetup":
        c = model.config
        options = options.resolved(diffusion.num_steps, conditional=bool(c.num_classes))
        return cls(
            model.eval(),
            diffusion.make_schedule(),
            options,
            diffusion.prediction,
            (c.in_channels, c.image_size, c.image_size),
            c.num_classes,
            source,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def prepare(
    trained: TrainedModel, device: torch.device, overrides: Optional[dict] = None, *, compile: bool = False
) -> SamplingSetup:
    """A trained model on `device`, sampled with its run's sampler settings updated by `overrides`; `compile`
    compiles the network in place (torch.compile: pays off over many steps and batches, not for a handful)."""
    options = trained.sampler.updated(**(overrides or {}))
    model = trained.model.to(device)
    if compile:
        model.compile(dynamic=False)  # a graph per batch shape (inductor failed on dynamic ones here)
    return SamplingSetup.for_model(model, trained.diffusion, options, trained.source)


def make_batch(
    setup: SamplingSetup,
    indices: list[int],
    *,
    seed: int,
    labels: Optional[list[int]] = None,
    task=PLAIN,
    callback=None,
) -> torch.Tensor:
    """The images of these indices in [-1, 1] (NCHW)."""
    device = setup.device
    return denoise_from_seeds(
        setup.model,
        setup.schedule,
        [image_seed(seed, i) for i in indices],
        setup.shape,
        setup.options,
        device=device,
        labels=labels,
        null_class=setup.num_classes or None,
        prediction=setup.prediction,
        model_kwargs=task.model_kwargs(indices, device),
        callback=callback,
        wrap_step=task.step_wrapper(indices, device),
    )


def make_share(
    setup: SamplingSetup, share, *, seed: int, classes: Optional[str], num_images: int, task=PLAIN
) -> Iterator[tuple[list[int], np.ndarray, Optional[list[int]], bool]]:
    """(indices < num_images, uint8 NHWC images, labels, fresh) for each batch of this rank's share."""
    for batch, fresh in share:
        labels = task.labels(batch, classes, setup.num_classes, seed)
        x = make_batch(setup, batch, seed=seed, labels=labels, task=task)
        keep = [k for k, i in enumerate(batch) if i < num_images]
        yield [batch[k] for k in keep], to_uint8(x)[keep], [labels[k] for k in keep] if labels else None, fresh
