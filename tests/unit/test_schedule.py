"""Schedules against the papers' closed forms, in float64."""

import math

import pytest
import torch

from ddpm_dist.diffusion import make_schedule, respace


def test_linear_is_ddpm_linspace_in_float64():
    s = make_schedule("linear", 1000)
    assert s.betas.dtype == torch.float64 and s.alphas_cumprod.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert s.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    t = 417
    assert s.betas[t].item() == pytest.approx(1e-4 + t * (0.02 - 1e-4) / 999, rel=1e-12)
    prod = 1.0
    for b in s.betas[: t + 1].tolist():
        prod *= 1 - b
    assert s.alphas_cumprod[t].item() == pytest.approx(prod, rel=1e-12)


def test_quadratic_is_square_of_linspace_of_roots():
    s = make_schedule("quadratic", 100, 1e-4, 0.02)
    t = 37
    root = math.sqrt(1e-4) + t * (math.sqrt(0.02) - math.sqrt(1e-4)) / 99
    assert s.betas[t].item() == pytest.approx(root**2, rel=1e-12)


def test_cosine_matches_improved_ddpm_alpha_bar():
    T, s_ = 1000, 0.008
    s = make_schedule("cosine", T)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):  # away from the 0.999 clip at the very end
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert s.betas.max().item() <= 0.999


def test_schedules_are_valid():
    for kind in ("linear", "cosine", "quadratic"):
        s = make_schedule(kind, 50)
        a = s.alphas_cumprod
        assert (s.betas > 0).all() and (s.betas < 1).all()
        assert (a[1:] < a[:-1]).all()


def test_posterior_variance_and_mean_from_gaussian_conditioning():
    # Independent derivation: x_{t-1} ~ N(sqrt(ab') x0, 1 - ab'), x_t = sqrt(alpha) x_{t-1} + sqrt(beta) e.
    s = make_schedule("linear", 1000)
    for t in (1, 100, 999):
        ab_prev, alpha, beta = s.alphas_cumprod[t - 1].item(), s.alphas[t].item(), s.betas[t].item()
        s11, s12, s22 = 1 - ab_prev, math.sqrt(alpha) * (1 - ab_prev), alpha * (1 - ab_prev) + beta
        var = s11 - s12 * s12 / s22
        assert s.posterior_variance[t].item() == pytest.approx(var, rel=1e-10)
        x0, xt = 0.3, -1.2
        mean = math.sqrt(ab_prev) * x0 + s12 / s22 * (xt - math.sqrt(alpha) * math.sqrt(ab_prev) * x0)
        c1, c2 = s.posterior_mean_coefs
        assert (c1[t] * x0 + c2[t] * xt).item() == pytest.approx(mean, rel=1e-10)
    assert s.posterior_variance[0].item() == 0.0  # no noise on the last step


def test_respacing_keeps_alpha_bar_at_kept_steps():
    s = make_schedule("cosine", 1000)
    keep = [0, 99, 499, 999]
    r = respace(s, keep)
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[keep], rtol=1e-12)
