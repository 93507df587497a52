"""Seed-addressed generation shared by `sample` (PNG files) and `evaluate` (features in memory).

Batch b holds images [b*B, (b+1)*B) whatever the world size (the last batch padded), image i is drawn
from seeds (seed, i), so the images are the same for any number of ranks; batches are dealt round
robin and every rank runs the same number of them (repeats pad the short ranks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from ..diffusion import generate, image_seed, make_schedule


@dataclass
class SamplingSetup:
    model: torch.nn.Module
    schedule: object
    opts: dict
    shape: tuple
    num_classes: int
    desc: str


def resolve_options(diffusion: dict, run_sample: dict, num_classes: int, *, sampler=None, steps=None, eta=None,
                    spacing=None, var_type=None, guidance=None, no_clip=False) -> dict:
    """Sampler options: command-line values, else the run's sample section, else defaults."""
    o = {
        "sampler": sampler or run_sample.get("sampler", "ddim"),
        "spacing": spacing or run_sample.get("spacing", "uniform"),
        "var_type": var_type or run_sample.get("var_type", "small"),
        "guidance": guidance if guidance is not None else run_sample.get("guidance", 1.0),
        "clip_x0": (not no_clip) and run_sample.get("clip_x0", True),
        "prediction": diffusion.get("prediction", "eps"),
    }
    T = diffusion.get("num_steps", 1000)
    o["steps"] = steps or (T if o["sampler"] == "ddpm" else run_sample.get("steps", 50))
    o["eta"] = eta if eta is not None else (1.0 if o["sampler"] == "ddpm" else run_sample.get("eta", 0.0))
    if not num_classes:
        o["guidance"] = 1.0
    return o


def load_setup(source: str, which: str, device: torch.device, **overrides) -> SamplingSetup:
    from ..training.export import load_for_sampling

    model, diffusion, run_sample, desc = load_for_sampling(source, which)
    cfg = model.config
    schedule = make_schedule(diffusion.get("schedule", "linear"), diffusion.get("num_steps", 1000),
                             diffusion.get("beta_start", 1e-4), diffusion.get("beta_end", 0.02))
    opts = resolve_options(diffusion, run_sample, cfg.num_classes, **overrides)
    return SamplingSetup(model.to(device), schedule, opts, (cfg.in_channels, cfg.image_size, cfg.image_size),
                         cfg.num_classes, desc)


def labels_for(indices: list[int], classes: Optional[str], num_classes: int, seed: int) -> Optional[list[int]]:
    """'random' (default: from the image's seed), 'none', or a comma list cycled over the indices."""
    if not num_classes or classes == "none":
        return None
    if classes in (None, "random"):
        return [image_seed(seed + 1, i) % num_classes for i in indices]
    try:
        listed = [int(c) for c in classes.split(",")]
    except ValueError:
        raise ValueError(f"--classes: expected 'random', 'none' or comma-separated integers, got '{classes}'") from None
    bad = [c for c in listed if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes: {bad} outside [0, {num_classes})")
    return [listed[i % len(listed)] for i in indices]


def plan_batches(num_images: int, batch_size: int, done: set[int]) -> list[list[int]]:
    """The fixed-composition batches that still have a missing index."""
    nb = -(-num_images // batch_size)
    return [list(range(b * batch_size, (b + 1) * batch_size)) for b in range(nb)
            if any(i not in done for i in range(b * batch_size, min((b + 1) * batch_size, num_images)))]


def rank_share(todo: list[list[int]], rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """This rank's batches as (indices, fresh); short ranks repeat a batch (fresh=False) to even out calls."""
    per_rank = -(-len(todo) // world_size) if todo else 0
    mine = [(b, True) for b in todo[rank::world_size]]
    while len(mine) < per_rank:
        mine.append((mine[-1][0] if mine else todo[0], False))
    return mine


def generate_share(setup: SamplingSetup, share, *, seed: int, classes: Optional[str],
                   num_images: int) -> Iterator[tuple[list[int], np.ndarray, Optional[list[int]], bool]]:
    """(indices < num_images, uint8 NHWC images, labels, fresh) for each batch of this rank's share."""
    from ..viz import to_uint8

    device = next(setup.model.parameters()).device
    for batch, fresh in share:
        labels = labels_for(batch, classes, setup.num_classes, seed)
        x = generate(setup.model, setup.schedule, [image_seed(seed, i) for i in batch], setup.shape, device=device,
                     labels=labels, null_class=setup.num_classes or None, **setup.opts)
        keep = [k for k, i in enumerate(batch) if i < num_images]
        images = to_uint8(x)[keep]
        yield ([batch[k] for k in keep], images, [labels[k] for k in keep] if labels else None, fresh)
