"""The post-hoc EMA sweep: the reconstruction at each relative std of a range (reconstruct.py), each scored with the
project's Fréchet distance in the digits classifier's features (eval/job.py), so the EMA length is chosen after
training (EDM2, sec. 3). Every length is sampled from the same seed-addressed images (the frechet job's seeds), so the
distances differ by the weights alone.

Exports go where `ema reconstruct` writes them (RUN/ema_exports/phema-<images>-<std>.safetensors): those already
there are reused. The reference statistics are computed once per sweep (OUT/ref-stats.npz) instead of once per
length; float64 through the .npz, so each distance equals `evaluate frechet --export` with the same arguments.
Rank 0 writes OUT/frechet-<std>.json per length, then OUT/sweep.json, OUT/sweep.png and OUT/best.safetensors (a
copy of the best length's export).

Only a length the snapshots can express is eligible for best: its profile fit error (phema.fit_error, closed form,
known before any weights are read) must be at most `max_fit_error`. The others are scored, drawn and listed as
unreliable; a range without any reliable length fails before anything is written, naming the profiles to track."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..artifacts import run_config, run_data_source
from ..drawing.ema_sweep import frechet_against_std
from ..eval.job import FrechetJob, frechet_worker, make_extractor, read_result
from ..eval.statistics import compute_ref_stats
from ..parallel.env import read_env, spawn_local
from ..redact import to_json
from .phema import MAX_STD, fit_error, solve_coefficients
from .reconstruct import Plan, check_stds, export_path, make_plan, reconstruct

EXPORTS_DIR = "ema_exports"  # shared with `ema reconstruct`: either command reuses the other's exports
BEST_EXPORT = "best.safetensors"
STD_DECIMALS = 4  # the precision of the export names: a std is rounded to it, so a name means one std
# The largest profile fit error a length may have to be chosen as best: measured against profiles tracked explicitly
# (docs/EMA.md, "How exact must the fit be").
DEFAULT_MAX_FIT_ERROR = 0.01


@dataclass
class SweepJob:
    run: str
    stds: list[float]
    out: str
    num_images: int = 500
    batch_size: int = 64
    seed: int = 0
    classes: Optional[str] = None
    sampler: dict = field(default_factory=dict)  # SamplerOptions fields overriding the run's (e.g. guidance)
    data: Optional[str] = None  # labelled shard manifest: the classifier and the reference; default the run's data
    max_fit_error: float = DEFAULT_MAX_FIT_ERROR  # the largest profile fit error a length may have to be best


def parse_std_range(text: str) -> list[float]:
    """'0.01:0.20:12' -> 12 evenly spaced relative stds from 0.01 to 0.20 (both included), rounded to STD_DECIMALS."""
    usage = f"--std-range '{text}': expected LOW:HIGH:COUNT with 0 < LOW < HIGH < {MAX_STD} and COUNT >= 2"
    parts = text.split(":")
    try:
        low, high, count = float(parts[0]), float(parts[1]), int(parts[2])
    except (ValueError, IndexError):
        raise ValueError(usage) from None
    if len(parts) != 3 or not 0 < low < high < MAX_STD or count < 2:
        raise ValueError(usage)
    stds = [round(float(s), STD_DECIMALS) for s in np.linspace(low, high, count)]
    if len(set(stds)) != count or stds[0] <= 0:
        raise ValueError(
            f"--std-range '{text}': {count} stds would be closer than 1e-{STD_DECIMALS} (the export names' precision)"
        )
    return check_stds(stds)


def run_sweep(
    job: SweepJob, world_size: int = 1, progress: Optional[Callable[[int, int, dict], None]] = None
) -> Optional[dict]:
    """Every rank calls it (world size from the environment, or `world_size` local workers spawned per stage); rank 0
    returns the summary written to sweep.json and calls progress(index, count, row) after each length."""
    plan = make_plan(job.run, job.stds)  # no snapshots, bad stds: fail before anything is written
    errors = plan_fit_errors(plan)
    check_reliable(
        plan, errors, job.max_fit_error, _snapshot_every(job.run, plan)
    )  # nothing the snapshots can express: fail here too
    data = job.data or run_data_source(job.run)
    if not data:
        raise ValueError(
            f"'{job.run}' names no training data (config.yaml data.source): give --data, a labelled shard manifest"
        )
    exports_dir = os.path.join(job.run, EXPORTS_DIR)
    paths = {std: export_path(exports_dir, plan.images, std) for std in plan.stds}
    missing = [std for std, path in paths.items() if not os.path.exists(path)]
    if missing:
        spawn_local(reconstruct, (job.run, missing, exports_dir, plan.images), world_size)
    rank0 = read_env().rank == 0
    ref = os.path.join(job.out, "ref-stats.npz")
    if rank0:  # only rank 0 scores (frechet job), so only it needs the reference
        _write_reference(data, ref, job.batch_size)
    rows = []
    for i, std in enumerate(plan.stds):
        scoring = FrechetJob(
            "frechet",
            source=paths[std],
            ref=ref,
            data=data,
            num_images=job.num_images,
            batch_size=job.batch_size,
            seed=job.seed,
            classes=job.classes,
            sampler=dict(job.sampler),
            out=os.path.join(job.out, f"frechet-{std:.{STD_DECIMALS}f}.json"),
            feature_metrics=False,
        )
        spawn_local(frechet_worker, (scoring,), world_size)
        if rank0:
            result = read_result(scoring)
            rows.append(
                {
                    "std": std,
                    "frechet_distance": result["value"],
                    "class_accuracy": result["class_accuracy"],
                    "profile_fit_error": errors[i],
                    "reliable": errors[i] <= job.max_fit_error,
                    "export": paths[std],
                    "export_reused": std not in missing,
                    "result": scoring.out,
                }
            )
            if progress:
                progress(i, len(plan.stds), rows[-1])
    if not rank0:
        return None
    best = choose_best(rows, job.max_fit_error)
    best_export = None
    if best:  # a fixed name for scripts (`make demo` samples it): a copy of the winning length's export
        best_export = os.path.join(job.out, BEST_EXPORT)
        shutil.copyfile(best["export"], best_export + ".tmp")
        os.replace(best_export + ".tmp", best_export)
    summary = {
        "run": job.run,
        "images": plan.images,
        "snapshots": len(plan.snapshots),
        "num_images": job.num_images,
        "seed": job.seed,
        "classes": job.classes,
        "sampler": job.sampler,
        "data": data,
        "metric": "Frechet distance (digits classifier features, not FID)",
        "max_fit_error": job.max_fit_error,
        "results": rows,
        "unreliable": [r["std"] for r in rows if not r["reliable"]],
        "best": best,
        "best_export": best_export,
    }
    _write_json(os.path.join(job.out, "sweep.json"), summary)
    frechet_against_std(
        [r["std"] for r in rows],
        [r["frechet_distance"] for r in rows],
        best and best["std"],
        os.path.join(job.out, "sweep.png"),
        title=f"post-hoc EMA at {plan.images} images, {job.num_images} samples each",
        reliable=[r["reliable"] for r in rows],
        unreliable_label=f"unreliable: profile fit error > {job.max_fit_error:g}",
    )
    return summary


def choose_best(rows: list[dict], max_fit_error: float) -> Optional[dict]:
    """The row of smallest finite Fréchet distance among those whose profile fit error is at most max_fit_error (a
    length the snapshots cannot express is not the length they were asked for, whatever it scores); None if none."""
    eligible = [r for r in rows if r["profile_fit_error"] <= max_fit_error and math.isfinite(r["frechet_distance"])]
    return min(eligible, key=lambda r: r["frechet_distance"]) if eligible else None


def plan_fit_errors(plan: Plan) -> list[float]:
    """Each planned std's relative L2 profile fit error (phema.fit_error) from the plan's snapshots."""
    images, stds = [s.images for s in plan.snapshots], [s.std for s in plan.snapshots]
    return [fit_error(images, stds, plan.images, std, plan.coefficients[:, j]) for j, std in enumerate(plan.stds)]


def check_reliable(plan: Plan, errors: list[float], max_fit_error: float, every: int) -> None:
    """A ValueError (one line: what is wrong, what to track) when no planned std is within max_fit_error; `every`:
    the run's snapshot spacing in images."""
    if min(errors) <= max_fit_error:
        return
    tracked = sorted({s.std for s in plan.snapshots})
    times = sorted({s.images for s in plan.snapshots})
    closest = min(range(len(errors)), key=lambda j: errors[j])
    profiles, every = suggest_profiles(plan.stds, times, max_fit_error, every)
    raise ValueError(
        f"no std of {plan.stds[0]:g}..{plan.stds[-1]:g} can be reconstructed within --max-fit-error "
        f"{max_fit_error:g} from this run's profiles {_stds_text(tracked)} ({len(times)} snapshot times; "
        f"smallest fit error {errors[closest]:.1e} at std {plan.stds[closest]:g}): train with "
        f'"ema.stds={_stds_text(profiles)}" ema.snapshot_every_images={every} to sweep this range'
    )


