"""Post-hoc EMA reconstruction from the snapshots of a run: for each requested relative std, the least-squares
combination of the snapshot profiles (phema.solve_coefficients) applied to their weights, written as an export
(artifacts.save_export, the reconstruction as its 'ema' weights).

Streaming: snapshots are read one at a time, each rank reading with DCP only the tensors it owns (the flat list of
tensors dealt to ranks by size: `deal`), into a float64 accumulator per requested std. Memory per rank: about
(1 + 2 x stds) / world of the fp32 model. Rank 0 gathers the slices and writes the exports. The result does not depend
on the world size: each tensor is accumulated in the same snapshot order whichever rank owns it."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..artifacts import load_dcp, run_config, save_export
from ..models import UNet, resolve_model_config
from ..obs.log import setup_logging
from ..parallel.collectives import barrier
from ..parallel.env import init_distributed, read_env, shutdown
from ..parallel.sharded_ema import gather_flat_to_main
from .phema import MAX_STD, fit_error, solve_coefficients, std_to_exp
from .snapshots import SNAPSHOT_DIR, Snapshot, committed_snapshots, read_snapshot_meta

log = logging.getLogger(__name__)


@dataclass
class Plan:
    snapshots: list[Snapshot]
    stds: list[float]
    images: int  # the training time reconstructed
    coefficients: np.ndarray  # [snapshots, stds]
    model_config: dict


def check_stds(stds: list[float]) -> list[float]:
    bad = [s for s in stds if not 0 < s < MAX_STD]
    if bad or not stds:
        raise ValueError(f"--std {bad or stds}: relative stds must be in (0, {MAX_STD})")
    return sorted(set(stds))


def make_plan(
    run_dir: str, stds: list[float], images: int | None = None, snapshots: list[Snapshot] | None = None
) -> Plan:
    """Coefficients for `stds` at `images` seen (default: the newest snapshots), from the snapshots up to then."""
    stds = check_stds(stds)
    found = committed_snapshots(os.path.join(run_dir, SNAPSHOT_DIR)) if snapshots is None else snapshots
    if not found:
        raise FileNotFoundError(
            f"no committed EMA snapshot under '{os.path.join(run_dir, SNAPSHOT_DIR)}' (train with "
            f"ema.stds and ema.snapshot_every_images)"
        )
    times = sorted({s.images for s in found})
    images = times[-1] if images is None else images
    if images not in times:
        raise ValueError(f"--images {images}: not a snapshot time (have {times[0]} .. {times[-1]}, {len(times)} times)")
    used = [s for s in found if 0 < s.images <= images]
    coefficients = solve_coefficients([s.images for s in used], [s.std for s in used], images, stds)
    return Plan(used, stds, images, coefficients, read_snapshot_meta(used[-1].path)["model_config"])


def export_path(out_dir: str, images: int, std: float) -> str:
    """Where the reconstruction at `std` of training time `images` is written (and found again by the sweep)."""
    return os.path.join(out_dir, f"phema-{images:012d}-{std:.4f}.safetensors")


def param_shapes(model_config: dict) -> dict[str, torch.Size]:
    """The EMA's tensors (the model's parameters) and their shapes, without allocating them."""
    with torch.device("meta"):
        return {k: p.shape for k, p in UNet(resolve_model_config(model_config)).named_parameters()}


def deal(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each tensor: largest first to the least loaded rank (deterministic)."""
    load, owner = [0] * world_size, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + sizes[i]
    return owner


def accumulate(plan: Plan, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """sum_i coefficient[i, j] x snapshot_i[name] for the tensors `names`, per requested std j (float64, CPU)."""
    shapes = param_shapes(plan.model_config)
    template = {k: torch.empty(shapes[k], dtype=torch.float32) for k in names}
    acc = [{k: torch.zeros_like(v, dtype=torch.float64) for k, v in template.items()} for _ in plan.stds]
    for i, snap in enumerate(plan.snapshots):
        state = {"ema": template}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process"
            load_dcp(state, snap.path, no_dist=True)  # only these tensors are read
        for j, out in enumerate(acc):
            for k, v in template.items():
                out[k].add_(v.double(), alpha=float(plan.coefficients[i, j]))
    return acc


def reconstruct(run_dir: str, stds: list[float], out_dir: str, images: int | None = None) -> list[str]:
    """One rank's part (every rank calls it; world size from the environment); rank 0 returns the export paths."""
    env = read_env()
    setup_logging(env.rank)
    env = init_distributed(env)
    try:
        plan = make_plan(run_dir, stds, images)
        shapes = param_shapes(plan.model_config)
        names = list(shapes)
        owner = deal([shapes[k].numel() for k in names], env.world_size)
        mine = [k for k, r in zip(names, owner) if r == env.rank]
        if env.is_main:
            log.info(
                "reconstructing std %s at %d images from %d snapshots on %d rank(s)",
                plan.stds,
                plan.images,
                len(plan.snapshots),
                env.world_size,
            )
        acc = accumulate(plan, mine)
        counts = [sum(shapes[k].numel() for k, r in zip(names, owner) if r == rank) for rank in range(env.world_size)]
        paths = []
        for j, std in enumerate(plan.stds):
            flat = torch.cat([acc[j][k].float().reshape(-1) for k in mine]) if mine else torch.zeros(0)
            parts = gather_flat_to_main(flat, counts)
            if parts is not None:
                paths.append(_write(plan, j, std, _unflatten(parts, names, owner, shapes), run_dir, out_dir))
        barrier()
        return paths
    finally:
        if env.distributed:
            shutdown()


def _unflatten(parts, names, owner, shapes) -> dict[str, torch.Tensor]:
    offsets, out = [0] * len(parts), {}
    for k, r in zip(names, owner):
        n = shapes[k].numel()
        out[k] = parts[r][offsets[r] : offsets[r] + n].reshape(shapes[k]).clone()
        offsets[r] += n
    return out


def _write(plan: Plan, j: int, std: float, weights: dict, run_dir: str, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    try:
        run_cfg = run_config(run_dir)
    except FileNotFoundError:
        run_cfg = {}
    column = plan.coefficients[:, j]
    info = {
        "images": plan.images,
        "diffusion": run_cfg.get("diffusion"),
        "sample": run_cfg.get("sample"),
        "posthoc_ema": {
            "std": std,
            "gamma": float(std_to_exp(std)),
            "snapshots": len(plan.snapshots),
            "profile_fit_error": fit_error(
                [s.images for s in plan.snapshots], [s.std for s in plan.snapshots], plan.images, std, column
            ),
        },
    }
    path = export_path(out_dir, plan.images, std)
    save_export(path, weights, None, plan.model_config, info)
    log.info("post-hoc EMA std %.4f: %s (profile fit error %.2e)", std, path, info["posthoc_ema"]["profile_fit_error"])
    return path
