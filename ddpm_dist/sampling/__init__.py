"""Running a trained model: seed-addressed, distributed, resumable generation; inpainting and
super-resolution as tasks of the same generation; one SamplerOptions for every sampler setting."""

from ..diffusion import SamplerOptions
from .inpaint import RePaintStep, inpaint, make_mask
from .job import SampleJob, sample_to_folder
from .plan import labels_for, plan_batches, rank_share
from .setup import SamplingSetup, make_batch, make_share, prepare
from .tasks import TASKS, Generate, Inpaint, SuperResolution, TaskSpec, build_task

__all__ = [
    "Generate",
    "Inpaint",
    "RePaintStep",
    "SampleJob",
    "SamplerOptions",
    "SamplingSetup",
    "SuperResolution",
    "TASKS",
    "TaskSpec",
    "build_task",
    "make_batch",
    "make_share",
    "inpaint",
    "labels_for",
    "make_mask",
    "plan_batches",
    "prepare",
    "rank_share",
    "sample_to_folder",
]
