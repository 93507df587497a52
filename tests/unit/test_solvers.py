"""DPM-Solver++ and Heun: step-by-step parity with diffusers in float64, exactness on Gaussian data, and the
properties every sampler has here (guidance, trajectories, seed-addressed batches, every task)."""

import math

import pytest
import torch

from ddpm_dist.diffusion import (
    STEPS,
    SamplerOptions,
    StackedRandomGenerator,
    TrajectoryRecorder,
    denoise_from_seeds,
    make_schedule,
    make_step,
    make_timesteps,
    run_steps,
)
from ddpm_dist.diffusion.options import model_calls
from ddpm_dist.diffusion.solvers import DPMSolverStep, sigmas_of
from tests.unit.test_samplers import gaussian_eps_model

SOLVERS = ("dpm++2m", "dpm++3m", "heun")
PARITY_RTOL = 1e-5


def toy_eps_model(schedule):
    """A fixed nonlinear eps model (the Gaussian denoiser plus a tanh term, so higher orders matter). It takes
    diffusers' float timesteps too (they are whole numbers here)."""
    exact = gaussian_eps_model(schedule, 0.3, 0.5)

    def model(x, t, **kw):
        t = t.round().long()
        s1a = (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, *([1] * (x.dim() - 1)))
        return exact(x, t) + 0.2 * s1a * torch.tanh(3 * x)

    return model


def ours_step_by_step(name, model, schedule, timesteps, x_T):
    step = STEPS[name](model, schedule, timesteps, clip_x0=False)
    x, out = x_T, []
    for i in reversed(range(len(timesteps))):
        x, _ = step(x, i, None)
        out.append(x)
    return out


def diffusers_dpm(order, model, schedule, timesteps, x_T):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_steps,
        algorithm_type="dpmsolver++",
        solver_order=order,
        prediction_type="epsilon",
    )
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()  # our float64 schedule: compare the algorithm only
    sched.set_timesteps(timesteps=timesteps[::-1])
    x, out = x_T, []
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(len(x))), t, x).prev_sample
        out.append(x)
    return out


def diffusers_heun(model, schedule, timesteps, x_T):
    """diffusers works in x / sqrt(abar) and takes two scheduler steps per Heun step: converted back to x_t
    after each full step (and the last, Euler, one) to compare with ours."""
    from diffusers import HeunDiscreteScheduler

    sigmas = sigmas_of(schedule)
    sched = HeunDiscreteScheduler(num_train_timesteps=schedule.num_steps, prediction_type="epsilon")
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    sched.set_timesteps(timesteps=[float(t) for t in timesteps[::-1]])
    x = x_T * (1 + sigmas[timesteps[-1]] ** 2).sqrt()
    out, targets = [], timesteps[::-1][1:]
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t.expand(len(x))), t, x).prev_sample
        if sched.state_in_first_order:  # a Heun step is complete
            out.append(x / (1 + sigmas[targets[len(out)]] ** 2).sqrt())
    return out + [x]  # the last step ends at sigma 0, where x / sqrt(abar) = x


