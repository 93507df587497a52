"""The checks of bench/gpu_check.py, one function each: check(mode, work) -> {"figures": {...}, "settings": {...}}
(or {"skipped": reason}). Each runs in its own process, started by gpu_check.py with the check's time limit; a
figure is a number or the string 'skipped: reason'. The project's own commands and functions do the work: the
train / sample / evaluate commands, bench/compile_bench.py's Trainer (the Engine and the loop's run_step),
diffusion.denoise_from_seeds, bench/flops.py's FLOP count, matmul and peaks. The device and the process-group
backend come from ddpm_dist.parallel.env, as for every other process of the project."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_CPU_COMPILE = "skipped: a cold torch.compile takes minutes on a CPU (docs/BENCHMARKS.md); the GPU run compiles"

# Sizes per mode. full: what the issue asks for on one GPU; reduced: the same code paths in seconds on a CPU.
SIZES = {
    "full": dict(
        smoke=["train.bf16=true", "train.compile=true"],  # configs/smoke.yaml as it stands: 4,096 images
        smoke_sample=["--num-images", "64"],
        backend=["train.global_batch=128", "train.total_images=1024", "checkpoint.every_images=1024"],
        throughput=dict(preset="ddpm-cifar10", batch=128, steps=5, rounds=3, compile=True),
        sampling=dict(preset="ddpm-cifar10", batch=128, steps=50, rounds=2),
        matmul=8192,
    ),
    "reduced": dict(
        smoke=[
            "train.bf16=true",
            "train.compile=false",
            "train.global_batch=16",
            "train.total_images=32",
            "train.warmup_images=16",
            "train.log_every=1",
            "checkpoint.every_images=16",
            "train.sample_every_images=0",
            "train.sample_grid_classes=false",
            "train.sample_grid_images=4",
            "sample.steps=3",
        ],
        smoke_sample=["--num-images", "8", "--batch-size", "8", "--steps", "3", "--extras", "no"],
        backend=[
            "train.global_batch=8",
            "train.total_images=16",
            "checkpoint.every_images=16",
            "train.warmup_images=0",
            "train.log_every=1",
            "train.sample_grid_classes=false",
            "train.sample_grid_images=4",
            "sample.steps=3",
        ],
        throughput=dict(preset="tiny", batch=4, steps=1, rounds=1, compile=False),
        sampling=dict(preset="tiny", batch=4, steps=10, rounds=1),
        matmul=1024,
    ),
}


class CheckError(RuntimeError):
    """A check's failure, in one line."""


def partial(work: str, name: str, figures: dict) -> None:
    """The figures measured so far: gpu_check.py reports them if the check then fails or runs out of time."""
    path = os.path.join(work, f"{name}.partial.json")
    with open(path + ".tmp", "w") as f:
        json.dump(figures, f, indent=1)
    os.replace(path + ".tmp", path)


def _last_line(path: str) -> str:
    lines = [seg.strip() for line in open(path, errors="replace") for seg in line.split("\r") if seg.strip()]
    return lines[-1][:300] if lines else "(no output)"


