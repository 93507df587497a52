"""Figures for comparisons and diagnostics (matplotlib, written as PNG)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from ..images import to_model_range, to_uint8


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str) -> str:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    _plt().close(fig)
    return out


def _show(ax, images: np.ndarray, title: str = "") -> None:
    """uint8 NHWC in one row on an axis."""
    from . import grid

    g = grid(images, nrow=len(images))
    ax.imshow(g[..., 0] if g.shape[2] == 1 else g, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)


def schedules(out: str, num_steps: int = 1000) -> str:
    """beta_t, alpha-bar_t and SNR(t) (log scale) for every schedule kind."""
    from ..diffusion import KINDS, make_schedule

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    t = np.arange(num_steps)
    for kind in KINDS:
        s = make_schedule(kind, num_steps)
        axes[0].plot(t, s.betas.numpy(), label=kind)
        axes[1].plot(t, s.alphas_cumprod.numpy(), label=kind)
        axes[2].plot(t, s.snr.numpy(), label=kind)
    for ax, title in zip(axes, ("beta_t", "alpha-bar_t", "SNR(t) = alpha-bar / (1 - alpha-bar)")):
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.legend()
    axes[2].set_yscale("log")
    return _save(fig, out)


def compare_samplers(
    setup, configs: list[tuple[str, int]], out: str, *, num_images: int = 8, seed: int = 0, labels=None
) -> str:
    """The same initial noise (same per-image seeds) through each sampler/step count, with wall time per image.
    `setup` is a sampling.SamplingSetup; each row keeps its options but the sampler and step count."""
    from ..diffusion import denoise_from_seeds, image_seed

    plt = _plt()
    seeds = [image_seed(seed, i) for i in range(num_images)]
    fig, axes = plt.subplots(len(configs), 1, figsize=(1.0 * num_images + 2, 1.15 * len(configs)), squeeze=False)
    for ax, (sampler, steps) in zip(axes[:, 0], configs):
        options = setup.options.updated(sampler=sampler, steps=steps)
        t0 = time.perf_counter()
        x = denoise_from_seeds(
            setup.model,
            setup.schedule,
            seeds,
            setup.shape,
            options,
            device=setup.device,
            labels=labels,
            null_class=setup.num_classes or None,
            prediction=setup.prediction,
        )
        per_image = (time.perf_counter() - t0) / num_images
        _show(ax, to_uint8(x), f"{sampler.upper()} {steps} steps\n{per_image * 1e3:.0f} ms/img")
    fig.suptitle("same initial noise, different samplers", fontsize=10)
    return _save(fig, out)


def forward_reverse(setup, real: np.ndarray, out: str, *, steps: int = 8, seed: int = 0) -> str:
    """Left: the forward process q(x_t | x0) on real images; right: a reverse (DDPM) trajectory at the same t."""
    from ..diffusion import TrajectoryRecorder, denoise_from_seeds, image_seed, make_timesteps, q_sample

    plt = _plt()
    device = setup.device
    T = setup.schedule.num_steps
    ts = make_timesteps(T, steps)  # ascending, includes 0 and T-1
    x0 = to_model_range(real).to(device)
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=device)
    forward = [to_uint8(q_sample(setup.schedule, x0, torch.full((len(x0),), t, device=device), noise)) for t in ts]
    rec = TrajectoryRecorder(record_at=set(ts))
    labels = [i % setup.num_classes for i in range(len(x0))] if setup.num_classes else None
    denoise_from_seeds(
        setup.model,
        setup.schedule,
        [image_seed(seed, i) for i in range(len(x0))],
        setup.shape,
        setup.options.updated(sampler="ddpm", steps=T),
        device=device,
        labels=labels,
        null_class=setup.num_classes or None,
        prediction=setup.prediction,
        callback=rec,
    )
    reverse = {t: to_uint8(x) for t, x in zip(rec.steps, rec.x_t)}
    fig, axes = plt.subplots(len(x0), 2, figsize=(2 * len(ts) * 0.9 + 1, 1.1 * len(x0) + 0.6), squeeze=False)
    for i in range(len(x0)):
        _show(axes[i, 0], np.stack([f[i] for f in forward]))
        _show(axes[i, 1], np.stack([reverse[t][i] for t in reversed(ts)]))
    axes[0, 0].set_title(f"forward q(x_t | x0): t = {ts[0]} ... {ts[-1]}", fontsize=9)
    axes[0, 1].set_title(f"reverse p(x_(t-1) | x_t): t = {ts[-1]} ... {ts[0]}", fontsize=9)
    return _save(fig, out)


def quality_per_call(points, out: str) -> str:
    """Fréchet distance and time per image against model calls (log axes), one line per sampler. `points` have
    sampler, calls, frechet and seconds_per_image (eval.nfe.Point)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for sampler in dict.fromkeys(p.sampler for p in points):
        mine = sorted((p for p in points if p.sampler == sampler), key=lambda p: p.calls)
        calls = [p.calls for p in mine]
        axes[0].plot(calls, [p.frechet for p in mine], marker="o", label=sampler)
        axes[1].plot(calls, [p.seconds_per_image * 1e3 for p in mine], marker="o", label=sampler)
    for ax, title in zip(axes, ("Fréchet distance (lower is better)", "ms per image")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model calls per image (NFE)")
        ax.set_title(title)
        ax.legend()
    return _save(fig, out)


def recon_curves(rows: list[dict], out: str) -> str:
    """PSNR and SSIM of one-step and DDIM reconstructions against the noise level t (rows of eval.recon)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    ts = [r["t"] for r in rows]
    for ax, metric in zip(axes, ("psnr", "ssim")):
        for name in ("one_step", "ddim"):
            ax.plot(ts, [r[f"{name}_{metric}"] for r in rows], marker="o", label=name.replace("_", "-"))
        ax.set_xlabel("noise level t")
        ax.set_title(metric.upper())
        ax.legend()
    return _save(fig, out)


def diversity(metrics_path: str, out: str) -> str:
    """Mean pairwise distance between the samples of each training-time grid, against images seen."""
    from . import read_metrics

    plt = _plt()
    rows = [r for r in read_metrics(metrics_path) if r.get("event") == "samples" and "diversity" in r]
    if not rows:
        raise ValueError(f"no sample-diversity rows in '{metrics_path}' (set train.sample_every_images)")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["images"] for r in rows], [r["diversity"] for r in rows], marker="o")
    ax.set_xlabel("images seen")
    ax.set_ylabel("mean pairwise L2 distance")
    ax.set_title("sample diversity over training")
    return _save(fig, out)


def mean_pairwise_distance(x: torch.Tensor) -> float:
    flat = x.flatten(1).float()
    d = torch.cdist(flat, flat)
    n = len(flat)
    return float(d.sum() / max(n * (n - 1), 1))
