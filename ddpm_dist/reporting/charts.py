"""The report's curves as PNG bytes, drawn fresh from metrics.jsonl rows (curves.png exists only once a run
has finished). matplotlib is imported on first use: it takes a second."""

from __future__ import annotations

import io
from typing import Optional, Sequence

MAX_POINTS = 2000  # a long run's rows are thinned to this many per curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    every = len(points) / MAX_POINTS
    return [points[int(i * every)] for i in range(MAX_POINTS)] + [points[-1]]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def panels(
    rows: Sequence[dict], keys: Sequence[tuple[str, str, bool]], x: str = "images", xlabel: str = "images seen"
) -> Optional[bytes]:
    """One panel per (key, title, log y) with at least one point, `key` against `x`; None when none has."""
    plt = _pyplot()
    series = []
    for key, title, log in keys:
        pts = [
            (r[x], r[key])
            for r in rows
            if isinstance(r.get(x), (int, float))
            and isinstance(r.get(key), (int, float))
            and not isinstance(r.get(key), bool)
        ]
        if pts:
            series.append((_thin(pts), title, log and all(v > 0 for _, v in pts)))
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(3.8 * len(series), 2.8), squeeze=False)
    for ax, (pts, title, log) in zip(axes[0], series):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
    return _png(fig)


def training_curves(train_rows: Sequence[dict]) -> Optional[bytes]:
    return panels(
        train_rows, (("loss", "loss", True), ("lr", "learning rate", False), ("images_per_s", "images/s", False))
    )


def eval_curve(eval_rows: Sequence[dict]) -> Optional[bytes]:
    return panels(eval_rows, (("frechet_distance", "Fréchet distance (in training)", True),))
