"""Seeding the global random generators (model init) and one device's default generator (per-step noise)."""

from __future__ import annotations

import torch


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (model init, dropout): the loop re-seeds them per step from (seed, step, rank)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def seed_device_rng(device: torch.device, seed: int) -> None:
    """Seed only the default generator of `device` (torch.manual_seed touches every backend: ~1 ms)."""
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else 0].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
