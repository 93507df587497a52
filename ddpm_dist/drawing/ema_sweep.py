"""The post-hoc EMA sweep's figure (ddpm_dist.posthoc.sweep): Fréchet distance against the EMA length, best marked.
Its own module, not figures.py: it has nothing to share with the sampler comparisons there but the two helpers."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from .figures import _plt, _save


def frechet_against_std(stds: Sequence[float], distances: Sequence[float], best_std: Optional[float], out: str,
                        title: str = "") -> str:
    """One line of Fréchet distance against the relative std of the EMA (EDM2's sigma_rel), the best one as a star."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(stds, distances, marker="o", label="post-hoc EMA")
    if best_std is not None:
        best = distances[list(stds).index(best_std)]
        ax.plot([best_std], [best], marker="*", markersize=16, color="tab:red", linestyle="none",
                label=f"best: std {best_std:.4f}, {best:.4f}")
    if all(math.isfinite(d) and d > 0 for d in distances) and max(distances) > 10 * min(distances):
        ax.set_yscale("log")  # early in training the short EMAs can be orders of magnitude worse
    ax.set_xlabel("EMA relative std (sigma_rel)")
    ax.set_ylabel("Fréchet distance (lower is better)")
    ax.set_title(title or "post-hoc EMA sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)
