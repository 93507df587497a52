"""Reverse-process samplers with one shared signature, classifier-free guidance and trajectories (the
solvers with fewer model calls, DPM-Solver++ and Heun, are in solvers.py and registered here).

Every sampler is a step, `step(x, i, rng) -> (x_next, x0)` over a sub-sequence of timesteps (built as
`Step(model, schedule, timesteps, prediction=..., eta=..., var_type=..., clip_x0=..., model_kwargs=...)`, named in
STEPS), and `run_steps(step, x_T, rng, callback)` is the one reverse loop; `make_step` builds the step a
SamplerOptions names and `denoise_from_seeds` runs it from per-image seeds. `rng` draws the per-step noise; a
StackedRandomGenerator makes each image's noise depend on its own seed only, so a batch's images do not depend on
which other images share the batch (EDM generate.py).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .objective import eps_from_x0, to_x0_eps
from .options import SAMPLER_DEFAULTS, SamplerOptions
from .schedule import Schedule, gather, respace
from .solvers import EDM_SIGMA_MAX, DPMSolver3MStep, DPMSolverStep, HeunStep, karras_timesteps, top_timestep

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image `index` of a run with base `seed` (stable across machines and versions)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class StackedRandomGenerator:
    """One torch.Generator per image; randn draws each row from its own generator."""

    def __init__(self, device: torch.device | str, seeds: Sequence[int]):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        assert shape[0] == len(self.generators), "one generator per row"
        return torch.stack(
            [torch.randn(tuple(shape[1:]), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype)


class _TorchRNG:
    def __init__(self, generator: Optional[torch.Generator]):
        self.generator = generator

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)


def _as_rng(rng):
    if rng is None or isinstance(rng, torch.Generator):
        return _TorchRNG(rng)
    return rng


def make_timesteps(
    num_train_steps: int,
    steps: int,
    spacing: str = SamplerOptions.spacing,
    schedule: Optional[Schedule] = None,
    sigma_max: Optional[float] = None,
) -> list[int]:
    """Ascending timesteps in [0, T) including the top one (start from pure noise) and 0 (end at data). The top is
    T-1, or with `sigma_max` the last timestep whose sigma does not exceed it (karras spacing: EDM's 80 unless
    given, else a cosine schedule's sigma 20,291 at t = 999 would pull most steps to the top). Karras spacing and
    sigma_max are in sigma, so they need the schedule."""
    T = num_train_steps
    if spacing == "karras" and sigma_max is None:
        sigma_max = EDM_SIGMA_MAX
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if (spacing == "karras" or sigma_max is not None) and schedule is None:
        raise ValueError("karras spacing and sigma_max need the schedule (its sigmas)")
    top = T - 1 if sigma_max is None else max(steps - 1, top_timestep(schedule, sigma_max))
    if steps == 1:
        return [top]
    if spacing == "uniform":
        ts = np.linspace(0, top, steps)
    elif spacing == "quadratic":  # denser near t=0, as in DDIM's CIFAR-10 setup
        ts = np.linspace(0, np.sqrt(top), steps) ** 2
    elif spacing == "karras":  # EDM eq. 5, rho 7: dense at low noise
        ts = np.array(karras_timesteps(schedule, steps, top))
    else:
        raise ValueError(f"unknown spacing '{spacing}' (expected uniform, quadratic or karras)")
    ts = np.round(ts).astype(int)
    for i in range(1, steps):  # keep strictly increasing and inside [0, top]
        ts[i] = max(ts[i], ts[i - 1] + 1)
    for i in range(steps - 1, -1, -1):
        ts[i] = min(ts[i], top - (steps - 1 - i))
    return ts.tolist()


def _predict(model, prediction, schedule, x, t_index, model_kwargs, clip_x0):
    t = torch.full((x.shape[0],), t_index, device=x.device, dtype=torch.long)
    out = model(x, t, **model_kwargs)
    x0, eps = to_x0_eps(prediction, schedule, out.to(x.dtype), x, t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(schedule, x0, x, t)
    return t, x0, eps


class DDPMStep:
    """Ancestral sampling from the posterior q(x_{t-1} | x_t, x0_hat); over a sub-sequence the schedule is
    respaced (improved DDPM). var_type 'small' = beta_tilde_t, 'large' = beta_t (DDPM section 3.2)."""

    def __init__(
        self,
        model,
        schedule: Schedule,
        timesteps,
        *,
        prediction="eps",
        eta=SAMPLER_DEFAULTS["ddpm"]["eta"],
        var_type=SamplerOptions.var_type,
        clip_x0=SamplerOptions.clip_x0,
        model_kwargs=None,
        **_,
    ):
        self.model, self.schedule, self.timesteps = model, schedule, timesteps
        self.prediction, self.clip_x0, self.model_kwargs = prediction, clip_x0, model_kwargs or {}
        sub = respace(schedule, timesteps)
        self.c1, self.c2 = sub.posterior_mean_coefs
        self.var = sub.posterior_variance if var_type == "small" else sub.betas

    def __call__(self, x, i: int, rng):
        """x at timesteps[i] -> (x at timesteps[i-1], or data for i == 0; predicted x0)."""
        _, x0, _ = _predict(
            self.model, self.prediction, self.schedule, x, self.timesteps[i], self.model_kwargs, self.clip_x0
        )
        idx = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        mean = gather(self.c1, idx, x) * x0 + gather(self.c2, idx, x) * x
        return (mean + gather(self.var, idx, x).sqrt() * rng.randn_like(x) if i > 0 else mean), x0


class DDIMStep:
    """DDIM (Song et al. 2021, eq. 12): eta=0 is deterministic, eta=1 over all steps is DDPM's posterior."""

    def __init__(
        self,
        model,
        schedule: Schedule,
        timesteps,
        *,
        prediction="eps",
        eta=SAMPLER_DEFAULTS["ddim"]["eta"],
        var_type=SamplerOptions.var_type,
        clip_x0=SamplerOptions.clip_x0,
        model_kwargs=None,
        **_,
    ):
        self.model = model
        self.schedule = schedule
        self.timesteps = timesteps
        self.eta = eta
        self.prediction, self.clip_x0, self.model_kwargs = prediction, clip_x0, model_kwargs or {}

    def __call__(self, x, i: int, rng):
        t, x0, eps = _predict(
            self.model, self.prediction, self.schedule, x, self.timesteps[i], self.model_kwargs, self.clip_x0
        )
        if i == 0:
            return x0, x0
        abar = self.schedule.alphas_cumprod
        a = gather(abar, t, x)
        a_prev = gather(abar, torch.full_like(t, self.timesteps[i - 1]), x)
        sigma = self.eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
        out = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if self.eta > 0:
            out = out + sigma * rng.randn_like(x)
        return out, x0


# Every step takes every sampler option as a keyword and uses its own (`**_` drops the others').
STEPS = {"ddpm": DDPMStep, "ddim": DDIMStep, "dpm++2m": DPMSolverStep, "dpm++3m": DPMSolver3MStep, "heun": HeunStep}


def run_steps(step, x_T, rng=None, callback: Optional[Callback] = None) -> torch.Tensor:
    """The reverse loop every sampler and task shares: x_T at timesteps[-1] down to the data."""
    rng, x = _as_rng(rng), x_T
    for i in reversed(range(len(step.timesteps))):
        x_next, x0 = step(x, i, rng)
        if callback:
            callback(i, step.timesteps[i], x, x0)
        x = x_next
    return x


def classifier_free_guidance(model, scale: float, null_class: int):
    """model(x, t, y) -> uncond + scale * (cond - uncond), both halves in one batched forward."""
    if scale == 1.0:
        return model

    def guided(x, t, y=None, **kw):
        if y is None:
            return model(x, t, **kw)
        null = torch.full_like(y, null_class)
        extra = {k: torch.cat([v, v]) for k, v in kw.items()}
        out = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **extra)
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return guided


