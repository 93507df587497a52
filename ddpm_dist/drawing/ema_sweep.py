"""The post-hoc EMA sweep's figure (ddpm_dist.posthoc.sweep): Fréchet distance against the EMA length, best marked,
the lengths the snapshots cannot express (unreliable) drawn apart.
Its own module, not figures.py: it has nothing to share with the sampler comparisons there but the two helpers."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from .figures import _plt, _save


def frechet_against_std(
    stds: Sequence[float],
    distances: Sequence[float],
    best_std: Optional[float],
    out: str,
    title: str = "",
    reliable: Optional[Sequence[bool]] = None,
    unreliable_label: str = "unreliable",
) -> str:
    """One line of Fréchet distance against the relative std of the EMA (EDM2's sigma_rel), the best one as a star;
    the points whose `reliable` is False as grey crosses (default: all reliable)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ok = [True] * len(stds) if reliable is None else list(reliable)
    ax.plot(stds, distances, color="tab:blue", alpha=0.5)
    good = [(s, d) for s, d, r in zip(stds, distances, ok) if r]
    bad = [(s, d) for s, d, r in zip(stds, distances, ok) if not r]
    if good:
        ax.plot(*zip(*good), marker="o", color="tab:blue", linestyle="none", label="post-hoc EMA")
    if bad:
        ax.plot(*zip(*bad), marker="X", markersize=9, color="tab:gray", linestyle="none", label=unreliable_label)
    if best_std is not None:
        best = distances[list(stds).index(best_std)]
        ax.plot(
            [best_std],
            [best],
            marker="*",
            markersize=16,
            color="tab:red",
            linestyle="none",
            label=f"best: std {best_std:.4f}, {best:.4f}",
        )
    if all(math.isfinite(d) and d > 0 for d in distances) and max(distances) > 10 * min(distances):
        ax.set_yscale("log")  # early in training the short EMAs can be orders of magnitude worse
    ax.set_xlabel("EMA relative std (sigma_rel)")
    ax.set_ylabel("Fréchet distance (lower is better)")
    ax.set_title(title or "post-hoc EMA sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)