def command(work: str, name: str, *args: str) -> float:
    """Run `python -m ddpm_dist.<args>` from the repository root, its output in work/<name>.log; seconds taken. The
    child stays in this process's group, so the check's time limit ends it too."""
    log = os.path.join(work, f"{name}.log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise CheckError(f"{' '.join(args[:2])} exited {rc}: {_last_line(log)}")
    return time.perf_counter() - t0


def train_figures(run: str) -> dict:
    """Throughput, loss and committed checkpoints of a finished run, from its metrics.jsonl and checkpoints/."""
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    train = [r for r in rows if r.get("event") == "train"]
    if not train:
        raise CheckError(f"{run}: no train event in metrics.jsonl")
    ckpts = os.path.join(run, "checkpoints")
    committed = [c for c in os.listdir(ckpts) if os.path.exists(os.path.join(ckpts, c, "COMMITTED"))]
    if not committed:
        raise CheckError(f"{run}: no committed checkpoint")
    if not os.path.exists(os.path.join(run, "export.safetensors")):
        raise CheckError(f"{run}: no export.safetensors")
    later = [r["images_per_s"] for r in train[1:]] or [train[0]["images_per_s"]]  # the first window compiles
    return {
        "train_images_per_s": statistics.median(later),
        "final_loss": train[-1]["loss"],
        "images": train[-1]["images"],
        "checkpoints_committed": len(committed),
    }


def smoke(mode: str, work: str) -> dict:
    """(a) configs/smoke.yaml end to end with bf16 autocast and torch.compile: train (checkpoints, export), sample
    from the run's newest checkpoint, the Fréchet distance of those samples (digits classifier features)."""
    sizes = SIZES[mode]
    run, samples, result = (os.path.join(work, p) for p in ("smoke", "smoke_samples", "smoke_frechet.json"))
    overrides = [f"run_dir={run}", *sizes["smoke"]]
    figures = {"train_s": command(work, "smoke_train", "ddpm_dist.train", "--config", "configs/smoke.yaml", *overrides)}
    figures.update(train_figures(run))
    partial(work, "smoke", figures)
    figures["sample_s"] = command(
        work, "smoke_sample", "ddpm_dist.sample", "--run", run, "--out", samples, *sizes["smoke_sample"]
    )
    figures["samples_written"] = sum(f.endswith(".png") and f[:-4].isdigit() for f in os.listdir(samples))
    figures["evaluate_s"] = command(
        work, "smoke_evaluate", "ddpm_dist.evaluate", "frechet", "--samples", samples, "--out", result
    )
    figures["frechet_distance"] = json.load(open(result))["value"]
    compile_on = "train.compile=true" in overrides
    return {
        "figures": figures,
        "settings": {
            "config": "configs/smoke.yaml",
            "overrides": overrides[1:],
            "bf16": True,
            "compile": True if compile_on else NO_CPU_COMPILE,
        },
    }


def backend(name: str, mode: str, work: str) -> dict:
    """(b) one process on a world-size-1 process group (parallel.ensure_process_group: NCCL when the device is a GPU,
    gloo on the CPU): a few steps of the train command, a checkpoint in the engine's own format, the export."""
    import importlib.util

    if name == "zero" and importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "skipped: deepspeed is not installed (pip install deepspeed)"}
    run = os.path.join(work, name)
    overrides = [f"run_dir={run}", f"parallel.backend={name}", *SIZES[mode]["backend"]]
    seconds = command(work, f"{name}_train", "ddpm_dist.train", "--config", "configs/smoke.yaml", *overrides)
    figures = {"train_s": seconds, **train_figures(run)}
    return {
        "figures": figures,
        "settings": {
            "process_group": "world size 1 on the backend env.py picks (nccl on a GPU, gloo on a CPU)",
            "overrides": overrides[1:],
        },
    }


def train_throughput(mode: str, work: str) -> dict:
    """(c) training images/s of the Engine through the loop's run_step (bench/compile_bench.py's Trainer: forward,
    loss, backward, clipping, AdamW) at the preset's batch: first fp32 and bf16 autocast eager, side by side in
    rotating rounds (median round), then each dtype compiled beside its eager run again (compile seconds = the first
    compiled step less the median one). The figures so far are saved after each stage, so a compile that runs out
    of the check's time leaves the eager ones."""
    from compile_bench import Trainer, initial_state, side_by_side

    p = SIZES[mode]["throughput"]
    state = initial_state(p["preset"])
    figures: dict = {}

    def trainer(dtype: str, compiled: bool):
        return lambda: Trainer(p["preset"], p["batch"], state, bf16=dtype == "bf16", compile=compiled)

    def record(key: str, median: float) -> None:
        figures[f"{key}_images_per_s"] = p["batch"] / median
        figures[f"{key}_steps_per_s"] = 1 / median

    (fp32, bf16), _ = side_by_side([trainer("fp32", False), trainer("bf16", False)], p["steps"], p["rounds"])
    record("fp32_eager", fp32)
    record("bf16_eager", bf16)
    figures["bf16_speedup_eager"] = fp32 / bf16
    partial(work, "train_throughput", figures)
    for dtype in ("fp32", "bf16"):
        if not p["compile"]:
            figures[f"{dtype}_compiled_images_per_s"] = figures[f"{dtype}_compiled_steps_per_s"] = NO_CPU_COMPILE
            continue
        (compiled, eager), (first, _) = side_by_side(
            [trainer(dtype, True), trainer(dtype, False)], p["steps"], p["rounds"]
        )
        record(f"{dtype}_compiled", compiled)
        figures[f"{dtype}_compile_s"] = first - compiled
        figures[f"{dtype}_compile_speedup"] = eager / compiled
        partial(work, "train_throughput", figures)
    return {"figures": figures, "settings": {**p, "device": str(project_device())}}