def suggest_profiles(
    stds: list[float], times: list[int], max_fit_error: float, every: Optional[int] = None
) -> tuple[list[float], int]:
    """Profiles (and a snapshot spacing) that express every std of `stds` within max_fit_error at the run's final
    time: 2 to 4 profiles spread evenly over the range, at the run's spacing (`every`, default times[0]), then at half
    of it, ...; the first that fits (the densest tried if none does)."""
    total, every = times[-1], every or times[0]
    low, high = min(stds), max(stds)
    for _ in range(6):
        for count in (2, 3, 4):
            profiles = sorted({round(float(v), 3) for v in np.linspace(low, high, count)})
            if max(_fit_errors(profiles, every, total, stds)) <= max_fit_error:
                return profiles, every
        if every < 2:
            break
        every //= 2
    return profiles, every


def _snapshot_every(run_dir: str, plan: Plan) -> int:
    """The run's ema.snapshot_every_images (the snapshots land on the first step past each multiple of it)."""
    try:
        every = run_config(run_dir).get("ema", {}).get("snapshot_every_images")
    except FileNotFoundError:
        every = None
    return int(every) if every else min(s.images for s in plan.snapshots)


def _fit_errors(profiles: list[float], every: int, total: int, stds: list[float]) -> list[float]:
    """The fit errors of `stds` at `total` images from `profiles` snapshotted every `every` images (and at the end)."""
    times = list(range(every, total + 1, every))
    times += [total] if times[-1] != total else []
    images, in_stds = [t for t in times for _ in profiles], [p for _ in times for p in profiles]
    x = solve_coefficients(images, in_stds, total, stds)
    return [fit_error(images, in_stds, total, s, x[:, j]) for j, s in enumerate(stds)]


def _stds_text(stds: list[float]) -> str:
    return "[" + ",".join(f"{s:g}" for s in stds) + "]"


def _write_reference(data: str, path: str, batch_size: int) -> None:
    """The data's statistics in the classifier's features, computed as the frechet job would (same batch size)."""
    extractor = make_extractor("digits", data=data, device=read_env().device)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    compute_ref_stats(data, extractor, batch_size, per_class=False).save(path)


def _write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_json(value, indent=1))
    os.replace(tmp, path)
