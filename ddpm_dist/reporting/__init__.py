"""One self-contained HTML page about a run directory, finished, running or preempted: status, config,
hardware, curves, samples, evaluation, checkpoints, performance. Data flows one way: collect.py reads the run
into plain data, charts.py draws it, html.py renders the page; `python -m ddpm_dist.report` (ddpm_dist/report.py)."""

from __future__ import annotations

import os
from typing import Optional

from .collect import RunData, collect
from .html import SECTIONS, render

__all__ = ["RunData", "SECTIONS", "check_run_dir", "collect", "render", "write_report"]
RUN_MARKS = ("config.yaml", "metrics.jsonl", "checkpoints")  # what training writes first


def check_run_dir(run_dir: str) -> None:
    """A one-line error unless `run_dir` is a run directory (holds one of RUN_MARKS)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory '{run_dir}' does not exist")
    if not any(os.path.exists(os.path.join(run_dir, m)) for m in RUN_MARKS):
        raise ValueError(f"'{run_dir}' is not a run directory (no config.yaml, metrics.jsonl or checkpoints/)")


def write_report(run_dir: str, out: Optional[str] = None, now: Optional[float] = None) -> tuple[str, RunData]:
    """Render the report of `run_dir` into `out` (default RUN/report.html), atomically; (path, the data)."""
    check_run_dir(run_dir)
    out = out or os.path.join(run_dir, "report.html")
    data = collect(run_dir, now)
    page = render(data)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, out)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise ValueError(f"cannot write the report to '{out}': {e.strerror or e}") from None
    return out, data
