"""Inpainting with any trained model (RePaint, Lugmayr et al. 2022): after every reverse step the known
region is replaced by the original noised to the new step's level; with `resample` R each step is redone
R times, re-noising the merged image back one step in between, so the hole harmonises with what is kept.
It wraps the step of whichever sampler the options name, so spacing, variance, guidance and clipping all
apply."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..diffusion import SamplerOptions, denoise_from_seeds
from ..diffusion.objective import q_sample


def renoise(schedule, x_s, s: int, t: int, rng) -> torch.Tensor:
    """A draw from q(x_t | x_s) for t > s: N(sqrt(abar_t / abar_s) x_s, (1 - abar_t / abar_s) I)."""
    a = schedule.alphas_cumprod
    ratio = (a[t] / a[s]).item()
    return ratio**0.5 * x_s + (1 - ratio) ** 0.5 * rng.randn_like(x_s)


class RePaintStep:
    """A sampler step (x, i, rng) -> (x at timesteps[i-1], x0) that keeps the known region."""

    def __init__(self, step, known: torch.Tensor, keep: torch.Tensor, resample: int = 1):
        """known: images in [-1, 1] (N,C,H,W); keep: 1 where the pixel is known, 0 in the hole (N or 1,1,H,W)."""
        self.step = step
        self.known = known
        self.keep = keep.to(known.dtype)
        self.resample = resample
        self.schedule, self.timesteps = step.schedule, step.timesteps

    def _merge(self, x: torch.Tensor, i: int, rng) -> torch.Tensor:
        """The known region at the noise level of timesteps[i] (the original itself below index 0)."""
        if i < 0:
            known = self.known
        else:
            t = torch.full((x.shape[0],), self.timesteps[i], device=x.device, dtype=torch.long)
            known = q_sample(self.schedule, self.known, t, rng.randn_like(self.known))
        return self.keep * known + (1 - self.keep) * x

    def __call__(self, x, i: int, rng):
        if i == len(self.timesteps) - 1:  # x_T: the known region starts at the first step's noise level
            x = self._merge(x, i, rng)
        for r in range(self.resample):
            x_next, x0 = self.step(x, i, rng)
            x_next = self._merge(x_next, i - 1, rng)
            if r < self.resample - 1 and i > 0:  # RePaint: go back up one step and redo it
                x = renoise(self.schedule, x_next, self.timesteps[i - 1], self.timesteps[i], rng)
        return x_next, x0


def inpaint(
    model,
    schedule,
    known: torch.Tensor,
    keep: torch.Tensor,
    seeds,
    options: Optional[SamplerOptions] = None,
    *,
    resample: int = 1,
    prediction: str = "eps",
    labels=None,
    null_class: Optional[int] = None,
    model_kwargs=None,
    callback=None,
) -> torch.Tensor:
    """Completions of `known` (one per seed) outside `keep`, with any sampler."""
    return denoise_from_seeds(
        model,
        schedule,
        seeds,
        known.shape[1:],
        options,
        device=known.device,
        labels=labels,
        null_class=null_class,
        prediction=prediction,
        model_kwargs=model_kwargs,
        callback=callback,
        wrap_step=lambda step: RePaintStep(step, known, keep, resample),
    )


def make_mask(spec: str, size: int, seed: int = 0) -> np.ndarray:
    """1 = keep, 0 = regenerate. 'lower-half', 'box:x0,y0,x1,y1' (the box is regenerated), 'random'
    (strokes and boxes from the seed), or a PNG path (white = keep)."""
    keep = np.ones((size, size), dtype=np.float32)
    if spec == "lower-half":
        keep[size // 2 :] = 0
    elif spec.startswith("box:"):
        try:
            x0, y0, x1, y1 = (int(v) for v in spec[4:].split(","))
        except ValueError:
            raise ValueError(f"--mask '{spec}': expected box:x0,y0,x1,y1") from None
        keep[y0:y1, x0:x1] = 0
    elif spec == "random":
        rng = np.random.default_rng(seed)
        for _ in range(rng.integers(1, 4)):
            w, h = rng.integers(size // 6, size // 2, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            keep[y : y + h, x : x + w] = 0
        for _ in range(rng.integers(1, 3)):  # a random walk stroke
            x, y = rng.integers(0, size, 2)
            for _ in range(size):
                keep[max(0, y - 1) : y + 1, max(0, x - 1) : x + 1] = 0
                x = int(np.clip(x + rng.integers(-1, 2), 0, size - 1))
                y = int(np.clip(y + rng.integers(-1, 2), 0, size - 1))
    else:
        if not os.path.exists(spec):
            raise FileNotFoundError(f"mask '{spec}' is not a file, 'lower-half', 'box:x0,y0,x1,y1' or 'random'")
        with Image.open(spec) as im:
            keep = (np.asarray(im.convert("L").resize((size, size), Image.NEAREST)) > 127).astype(np.float32)
    return keep
