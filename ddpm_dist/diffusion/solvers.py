"""Samplers with fewer model calls, as steps of the same interface as DDPM and DDIM: DPM-Solver++ 2M / 3M
(Lu et al. 2022, multistep, data prediction) and EDM's Heun (Karras et al. 2022, Algorithms 1 and 2).

Both run on the model's own discrete timesteps: sigma_t = sqrt((1 - abar_t) / abar_t), and every sigma a
solver visits is the exact sigma of a training timestep (Karras spacing and churn round to the nearest one,
as EDM's `round_sigma` does for discrete models), so the network always sees a timestep it was trained on
and x at timesteps[i] is a true x_t for tasks that noise or merge at that level (inpainting).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .objective import to_x0_eps
from .schedule import Schedule

# EDM's largest sigma for every model it samples: above it x_t is pure noise for any purpose (signal 1/80).
EDM_SIGMA_MAX = 80.0


def sigmas_of(schedule: Schedule) -> torch.Tensor:
    """sigma_t of every training timestep (float64, increasing in t): x_t / sqrt(abar_t) = x0 + sigma_t eps."""
    a = schedule.alphas_cumprod
    return ((1 - a) / a).sqrt()


def nearest_timestep(sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The training timesteps whose sigma is nearest (in log sigma) to each of `sigma`."""
    return (sigmas.log()[None, :] - sigma.log()[:, None]).abs().argmin(1)


def top_timestep(schedule: Schedule, sigma_max: float) -> int:
    """The last training timestep whose sigma does not exceed sigma_max (T-1 when none exceeds it)."""
    return max(int((sigmas_of(schedule) <= sigma_max).sum()) - 1, 0)


def karras_timesteps(schedule: Schedule, steps: int, top: Optional[int] = None, rho: float = 7.0) -> list[int]:
    """EDM's spacing (eq. 5) between the schedule's smallest sigma and the sigma of `top` (default T-1), each
    rounded to the nearest training timestep; ascending, possibly with repeats where the schedule is coarser
    than the spacing."""
    sigmas = sigmas_of(schedule)
    top = schedule.num_steps - 1 if top is None else top
    lo, hi = sigmas[0] ** (1 / rho), sigmas[top] ** (1 / rho)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return sorted(nearest_timestep(sigmas, (lo + ramp * (hi - lo)) ** rho).tolist())


def _denoise(step, x_t: torch.Tensor, t_index: int) -> torch.Tensor:
    """The model's x0 at training timestep t_index (clipped to [-1, 1] when the options ask for it)."""
    t = torch.full((x_t.shape[0],), t_index, device=x_t.device, dtype=torch.long)
    out = step.model(x_t, t, **step.model_kwargs)
    x0, _ = to_x0_eps(step.prediction, step.schedule, out.to(x_t.dtype), x_t, t)
    return x0.clamp(-1, 1) if step.clip_x0 else x0


