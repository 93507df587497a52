"""Pictures: sample grids, denoising trajectories, GIFs of the reverse process, training curves; figures.py
draws comparisons and diagnostics, `python -m ddpm_dist.viz ...` (ddpm_dist/viz.py) makes them from a run."""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..images import to_uint8


def grid(images: np.ndarray, nrow: Optional[int] = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """uint8 NHWC -> one uint8 HWC image, rows of `nrow`, white padding; upscaled by `scale` (nearest)."""
    n, h, w, c = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = images[
            i
        ]
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    return out


def save_image(img: np.ndarray, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
    tmp = path + ".tmp.png"
    pil.save(tmp)
    os.replace(tmp, path)
    return path


def save_grid(x, path: str, nrow: Optional[int] = None, scale: int = 1) -> str:
    images = to_uint8(x) if isinstance(x, torch.Tensor) else x
    return save_image(grid(images, nrow, scale=scale), path)


def auto_scale(size: int, target: int = 64) -> int:
    return max(1, target // size)


def trajectory_grid(frames: Sequence[torch.Tensor], path: str, max_images: int = 8) -> str:
    """Rows = images, columns = recorded steps (noise on the left, data on the right)."""
    stack = torch.stack([f[:max_images] for f in frames], dim=1)  # n, steps, c, h, w
    n, s = stack.shape[:2]
    images = to_uint8(stack.flatten(0, 1))
    return save_image(grid(images, nrow=s, scale=auto_scale(images.shape[1])), path)


def save_gif(frames: Sequence[torch.Tensor], path: str, max_images: int = 16, duration_ms: int = 80) -> str:
    """One frame per recorded step, each frame a grid of the batch; the last frame is held."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pics = []
    for f in frames:
        u8 = to_uint8(f[:max_images])
        g = grid(u8, scale=auto_scale(u8.shape[1]))
        pics.append(Image.fromarray(g[:, :, 0] if g.shape[2] == 1 else g))
    durations = [duration_ms] * (len(pics) - 1) + [1500]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=durations, loop=0)
    return path


def read_metrics(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return rows


def plot_curves(metrics_path: str, out: str, keys: Sequence[str] = ("loss", "images_per_s", "lr")) -> str:
    """Training curves against images seen, one panel per key present in metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if r.get("event") == "train"]
    if not rows:
        raise ValueError(f"no training rows in '{metrics_path}'")
    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["images"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts))
        ax.set_xlabel("images seen")
        ax.set_title(key)
        if key == "loss":
            ax.set_yscale("log")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
