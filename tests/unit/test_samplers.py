"""Samplers: determinism, DDIM(eta=1, all steps) = DDPM posterior, and exactness on Gaussian data."""

import pytest
import torch

from ddpm_dist.diffusion import (
    SamplerOptions,
    StackedRandomGenerator,
    TrajectoryRecorder,
    denoise_from_seeds,
    make_schedule,
    make_timesteps,
)
from ddpm_dist.diffusion.samplers import DDIMStep, DDPMStep, classifier_free_guidance, run_steps


def ddim(model, schedule, x_T, *, timesteps, rng=None, callback=None, **opts):
    return run_steps(DDIMStep(model, schedule, timesteps, **opts), x_T, rng, callback)


def ddpm(model, schedule, x_T, *, timesteps, rng=None, callback=None, **opts):
    return run_steps(DDPMStep(model, schedule, timesteps, **opts), x_T, rng, callback)


def gaussian_eps_model(schedule, mu, s):
    """The exact E[eps | x_t] when the data is N(mu, s^2) per pixel: a perfect denoiser."""
    ab = schedule.alphas_cumprod

    def model(x, t, **kw):
        a = ab[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    return model


def test_timesteps_cover_both_ends_and_any_count():
    for spacing in ("uniform", "quadratic"):
        for k in (1, 2, 10, 999, 1000):
            ts = make_timesteps(1000, k, spacing)
            assert len(ts) == k and ts[-1] == 999 and len(set(ts)) == k and ts == sorted(ts)
            assert k == 1 or ts[0] == 0


def test_ddim_eta0_is_deterministic():
    s = make_schedule("linear", 100)
    model = gaussian_eps_model(s, 0.2, 0.5)
    xT = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    ts = make_timesteps(100, 10)
    a = ddim(model, s, xT, timesteps=ts, rng=torch.Generator().manual_seed(0), eta=0.0, clip_x0=False)
    b = ddim(model, s, xT, timesteps=ts, rng=torch.Generator().manual_seed(99), eta=0.0, clip_x0=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_all_steps_equals_ddpm_posterior(clip):
    s = make_schedule("cosine", 200)
    model = gaussian_eps_model(s, 0.1, 0.8)
    xT = torch.randn(8, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ts = list(range(200))
    a = ddim(model, s, xT, timesteps=ts, rng=torch.Generator().manual_seed(5), eta=1.0, clip_x0=clip)
    b = ddpm(model, s, xT, timesteps=ts, rng=torch.Generator().manual_seed(5), var_type="small", clip_x0=clip)
    assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 1000, 1.0), ("ddim", 200, 0.0), ("ddim", 1000, 1.0)])
def test_samplers_reproduce_gaussian_data(sampler, steps, eta):
    # With the exact denoiser only discretisation error is left (a 50-step DDIM gives std 0.477, not 0.5).
    mu, sd = 0.3, 0.5
    s = make_schedule("linear", 1000)
    model = gaussian_eps_model(s, mu, sd)
    g = torch.Generator().manual_seed(0)
    xT = torch.randn(8000, 1, 1, 1, dtype=torch.float64, generator=g)
    fn = ddpm if sampler == "ddpm" else ddim
    x = fn(model, s, xT, timesteps=make_timesteps(1000, steps), rng=g, eta=eta, clip_x0=False)
    assert x.mean().item() == pytest.approx(mu, abs=0.025)
    assert x.std().item() == pytest.approx(sd, rel=0.05)


def test_images_do_not_depend_on_batch_mates():
    s = make_schedule("linear", 50)
    model = gaussian_eps_model(s, 0.0, 0.5)
    options = SamplerOptions("ddpm", 50, clip_x0=False)
    one = denoise_from_seeds(model, s, [11], (1, 2, 2), options, device="cpu")
    many = denoise_from_seeds(model, s, [7, 11, 13], (1, 2, 2), options, device="cpu")
    assert torch.allclose(one[0], many[1], atol=1e-6)


def test_stacked_generator_rows_follow_their_seeds():
    a = StackedRandomGenerator("cpu", [1, 2]).randn((2, 3))
    b = StackedRandomGenerator("cpu", [2]).randn((1, 3))
    assert torch.equal(a[1], b[0])


def test_classifier_free_guidance_combination():
    def model(x, t, y=None):
        return x * 0 + y.view(-1, 1).float()  # "cond" output = label, null label 9

    guided = classifier_free_guidance(model, 3.0, null_class=9)
    out = guided(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), y=torch.tensor([1, 2]))
    # uncond = 9, cond = y: 9 + 3 (y - 9)
    assert torch.allclose(out.squeeze(), torch.tensor([9 + 3 * (1 - 9), 9 + 3 * (2 - 9)]).float())


def test_trajectory_records_chosen_steps():
    s = make_schedule("linear", 100)
    rec = TrajectoryRecorder(record_at=[99, 50, 0])
    ts = make_timesteps(100, 100)
    ddim(gaussian_eps_model(s, 0, 1), s, torch.randn(2, 1, 2, 2), timesteps=ts, callback=rec)
    assert rec.steps == [99, 50, 0] and len(rec.x0) == 3 and rec.x_t[0].shape == (2, 1, 2, 2)
