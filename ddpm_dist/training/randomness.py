"""The randomness of a training step, addressed by global sample slot.

Slot s of step k (s counts the step's global batch: micro-step i of rank r holds slots
(i * world + r) * micro ... + micro) gets its timestep, label-dropout flag and noise from (seed, k, s) alone.
A rank draws only its own slots, so its cost is O(local batch) whatever the world size, and the noise
of a slot does not depend on the world size or accumulation: a resume at another world size draws exactly
what the uninterrupted run would have (no RNG state is saved)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..rng import mix_seed

_TWO_63 = float(1 << 63)


def rank_slots(micro_step: int, rank: int, world_size: int, micro: int) -> range:
    """The global slots of one micro-batch of one rank."""
    first = (micro_step * world_size + rank) * micro
    return range(first, first + micro)


def slot_randomness(
    seed: int,
    step: int,
    slots: Sequence[int],
    num_timesteps: int,
    image_shape,
    label_dropout: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, drop, noise) of these slots: integers from splitmix64 on the host, one reseeded generator per slot
    for the noise, written in place into one tensor on the device."""
    keys = [mix_seed(seed, step, s, 0x7A11) for s in slots]
    t = torch.tensor([mix_seed(k, 1) % num_timesteps for k in keys], dtype=torch.long).to(device, non_blocking=True)
    drop = torch.tensor([mix_seed(k, 2) / _TWO_63 < label_dropout for k in keys]).to(device, non_blocking=True)
    noise = torch.empty((len(keys), *image_shape), device=device)
    g = torch.Generator(device)
    for row, k in zip(noise, keys):
        g.manual_seed(mix_seed(k, 3))
        torch.randn(row.shape, generator=g, device=device, out=row)
    return t, drop, noise