def project_device():
    """The device env.py gives this single process (the one every Trainer's engine runs on too)."""
    from ddpm_dist.parallel.env import read_env

    return read_env().device


def sampling(mode: str, work: str) -> dict:
    """(d) DDIM-50 images/s: diffusion.denoise_from_seeds (per-image seeds, as the sample command) on the device
    env.py picks, fp32 and under bf16 autocast; one warm-up batch, then the median of the timed batches."""
    import torch

    from ddpm_dist.diffusion import SamplerOptions, denoise_from_seeds, image_seed, make_schedule
    from ddpm_dist.models import build_model

    p = SIZES[mode]["sampling"]
    device = project_device()
    torch.manual_seed(0)
    model = build_model(p["preset"]).to(device).eval()
    c = model.config
    schedule = make_schedule("linear", 1000)

    def batch_seconds(r: int, amp: bool) -> float:
        seeds = [image_seed(r, i) for i in range(p["batch"])]
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            x = denoise_from_seeds(
                model,
                schedule,
                seeds,
                (c.in_channels, c.image_size, c.image_size),
                SamplerOptions("ddim", p["steps"], 0.0),
                device=device,
            )
        float(x.float().abs().mean())  # waits for the device
        return time.perf_counter() - t0

    figures = {}
    for dtype in ("fp32", "bf16"):
        batch_seconds(0, dtype == "bf16")
        sec = statistics.median(batch_seconds(r + 1, dtype == "bf16") for r in range(p["rounds"]))
        figures[f"ddim{p['steps']}_{dtype}_images_per_s"] = p["batch"] / sec
    return {"figures": figures, "settings": {**p, "sampler": "ddim", "eta": 0.0, "device": str(device)}}


def mfu(mode: str, work: str) -> dict:
    """(e) MFU = bench/flops.py's counted FLOPs per image x images/s of (c) and (d) / flops.reference (the
    datasheet dense peak of a listed GPU, else the measured matmul); the measured matmul's fraction beside it."""
    import argparse

    import flops
    import torch

    from ddpm_dist.diffusion import make_schedule
    from ddpm_dist.models import build_model

    device = project_device()
    preset = SIZES[mode]["throughput"]["preset"]
    torch.manual_seed(0)
    model = build_model(preset).to(device)
    schedule = make_schedule("linear", 1000)
    per_train = flops.count_flops(model, schedule, 2, device, True) / 2
    per_step = flops.count_flops(model, schedule, 2, device, False) / 2
    figures = {"gflops_per_train_image": per_train / 1e9, "gflops_per_sampling_step": per_step / 1e9}
    settings = {"preset": preset, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    refs, matmuls = {}, {}
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = flops.Matmul(device, dtype, SIZES[mode]["matmul"])
        m.sample(10)
        matmuls[key] = m.flops
        refs[key], settings[f"reference_{key}"] = flops.reference(
            device, key, m.flops, argparse.Namespace(peak_tflops=None)
        )
        figures[f"matmul_{key}_tflops"] = m.flops / 1e12
        figures[f"reference_{key}_tflops"] = refs[key] / 1e12

    def read(check: str) -> dict:
        path = os.path.join(work, f"{check}.json")
        return json.load(open(path)).get("figures", {}) if os.path.exists(path) else {}  # gpu_check.py's record

    throughput, samples = read("train_throughput"), read("sampling")
    for key in ("fp32", "bf16"):
        for comp in ("eager", "compiled"):
            ips = throughput.get(f"{key}_{comp}_images_per_s", "skipped: train_throughput gave no figure")
            figures[f"mfu_train_{key}_{comp}"] = per_train * ips / refs[key] if isinstance(ips, (int, float)) else ips
            if isinstance(ips, (int, float)):
                figures[f"of_matmul_train_{key}_{comp}"] = per_train * ips / matmuls[key]
        steps = SIZES[mode]["sampling"]["steps"]
        ips = samples.get(f"ddim{steps}_{key}_images_per_s", "skipped: sampling gave no figure")
        figures[f"mfu_ddim{steps}_{key}"] = per_step * steps * ips / refs[key] if isinstance(ips, (int, float)) else ips
    return {"figures": figures, "settings": settings}


CHECKS = {
    "smoke": smoke,
    "fsdp": lambda mode, work: backend("fsdp", mode, work),
    "zero": lambda mode, work: backend("zero", mode, work),
    "train_throughput": train_throughput,
    "sampling": sampling,
    "mfu": mfu,
}
