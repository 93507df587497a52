"""Seed addressing: which images a rank makes and with which labels. Batch b holds images [b*B, (b+1)*B)
whatever the world size (the last batch padded), image i is drawn from seeds (seed, i), so the images are
the same for any number of ranks; batches are dealt round robin and every rank runs the same number of
them (repeats pad the short ranks, so collectives stay in step)."""

from __future__ import annotations

from typing import Optional

from ..diffusion import image_seed


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
    return [
        list(range(b * batch_size, (b + 1) * batch_size))
        for b in range(nb)
        if any(i not in done for i in range(b * batch_size, min((b + 1) * batch_size, num_images)))
    ]


def rank_share(todo: list[list[int]], rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """This rank's batches as (indices, fresh); short ranks repeat a batch (fresh=False) to even out calls."""
    per_rank = -(-len(todo) // world_size) if todo else 0
    mine = [(b, True) for b in todo[rank::world_size]]
    while len(mine) < per_rank:
        mine.append((mine[-1][0] if mine else todo[0], False))
    return mine
