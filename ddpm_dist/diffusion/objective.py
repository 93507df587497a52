"""Forward process, prediction targets (eps / x0 / v), exact conversions between them, the loss.

With a = alpha_bar_t:  x_t = sqrt(a) x0 + sqrt(1-a) eps,   v = sqrt(a) eps - sqrt(1-a) x0
(Salimans & Ho 2022), hence x0 = sqrt(a) x_t - sqrt(1-a) v and eps = sqrt(1-a) x_t + sqrt(a) v.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .schedule import Schedule, gather

PREDICTIONS = ("eps", "x0", "v")


def _coefs(schedule: Schedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = schedule.alphas_cumprod
    return gather(a.sqrt(), t, like), gather((1 - a).sqrt(), t, like)


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw from q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I), given the noise."""
    sa, s1a = _coefs(schedule, t, x0)
    return sa * x0 + s1a * noise


def target(prediction: str, schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        sa, s1a = _coefs(schedule, t, x0)
        return sa * noise - s1a * x0
    raise ValueError(f"unknown prediction '{prediction}' (expected one of {', '.join(PREDICTIONS)})")


def to_x0_eps(
    prediction: str, schedule: Schedule, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a model prediction of the given kind at x_t."""
    sa, s1a = _coefs(schedule, t, x_t)
    if prediction == "eps":
        return (x_t - s1a * pred) / sa, pred
    if prediction == "x0":
        return pred, (x_t - sa * pred) / s1a
    if prediction == "v":
        return sa * x_t - s1a * pred, s1a * x_t + sa * pred
    raise ValueError(f"unknown prediction '{prediction}' (expected one of {', '.join(PREDICTIONS)})")


def eps_from_x0(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    sa, s1a = _coefs(schedule, t, x_t)
    return (x_t - sa * x0) / s1a


def loss_weight(
    prediction: str, weighting: str, schedule: Schedule, t: torch.Tensor, gamma: float = 5.0
) -> torch.Tensor:
    """Per-sample weight of the MSE on the chosen target.

    min_snr (Hang et al. 2023) caps the x0-space weight at gamma: min(SNR, gamma) expressed for each
    target: x0 -> min(SNR, g); eps -> min(SNR, g) / SNR; v -> min(SNR, g) / (SNR + 1).
    """
    if weighting == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting '{weighting}'")
    snr = schedule.snr.to(t.device)[t]
    capped = snr.clamp(max=gamma)
    denom = {"x0": torch.ones_like(snr), "eps": snr, "v": snr + 1}[prediction]
    return (capped / denom).float()


def diffusion_loss(
    model: Callable,
    schedule: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    prediction: str = "eps",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    model_kwargs: Optional[dict] = None,
) -> torch.Tensor:
    """Mean over the batch of the (weighted) per-sample MSE between the model output and its target."""
    x_t = q_sample(schedule, x0, t, noise)
    out = model(x_t, t, **(model_kwargs or {}))
    tgt = target(prediction, schedule, x0, noise, t)
    if weighting == "none":
        return F.mse_loss(out.float(), tgt.float())
    per_sample = (out.float() - tgt.float()).pow(2).flatten(1).mean(1)
    return (per_sample * loss_weight(prediction, weighting, schedule, t, min_snr_gamma)).mean()
