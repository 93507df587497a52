"""The diffusion math: schedules, objective, samplers. Nothing here knows about distribution."""
from .objective import diffusion_loss, loss_weight, q_sample, target, to_x0_eps
from .samplers import (SAMPLERS, StackedRandomGenerator, TrajectoryRecorder, classifier_free_guidance, ddim, ddpm, generate,
                       image_seed, make_timesteps, sample)
from .schedule import KINDS, Schedule, make_schedule, respace

__all__ = [
    "KINDS", "SAMPLERS", "Schedule", "StackedRandomGenerator", "TrajectoryRecorder", "classifier_free_guidance",
    "ddim", "ddpm", "diffusion_loss", "generate", "image_seed", "loss_weight", "make_schedule", "make_timesteps", "q_sample",
    "respace", "sample", "target", "to_x0_eps",
]