class DPMSolverStep:
    """DPM-Solver++ multistep in lambda = log(alpha_t / sigma_t), alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)
    (the VP sigmas here, not EDM's). Order 1 at the first step, `order` once enough history exists; the last
    step, to sigma = 0, is first order and lands on the predicted x0 (diffusers' lower_order_final with
    final_sigmas_type "zero"); with fewer than 15 steps 3M also drops to 2nd order one step before the end.

    The step remembers the x0 predictions of the calls that led to it. A call that does not continue the
    previous one (index i after i + 1) starts afresh at first order: a wrapper that goes back up the chain
    (RePaint's resampling) or a new batch never mixes in predictions from another trajectory."""

    order = 2

    def __init__(self, model, schedule: Schedule, timesteps, *, prediction="eps", clip_x0=True, model_kwargs=None, **_):
        self.model, self.schedule, self.timesteps = model, schedule, timesteps
        self.prediction, self.clip_x0, self.model_kwargs = prediction, clip_x0, model_kwargs or {}
        a = schedule.alphas_cumprod
        self.alpha, self.sigma = a.sqrt(), (1 - a).sqrt()
        self.lam = self.alpha.log() - self.sigma.log()
        self.history: list[tuple[int, torch.Tensor]] = []  # (index, x0) of the calls on this trajectory

    def __call__(self, x, i: int, rng):
        x0 = _denoise(self, x, self.timesteps[i])
        continues = self.history and self.history[-1][0] == i + 1 and self.history[-1][1].shape == x0.shape
        self.history = ((self.history if continues else []) + [(i, x0)])[-self.order :]
        if i == 0:
            return x0, x0
        order = min(self.order, len(self.history))
        if i == 1 and len(self.timesteps) < 15:
            order = min(order, 2)
        s, t = self.timesteps[i], self.timesteps[i - 1]
        h = (self.lam[t] - self.lam[s]).item()
        alpha_t, phi = self.alpha[t].item(), math.expm1(-h)  # phi = e^-h - 1
        out = (self.sigma[t] / self.sigma[s]).item() * x - alpha_t * phi * x0
        if order == 1:
            return out, x0
        # r_k = h_{k} / h: the previous steps' lengths in lambda relative to this one
        lams = [self.lam[self.timesteps[j]].item() for j, _ in self.history]
        m = [d for _, d in self.history][::-1]  # m[0] = x0 here, m[1] one step back, ...
        r0 = (lams[-1] - lams[-2]) / h
        d1_0 = (m[0] - m[1]) / r0
        if order == 2:  # the "midpoint" form (DPM-Solver++ Algorithm 2, diffusers' default)
            return out - 0.5 * alpha_t * phi * d1_0, x0
        r1 = (lams[-2] - lams[-3]) / h
        d1_1 = (m[1] - m[2]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return out + alpha_t * (phi / h + 1) * d1 - alpha_t * ((phi + h) / h**2 - 0.5) * d2, x0


class DPMSolver3MStep(DPMSolverStep):
    order = 3


class HeunStep:
    """EDM's sampler (Algorithm 2; Algorithm 1 when churn = 0) in x / sqrt(abar_t), which moves as
    dx/dsigma = (x - D(x; sigma)) / sigma. Each call takes an Euler step to the next timestep and corrects it
    with the slope there (two model calls); the last step, to sigma = 0, stays Euler and returns D. Churn first
    raises sigma by gamma = min(churn / steps, sqrt(2) - 1) (rounded to a training timestep) with fresh noise
    from `rng`, so stochastic sampling stays seed-addressed.

    make_step starts it at EDM's sigma_max (80) when the schedule goes higher: the
    trapezoid correction multiplies any disagreement between the two slopes by sigma / sigma_next, and a cosine
    schedule's first step (sigma 20,291 at t = 999, 641 at t = 998) ruins the images."""

    sigma_max = EDM_SIGMA_MAX

    def __init__(
        self,
        model,
        schedule: Schedule,
        timesteps,
        *,
        prediction="eps",
        clip_x0=True,
        model_kwargs=None,
        churn: float = 0.0,
        churn_sigma_min: float = 0.0,
        churn_sigma_max: Optional[float] = None,
        churn_noise: float = 1.0,
        **_,
    ):
        self.model, self.schedule, self.timesteps = model, schedule, timesteps
        self.prediction, self.clip_x0, self.model_kwargs = prediction, clip_x0, model_kwargs or {}
        self.sigmas = sigmas_of(schedule)
        self.churn, self.churn_noise = churn, churn_noise
        self.churn_range = (churn_sigma_min, math.inf if churn_sigma_max is None else churn_sigma_max)

    def _sigma(self, t: int) -> float:
        return self.sigmas[t].item()

    def _denoise_scaled(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return _denoise(self, x / math.sqrt(1 + self._sigma(t) ** 2), t)

    def _churn(self, x: torch.Tensor, t: int, rng) -> tuple[torch.Tensor, int]:
        """x at a raised timestep t_hat >= t (EDM lines 4-6); x and t unchanged when churn is off here."""
        sigma = self._sigma(t)
        if self.churn <= 0 or not self.churn_range[0] <= sigma <= self.churn_range[1]:
            return x, t
        gamma = min(self.churn / len(self.timesteps), math.sqrt(2) - 1)
        t_hat = max(t, int(nearest_timestep(self.sigmas, torch.tensor([sigma * (1 + gamma)], dtype=torch.float64))))
        sigma_hat = self._sigma(t_hat)
        return x + math.sqrt(sigma_hat**2 - sigma**2) * self.churn_noise * rng.randn_like(x), t_hat

    def __call__(self, x, i: int, rng):
        t = self.timesteps[i]
        x = x * math.sqrt(1 + self._sigma(t) ** 2)  # x_t / sqrt(abar_t)
        x, t = self._churn(x, t, rng)
        x0 = self._denoise_scaled(x, t)
        if i == 0:
            return x0, x0
        t_next = self.timesteps[i - 1]
        sigma, sigma_next = self._sigma(t), self._sigma(t_next)
        slope = (x - x0) / sigma
        x_next = x + (sigma_next - sigma) * slope
        slope_next = (x_next - self._denoise_scaled(x_next, t_next)) / sigma_next
        x_next = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
        return x_next / math.sqrt(1 + sigma_next**2), x0