def max_relative(ours, theirs) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize(
    "kind,spacing,steps",
    [("linear", "uniform", 10), ("linear", "uniform", 20), ("cosine", "quadratic", 12), ("linear", "karras", 18)],
)
def test_step_by_step_parity_with_diffusers(name, kind, spacing, steps):
    """The same timesteps given to both (karras: ours, rounded to training steps; see docs/EVALUATION.md)."""
    pytest.importorskip("diffusers")
    schedule = make_schedule(kind, 1000)
    model = toy_eps_model(schedule)
    ts = make_timesteps(1000, steps, spacing, schedule)
    x_T = torch.randn(6, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = ours_step_by_step(name, model, schedule, ts, x_T)
    theirs = (
        diffusers_heun(model, schedule, ts, x_T)
        if name == "heun"
        else diffusers_dpm(3 if name == "dpm++3m" else 2, model, schedule, ts, x_T)
    )
    assert len(ours) == len(theirs) == steps
    assert max_relative(ours, theirs) < PARITY_RTOL


@pytest.mark.parametrize(
    "name,spacing,steps",
    [("dpm++2m", "karras", 50), ("dpm++3m", "karras", 20), ("heun", "uniform", 25), ("heun", "karras", 40)],
)
def test_solvers_reproduce_gaussian_data(name, spacing, steps):
    """With the exact denoiser of N(mu, s^2) data the probability-flow ODE maps x_T to a known point: each
    image lands near it, and the samples have the data's mean and std."""
    mu, sd = 0.3, 0.5
    s = make_schedule("linear", 1000)
    x_T = torch.randn(8000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    step = STEPS[name](gaussian_eps_model(s, mu, sd), s, make_timesteps(1000, steps, spacing, s), clip_x0=False)
    x = run_steps(step, x_T)
    a_T = s.alphas_cumprod[-1]
    exact = mu + sd * (x_T - a_T.sqrt() * mu) / (a_T * sd**2 + 1 - a_T).sqrt()
    assert (x - exact).abs().max().item() < 0.05
    assert x.mean().item() == pytest.approx(mu, abs=0.025)
    assert x.std().item() == pytest.approx(sd, rel=0.05)


def test_second_order_beats_ddim_at_equal_model_calls():
    s = make_schedule("linear", 1000)
    model = gaussian_eps_model(s, 0.3, 0.5)
    x_T = torch.randn(500, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a_T = s.alphas_cumprod[-1]
    exact = 0.3 + 0.5 * (x_T - a_T.sqrt() * 0.3) / (a_T * 0.25 + 1 - a_T).sqrt()

    def error(name, steps, spacing):
        ts = make_timesteps(1000, steps, spacing, s)
        return (run_steps(STEPS[name](model, s, ts, clip_x0=False), x_T) - exact).abs().max().item()

    ddim = error("ddim", 49, "uniform")
    assert error("heun", 25, "uniform") < ddim / 3 and error("dpm++2m", 49, "karras") < ddim / 3


def test_model_calls_per_step():
    s = make_schedule("linear", 100)
    calls = []
    exact = gaussian_eps_model(s, 0.0, 1.0)

    def model(x, t, **kw):
        calls.append(int(t[0]))
        return exact(x, t)

    for name in ("ddim", *SOLVERS):
        calls.clear()
        step = make_step(model, s, SamplerOptions(name, 7, clip_x0=False))
        run_steps(step, torch.randn(2, 1, 2, 2))
        assert len(calls) == model_calls(name, 7), name
    assert model_calls("heun", 18) == 35


@pytest.mark.parametrize("name", SOLVERS)
def test_guidance_changes_solvers_as_in_the_combined_model(name):
    """Guidance goes through the model (one batched call per evaluation): the guided solver equals the solver
    on the combined model uncond + w (cond - uncond)."""
    s = make_schedule("linear", 100)
    base = gaussian_eps_model(s, 0.0, 0.5)

    def model(x, t, y=None):
        return base(x, t) + 0.1 * y.view(-1, 1, 1, 1).to(x.dtype)

    y = torch.tensor([1, 2])
    x_T = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    guided = run_steps(
        make_step(model, s, SamplerOptions(name, 8, guidance=3.0, clip_x0=False), y=y, null_class=5), x_T
    )
    combined = run_steps(
        STEPS[name](
            lambda x, t, y=None: (
                model(x, t, y=torch.full_like(y, 5)) + 3.0 * (model(x, t, y=y) - model(x, t, y=torch.full_like(y, 5)))
            ),
            s,
            make_timesteps(100, 8),
            clip_x0=False,
            model_kwargs={"y": y},
        ),
        x_T,
    )
    unguided = run_steps(make_step(model, s, SamplerOptions(name, 8, clip_x0=False), y=y, null_class=5), x_T)
    assert torch.allclose(guided, combined, atol=1e-9) and not torch.allclose(guided, unguided, atol=1e-3)


@pytest.mark.parametrize("name", SOLVERS)
def test_trajectory_holds_x_t_and_x0_of_every_step(name):
    s = make_schedule("linear", 100)
    rec = TrajectoryRecorder()
    x = denoise_from_seeds(
        gaussian_eps_model(s, 0.0, 0.5), s, [3, 4], (1, 2, 2), SamplerOptions(name, 6), device="cpu", callback=rec
    )
    assert rec.steps == make_timesteps(100, 6)[::-1] and len(rec.x0) == 6
    assert torch.equal(rec.x0[-1], x)  # the last step lands on its x0 prediction
    assert torch.equal(rec.x_t[0], StackedRandomGenerator("cpu", [3, 4]).randn((2, 1, 2, 2)))  # x_T, then each x_t


@pytest.mark.parametrize("name,churn", [("dpm++2m", 0.0), ("dpm++3m", 0.0), ("heun", 0.0), ("heun", 10.0)])
def test_images_do_not_depend_on_batch_mates(name, churn):
    s = make_schedule("linear", 50)
    options = SamplerOptions(name, 8, clip_x0=False, churn=churn)
    one = denoise_from_seeds(gaussian_eps_model(s, 0.0, 0.5), s, [11], (1, 2, 2), options, device="cpu")
    many = denoise_from_seeds(gaussian_eps_model(s, 0.0, 0.5), s, [7, 11, 13], (1, 2, 2), options, device="cpu")
    assert torch.allclose(one[0], many[1], atol=1e-6)


def test_churn_is_seeded_noise_within_its_sigma_range():
    s = make_schedule("linear", 100)
    model = gaussian_eps_model(s, 0.0, 0.5)

    def run(seeds, **kw):
        return denoise_from_seeds(model, s, seeds, (1, 2, 2), SamplerOptions("heun", 8, **kw), device="cpu")

    assert torch.equal(run([1], churn=5.0), run([1], churn=5.0))
    assert not torch.equal(run([1], churn=5.0), run([1]))
    assert torch.equal(run([1], churn=5.0, churn_sigma_min=1e9), run([1]))  # no sigma in range: deterministic


class SpyDPM(DPMSolverStep):
    """Records (index, x in, x out, history length) of every call."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def __call__(self, x, i, rng):
        out = super().__call__(x, i, rng)
        self.calls.append((i, x, out[0], len(self.history)))
        return out


def test_repaint_resampling_restarts_the_multistep_history():
    """RePaint redoes step i after going back up: that call must not use the x0 of the abandoned path, so it
    is a first-order step (= DDIM eta 0 from the same x); calls that continue the chain stay second order."""
    from ddpm_dist.sampling.inpaint import RePaintStep

    s = make_schedule("linear", 100)
    model = gaussian_eps_model(s, 0.0, 0.5)
    ts = make_timesteps(100, 6)
    spy = SpyDPM(model, s, ts, clip_x0=False)
    ddim = STEPS["ddim"](model, s, ts, eta=0.0, clip_x0=False)
    known = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    keep = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    keep[..., :2, :] = 1
    x = run_steps(
        RePaintStep(spy, known, keep, resample=3),
        torch.randn(2, 1, 4, 4, dtype=torch.float64),
        torch.Generator().manual_seed(0),
    )
    assert torch.equal(x[..., :2, :], known[..., :2, :])
    previous = None
    for i, x_in, x_out, history in spy.calls:
        if i > 0 and previous == i:  # a redo after a jump back up
            assert history == 1 and torch.allclose(x_out, ddim(x_in, i, None)[0], atol=1e-12)
        elif i > 0 and previous == i + 1:  # continuing the chain: second order
            assert history == 2 and not torch.allclose(x_out, ddim(x_in, i, None)[0], atol=1e-6)
        previous = i
    assert [c[0] for c in spy.calls].count(3) == 3


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("task", ["generate", "inpaint", "sr"])
def test_every_task_runs_every_solver(tmp_path, name, task):
    """Through the path `sample --task` takes; inpainting with RePaint jumps (resample 2) keeps the known region."""
    import numpy as np

    from ddpm_dist.artifacts import load_trained
    from ddpm_dist.sampling import TaskSpec, build_task, make_share, prepare
    from tests.support.common import DIGITS
    from tests.unit.test_sampling_options import export

    trained = load_trained(export(tmp_path, **({"num_classes": 0, "cond_channels": 1} if task == "sr" else {})))
    spec = TaskSpec(task, image=None if task == "generate" else DIGITS, image_index=4, mask="lower-half", resample=2)
    setup = prepare(trained, torch.device("cpu"), {"sampler": name, "steps": 4, "churn": 1.0})
    built = build_task(spec, trained.config)
    images = next(make_share(setup, [([0, 1], True)], seed=1, classes=None, num_images=2, task=built))[1]
    assert images.shape == (2, 16, 16, 1) and images.std() > 0
    if task == "inpaint":
        assert built.measure(dict(enumerate(images)))["known_region_max_error"] <= 1
        assert not np.array_equal(images[0][8:], images[1][8:])  # the hole differs by seed
    assert math.isfinite(float(images.mean()))


def test_nfe_command_prints_the_table_and_draws(tmp_path, capsys):
    from ddpm_dist.viz import main
    from tests.support.common import DIGITS
    from tests.unit.test_sampling_options import export

    out = tmp_path / "nfe.png"
    assert (
        main(
            [
                "nfe",
                "--export",
                export(tmp_path),
                "--data",
                DIGITS,
                "--num-images",
                "3",
                "--batch-size",
                "3",
                "--nfe",
                "2",
                "--samplers",
                "dpm++2m@karras,heun:2/3",
                "--json",
                str(tmp_path / "nfe.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| model calls | dpm++2m@karras | heun |" in printed and "| 2 |" in printed
    assert "(NFE 1, " in printed and "| 3 |  | " in printed  # Heun at an even budget: the odd count below it
    assert out.stat().st_size > 0


def test_heun_starts_at_edm_sigma_max_on_a_cosine_schedule():
    """Cosine's sigma at t = 999 is 20,291: Heun (and karras spacing) start at the last timestep with sigma <= 80,
    and still reproduce Gaussian data from x_T ~ N(0, I) there."""
    s = make_schedule("cosine", 1000)
    step = make_step(gaussian_eps_model(s, 0.3, 0.5), s, SamplerOptions("heun", 25, spacing="karras", clip_x0=False))
    assert sigmas_of(s)[step.timesteps[-1]] <= 80 < sigmas_of(s)[step.timesteps[-1] + 1]
    assert make_timesteps(1000, 10, "uniform", s)[-1] == 999  # the others keep T-1 with uniform spacing
    x = run_steps(step, torch.randn(8000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert x.mean().item() == pytest.approx(0.3, abs=0.025) and x.std().item() == pytest.approx(0.5, rel=0.05)
