"""Quality per model call: the Fréchet distance of each sampler at several numbers of model calls (NFE), with
the wall time per image. Every point draws the same images (same per-image seeds and labels), so the
points differ by the sampler and its step count only. One process; `python -m ddpm_dist.viz nfe` draws it."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping, Optional, Sequence

from ..diffusion.options import model_calls, steps_for_calls
from ..sampling.plan import plan_batches, rank_share
from ..sampling.setup import SamplingSetup, make_share
from .statistics import Extractor, RefStats, accumulate, frechet_distance

DEFAULT_CALLS = (5, 10, 20, 50, 100)
DEFAULT_PLAN = {"ddim": DEFAULT_CALLS, "dpm++2m": DEFAULT_CALLS, "heun": DEFAULT_CALLS}


@dataclasses.dataclass
class Point:
    sampler: str  # NAME or NAME@SPACING
    budget: int  # the model calls asked for
    steps: int
    calls: int  # model evaluations per image: the budget, or one less for Heun at an even budget
    frechet: float
    seconds_per_image: float  # generation only, features not counted


def measure(
    setup: SamplingSetup,
    extractor: Extractor,
    ref: RefStats,
    plan: Mapping[str, Sequence[int]] = DEFAULT_PLAN,
    *,
    num_images: int = 500,
    batch_size: int = 100,
    seed: int = 0,
    classes: Optional[str] = None,
    on_point: Optional[Callable[[Point], None]] = None,
) -> list[Point]:
    """One point per sampler (NAME or NAME@SPACING) and model-call budget in `plan`: the steps whose model calls
    come closest to the budget from below (Heun takes 2 x steps - 1), the run's other sampler options kept
    (guidance, clipping, and spacing unless the label names one)."""
    share = rank_share(plan_batches(num_images, batch_size, set()), 0, 1)
    points = []
    for label, budgets in plan.items():
        sampler, _, spacing = label.partition("@")  # e.g. dpm++2m@karras: that sampler with that spacing
        for budget in budgets:
            steps = min(steps_for_calls(sampler, budget), setup.schedule.num_steps)
            options = setup.options.updated(sampler=sampler, steps=steps, spacing=spacing or None)
            point_setup = dataclasses.replace(
                setup, options=options.resolved(setup.schedule.num_steps, bool(setup.num_classes))
            )
            t0 = time.perf_counter()
            images = [
                imgs
                for _, imgs, _, _ in make_share(point_setup, share, seed=seed, classes=classes, num_images=num_images)
            ]
            seconds = time.perf_counter() - t0
            mu, sigma = accumulate(extractor, images).mean_cov()
            n = sum(len(b) for b in images)
            point = Point(
                label,
                budget,
                steps,
                model_calls(sampler, steps),
                frechet_distance(mu, sigma, ref.mu, ref.sigma),
                seconds / n,
            )
            points.append(point)
            if on_point:
                on_point(point)
    return points


def _cell(p: Point) -> str:
    calls = "" if p.calls == p.budget else f"NFE {p.calls}, "
    return f"{p.frechet:.3f} ({calls}{p.seconds_per_image * 1e3:.0f} ms/img)"


def markdown_table(points: Sequence[Point]) -> str:
    """Model calls down, samplers across; each cell 'Fréchet distance (ms per image)'."""
    samplers = list(dict.fromkeys(p.sampler for p in points))
    cells = {(p.sampler, p.budget): _cell(p) for p in points}
    rows = ["| model calls | " + " | ".join(samplers) + " |", "| ---: |" + " ---: |" * len(samplers)]
    for budget in sorted({p.budget for p in points}):
        rows.append(f"| {budget} | " + " | ".join(cells.get((s, budget), "") for s in samplers) + " |")
    return "\n".join(rows)


def frechet_at(points: Sequence[Point], sampler: str, budget: int) -> Optional[float]:
    """The Fréchet distance of `sampler` at a model-call budget, if it was measured."""
    return next((p.frechet for p in points if p.sampler == sampler and p.budget == budget), None)
