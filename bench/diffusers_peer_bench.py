"""Our samplers against the peer a user would otherwise pick, on the same exported model, side by side in one run.

A randomly initialised network of a preset (default ddpm-cifar10, the DDPM paper's) is exported with
`python -m ddpm_dist.export`'s code to a diffusers folder; then, at the same steps, batch and x_T:
- DDIM: diffusers' `DDIMPipeline` (eta 0, use_clipped_model_output, as ours) against our `DDIMStep` over the
  pipeline's timesteps;
- DPM-Solver++ (2M): the pipeline's loop with `DPMSolverMultistepScheduler` (dpmsolver++, order 2, on our timesteps
  including t = 0) against our `DPMSolverStep`.
Each pair is run alternately `--repeats` times; it prints the images' largest difference and ours / diffusers in
images per second (aim: >= 1.0).

    .venv/bin/python bench/diffusers_peer_bench.py [--preset ddpm-cifar10] [--batch 8] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_args import model_bench_parser  # noqa: E402 - beside this file (bench/ is sys.path[0])

from ddpm_dist.artifacts import load_trained  # noqa: E402
from ddpm_dist.artifacts.diffusers_format import save_diffusers  # noqa: E402
from ddpm_dist.config import DiffusionConfig  # noqa: E402
from ddpm_dist.diffusion import SamplerOptions, make_timesteps  # noqa: E402
from ddpm_dist.diffusion.samplers import DDIMStep, run_steps  # noqa: E402
from ddpm_dist.diffusion.solvers import DPMSolverStep  # noqa: E402
from ddpm_dist.models import build_model, resolve_model_config  # noqa: E402


def exported_folder(preset: str, out: str) -> str:
    cfg = resolve_model_config(preset)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # every weight drawn, the zero-initialised output convolutions too
            p.copy_(torch.randn(p.shape, generator=g) * 0.03)
    return save_diffusers(out, cfg, model.state_dict(), DiffusionConfig(), SamplerOptions(), f"random {preset}")


def to_images(x: torch.Tensor) -> torch.Tensor:
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): on a busy machine the CPU time is the steadier one."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = model_bench_parser(__doc__, preset="ddpm-cifar10", batch=8, steps=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DDIMPipeline, DPMSolverMultistepScheduler
    from diffusers.utils.torch_utils import randn_tensor

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = exported_folder(args.preset, os.path.join(tmp, "hf"))
        ours = load_trained(folder)
        pipe = DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    model, c = ours.model, ours.config
    schedule = ours.diffusion.make_schedule()
    shape = (args.batch, c.in_channels, c.image_size, c.image_size)
    print(
        f"{args.preset}: {sum(p.numel() for p in model.parameters()):,} parameters, batch {args.batch}, "
        f"{args.steps} steps, {torch.get_num_threads()} threads",
        flush=True,
    )

    def x_T(seed):  # the noise DDIMPipeline draws from a seeded CPU generator
        return randn_tensor(shape, generator=torch.Generator().manual_seed(seed))

    def ddim_theirs(seed):
        out = pipe(
            batch_size=args.batch,
            generator=torch.Generator().manual_seed(seed),
            num_inference_steps=args.steps,
            eta=0.0,
            use_clipped_model_output=True,
            output_type="pt",
        )
        return out.images.permute(0, 2, 3, 1)

    pipe.scheduler.set_timesteps(args.steps)
    ddim_ts = sorted(int(t) for t in pipe.scheduler.timesteps)

    def ddim_ours(seed):
        return to_images(run_steps(DDIMStep(model, schedule, ddim_ts, eta=0.0, clip_x0=True), x_T(seed)))

    dpm = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    dpm_ts = make_timesteps(schedule.num_steps, args.steps, "uniform")

    def dpm_theirs(seed):  # DDPMPipeline's loop with the scheduler swapped: diffusers' way to use DPM-Solver++
        dpm.set_timesteps(timesteps=dpm_ts[::-1])
        x = x_T(seed)
        for t in dpm.timesteps:
            x = dpm.step(pipe.unet(x, t).sample, t, x).prev_sample
        return to_images(x)

    def dpm_ours(seed):
        return to_images(run_steps(DPMSolverStep(model, schedule, dpm_ts, clip_x0=False), x_T(seed)))

    for name, mine, theirs in (("DDIM", ddim_ours, ddim_theirs), ("DPM-Solver++ 2M", dpm_ours, dpm_theirs)):
        mine(99), theirs(99)  # warm-up
        t_ours, t_theirs, diff = [], [], 0.0
        for r in range(args.repeats):
            pair = [(mine, t_ours), (theirs, t_theirs)]
            images = {}
            for fn, times in pair if r % 2 == 0 else pair[::-1]:  # alternate who goes first
                images[fn], wall, cpu = timed(lambda fn=fn, r=r: fn(r))
                times.append((wall, cpu))
            diff = max(diff, (images[mine] - images[theirs]).abs().max().item())
        wall_o, cpu_o = (statistics.median(t[k] for t in t_ours) for k in (0, 1))
        wall_t, cpu_t = (statistics.median(t[k] for t in t_theirs) for k in (0, 1))
        print(
            f"{name:16s} images equal to {diff:.2e} (max |ours - diffusers| in [0, 1]); ours {args.batch / wall_o:.2f}"
            f" images/s, diffusers {args.batch / wall_t:.2f} images/s: ours / diffusers = {wall_t / wall_o:.3f} "
            f"(in CPU time {cpu_t / cpu_o:.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
