"""The diffusion math: schedules, objective, samplers and their options. Nothing here knows about distribution."""

from .objective import diffusion_loss, loss_weight, q_sample, target, to_x0_eps
from .options import SAMPLER_DEFAULTS, SAMPLER_NAMES, SamplerOptions
from .samplers import (
    STEPS,
    StackedRandomGenerator,
    TrajectoryRecorder,
    classifier_free_guidance,
    denoise_from_seeds,
    image_seed,
    make_step,
    make_timesteps,
    run_steps,
)
from .schedule import KINDS, Schedule, make_schedule, respace

__all__ = [
    "KINDS",
    "SAMPLER_DEFAULTS",
    "SAMPLER_NAMES",
    "STEPS",
    "SamplerOptions",
    "Schedule",
    "StackedRandomGenerator",
    "TrajectoryRecorder",
    "classifier_free_guidance",
    "diffusion_loss",
    "denoise_from_seeds",
    "image_seed",
    "loss_weight",
    "make_schedule",
    "make_step",
    "make_timesteps",
    "q_sample",
    "respace",
    "run_steps",
    "target",
    "to_x0_eps",
]
