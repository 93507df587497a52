"""Goodput of a training run, from the rows of its metrics.jsonl: pure arithmetic on plain dicts, no I/O and
nothing of ddpm_dist, so the metrics processor (obs/, live, for Prometheus) and the report (reporting/, after the
fact) compute the same numbers from the same rows.

Definitions (docs/DISTRIBUTED.md, "Goodput"), all over the whole run: every process that trained in the run
directory, restarts included.

- wall: from the first process's "start" row to now (live) or to the last row of the run (report).
- step time: time inside optimizer steps, data wait excluded (a step's wall time minus its data wait).
- re-done steps: steps trained again after a resume because they came after the checkpoint it resumed from: at
  each "start" at step S, every step of an earlier process past S. Their step time (each process's step time spread
  evenly over its steps) is re-done time.
- goodput ratio: (step time - re-done time) / wall: the share of the wall time spent in steps that were kept.
- time lost to restarts: for each process after the first, the gap between the previous process's last row (its
  "end" row when it exited, else the last row it wrote) and its "start" row, plus its start-up from that row to the
  beginning of its first step. Set-up before the first "start" and the first process's start-up are "other".
- checkpoint stall: time the loop was blocked by checkpoint saves ("checkpoint" rows, stall_s).
- data wait: time the loop waited on the data loader.
- other: wall minus step time, data wait, checkpoint stall and restart losses (sample grids, in-training
  evaluation, logging, the first set-up, and what a killed process did after its last row).

The rows this needs: "start" (time, step), every "train" row's and the "end" row's "process" totals
({"steps", "step_s", "data_wait_s", "startup_s"}, cumulative since that process's start, written by obs/metrics.py),
and "checkpoint" rows' stall_s. Rows before the first "start" are ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

PROCESS_KEYS = ("steps", "step_s", "data_wait_s", "startup_s")


def _num(v) -> Optional[float]:
    return (
        float(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
        else None
    )


@dataclasses.dataclass
class Process:
    """One process of the run: from its "start" row to its last row."""

    start_time: float
    start_step: int
    end_time: float
    steps: int = 0
    step_s: float = 0.0
    data_wait_s: float = 0.0
    startup_s: float = 0.0
    stall_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Goodput:
    wall_s: float
    step_s: float  # all steps, kept and re-done
    redone_steps: int
    redone_s: float
    restart_lost_s: float
    checkpoint_stall_s: float
    data_wait_s: float
    restarts: int  # processes after the first

    @property
    def kept_s(self) -> float:
        return self.step_s - self.redone_s

    @property
    def ratio(self) -> float:
        return self.kept_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def other_s(self) -> float:
        return self.wall_s - self.step_s - self.data_wait_s - self.checkpoint_stall_s - self.restart_lost_s


class Ledger:
    """Rows in, goodput out: add() each metrics.jsonl row in file order, summary() at any time."""

    def __init__(self):
        self.processes: list[Process] = []

    def add(self, row: dict) -> None:
        if not isinstance(row, dict):
            return
        t = _num(row.get("time"))
        if row.get("event") == "start":
            step = _num(row.get("step"))
            if t is not None:
                self.processes.append(Process(t, int(step or 0), t))
            return
        if not self.processes:
            return
        p = self.processes[-1]
        if t is not None:
            p.end_time = max(p.end_time, t)
        totals = row.get("process")
        if row.get("event") in ("train", "end") and isinstance(totals, dict):
            values = {k: _num(totals.get(k)) for k in PROCESS_KEYS}
            if all(v is not None for v in values.values()):
                p.steps, p.step_s, p.data_wait_s, p.startup_s = (
                    int(values["steps"]),
                    values["step_s"],
                    values["data_wait_s"],
                    values["startup_s"],
                )
        elif row.get("event") == "checkpoint" and _num(row.get("stall_s")) is not None:
            p.stall_s += _num(row["stall_s"])

    def summary(self, now: Optional[float] = None) -> Optional[Goodput]:
        """The run's goodput up to `now` (default: its last row); None before the first "start" row."""
        if not self.processes:
            return None
        ps = self.processes
        end = max(p.end_time for p in ps) if now is None else now
        kept: list[list[float]] = []  # [first step, last step, step time] of the step ranges still kept
        redone_steps, redone_s, lost = 0, 0.0, 0.0
        for i, p in enumerate(ps):
            if i:
                lost += max(0.0, p.start_time - ps[i - 1].end_time) + p.startup_s
                for piece in kept:  # the resume at p.start_step re-does every kept step after it
                    lo, hi, secs = piece
                    cut = hi - max(lo, p.start_step)
                    if cut > 0:
                        redone_steps += int(cut)
                        redone_s += secs * cut / (hi - lo)
                        piece[:] = [lo, hi - cut, secs * (1 - cut / (hi - lo))]
                kept = [piece for piece in kept if piece[1] > piece[0]]
            if p.steps:
                kept.append([p.start_step, p.start_step + p.steps, p.step_s])
        return Goodput(
            wall_s=max(0.0, end - ps[0].start_time),
            step_s=sum(p.step_s for p in ps),
            redone_steps=redone_steps,
            redone_s=redone_s,
            restart_lost_s=lost,
            checkpoint_stall_s=sum(p.stall_s for p in ps),
            data_wait_s=sum(p.data_wait_s for p in ps),
            restarts=len(ps) - 1,
        )


def goodput(rows, now: Optional[float] = None) -> Optional[Goodput]:
    """The goodput of metrics.jsonl `rows` (in file order)."""
    ledger = Ledger()
    for row in rows:
        ledger.add(row)
    return ledger.summary(now)
