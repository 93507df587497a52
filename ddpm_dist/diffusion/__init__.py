"""The diffusion math: schedules, objective, samplers and their options. Nothing here knows about distribution."""
from .objective import diffusion_loss, loss_weight, q_sample, target, to_x0_eps
from .options import SAMPLER_DEFAULTS, SAMPLER_NAMES, SamplerOptions
from .samplers import (
                       STEPS,
                       StackedRandomGenerator,
                       TrajectoryRecorder,
                       classifier_free_guidance,
                       generate,
                       image_seed,
                       make_step,
                       make_timesteps,
                       run_steps,
                       sample,
)
from .schedule import KINDS, Schedule, make_schedule, respace

__all__ = [
    "KINDS", "SAMPLER_DEFAULTS", "SAMPLER_NAMES", "STEPS", "SamplerOptions", "Schedule",
    "StackedRandomGenerator", "TrajectoryRecorder", "classifier_free_guidance", "diffusion_loss",
    "generate", "image_seed", "loss_weight", "make_schedule", "make_step", "make_timesteps", "q_sample", "respace",
    "run_steps", "sample", "target", "to_x0_eps",
]
