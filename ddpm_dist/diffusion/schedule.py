"""Beta schedules and the quantities derived from them, all in float64.

Values are gathered per timestep and cast to the caller's dtype only at the point of use, so the
float32 model never sees a schedule computed in float32 (the cosine schedule loses digits there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

KINDS = ("linear", "cosine", "quadratic")


def _cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # Improved DDPM (Nichol & Dhariwal 2021), eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_betas(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind == "quadratic":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if kind == "cosine":
        return _cosine_betas(num_steps)
    raise ValueError(f"unknown schedule '{kind}' (expected one of {', '.join(KINDS)})")


@dataclass(frozen=True)
class Schedule:
    """Index t in [0, T) is the paper's timestep t+1; alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)."""

    betas: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    @cached_property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, 0)

    @cached_property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @cached_property
    def snr(self) -> torch.Tensor:
        a = self.alphas_cumprod
        return a / (1 - a)

    @cached_property
    def posterior_variance(self) -> torch.Tensor:
        """beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (DDPM eq. 7)."""
        return self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @cached_property
    def posterior_mean_coefs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mu_tilde = c1 x0 + c2 x_t with c1 = sqrt(abar_{t-1}) beta_t / (1 - abar_t),
        c2 = sqrt(alpha_t)(1 - abar_{t-1}) / (1 - abar_t)."""
        a_prev, a = self.alphas_cumprod_prev, self.alphas_cumprod
        c1 = a_prev.sqrt() * self.betas / (1 - a)
        c2 = self.alphas.sqrt() * (1 - a_prev) / (1 - a)
        return c1, c2


def make_schedule(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    return Schedule(make_betas(kind, num_steps, beta_start, beta_end))


def gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] broadcast to like's shape, cast to like's dtype and device (after the float64 gather)."""
    out = values.to(t.device)[t].to(like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


def respace(schedule: Schedule, timesteps: list[int]) -> Schedule:
    """The schedule of a sub-sequence of timesteps (improved DDPM, section 4): same alpha_bar at each kept t."""
    a = schedule.alphas_cumprod[torch.tensor(timesteps)]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    return Schedule(1 - a / prev)