class TrajectoryRecorder:
    """Callback that keeps x_t and the predicted x0 at chosen timesteps (all of them when None)."""

    def __init__(self, record_at: Optional[Sequence[int]] = None):
        self.record_at = set(record_at) if record_at is not None else None
        self.steps: list[int] = []
        self.x_t: list[torch.Tensor] = []
        self.x0: list[torch.Tensor] = []

    def __call__(self, i: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if self.record_at is None or t in self.record_at:
            self.steps.append(t)
            self.x_t.append(x_t.detach().cpu())
            self.x0.append(x0.detach().cpu())


def make_step(
    model,
    schedule: Schedule,
    options: Optional[SamplerOptions] = None,
    *,
    prediction="eps",
    y=None,
    null_class: Optional[int] = None,
    model_kwargs=None,
):
    """The chosen sampler's step over its timesteps, with guidance applied: the piece a task may wrap."""
    o = (options or SamplerOptions()).resolved(schedule.num_steps, conditional=y is not None)
    kwargs = dict(model_kwargs or {})
    if y is not None:
        kwargs["y"] = y
    if o.guidance != 1.0:
        if null_class is None:
            raise ValueError("guidance needs a model with a null class")
        model = classifier_free_guidance(model, o.guidance, null_class)
    # A solver may start lower than T-1 (Heun: EDM's sigma_max); x_T ~ N(0, I) is pure noise there as well.
    timesteps = make_timesteps(
        schedule.num_steps, o.steps, o.spacing, schedule, getattr(STEPS[o.sampler], "sigma_max", None)
    )
    return STEPS[o.sampler](
        model,
        schedule,
        timesteps,
        prediction=prediction,
        eta=o.eta,
        var_type=o.var_type,
        clip_x0=o.clip_x0,
        model_kwargs=kwargs,
        churn=o.churn,
        churn_sigma_min=o.churn_sigma_min,
        churn_sigma_max=o.churn_sigma_max,
        churn_noise=o.churn_noise,
    )


def denoise_from_seeds(
    model,
    schedule: Schedule,
    seeds: Sequence[int],
    shape: Sequence[int],
    options: Optional[SamplerOptions] = None,
    *,
    device,
    labels=None,
    null_class: Optional[int] = None,
    prediction="eps",
    model_kwargs=None,
    callback: Optional[Callback] = None,
    wrap_step: Optional[Callable] = None,
) -> torch.Tensor:
    """Images in [-1, 1], one per seed; x_T and every step's noise come from that image's own generator,
    so an image depends on its seed (and label), not on the batch it shares."""
    rng = StackedRandomGenerator(device, seeds)
    x_T = rng.randn((len(seeds), *shape))
    y = None if labels is None else torch.as_tensor(labels, device=device, dtype=torch.long)
    step = make_step(
        model, schedule, options, prediction=prediction, y=y, null_class=null_class, model_kwargs=model_kwargs
    )
    with torch.no_grad():  # `wrap_step` may wrap the sampler's step (inpainting does)
        return run_steps(wrap_step(step) if wrap_step else step, x_T, rng, callback)
