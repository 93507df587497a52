"""Read a run directory into plain data for the report: metrics.jsonl rows, the resolved config, checkpoints,
pictures and evaluation results. Everything here is data from a run directory: JSON and YAML are parsed as
text, nothing is unpickled, and a missing or unreadable piece becomes a note, never an exception."""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

from ..artifacts import MARKER, CheckpointError, committed_checkpoints, read_meta
from ..goodput import Goodput, goodput
from ..redact import redact, redact_data

MAX_TEXT_BYTES = 1 << 20  # config.yaml and result JSON files larger than this are not inlined
MAX_IMAGE_BYTES = 8 << 20  # nor are pictures
MAX_WALK_FILES = 20000  # a run directory with millions of sample PNGs is searched only this far
SKIP_DIRS = {"checkpoints", "data_audit", "tensorboard"}  # no reports or pictures of ours in there
RECENT_ROWS = 10  # "the last rows" of the performance medians
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Picture:
    path: str  # relative to the run directory
    png: Optional[bytes]  # None when it could not be inlined
    note: str = ""  # why not, or what it is


@dataclass
class RunData:
    run_dir: str
    name: str
    now: float
    status: str  # finished | preempted | running | stopped | unknown
    status_text: str
    config_text: Optional[str]
    starts: list[dict]  # {"event": "start"} rows (one per start or resume): world size, backend, hosts, device
    train: list[dict]
    evals: list[dict]
    checkpoint_rows: list[dict]
    state_bytes: Optional[list[dict]]
    checkpoints: list[dict]
    grid: Optional[Picture]
    sampled_grid: Optional[Picture]
    trajectory: Optional[Picture]
    results: list[dict]  # `evaluate fid|frechet` result files: {"path", **result}
    recons: list[dict]  # `evaluate recon` outputs: {"path", "data", "picture"}
    notes: dict[str, list[str]] = field(default_factory=dict)  # section id -> problems met reading it
    goodput: Optional[Goodput] = None  # of all the run's processes, up to its last row (ddpm_dist/goodput.py)

    @property
    def last_train(self) -> Optional[dict]:
        return self.train[-1] if self.train else None


def read_rows(path: str) -> tuple[list[dict], list[str]]:
    """metrics.jsonl as rows, and notes. A partly written last line (training is appending) is ignored; any
    other line that is not a JSON object is skipped and noted."""
    if not os.path.isfile(path):
        return [], ["no metrics.jsonl in the run directory"]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return [], [f"metrics.jsonl is unreadable: {e.strerror}"]
    lines = data.split(b"\n")
    rows, bad = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # no newline yet: the writer is in the middle of it
                continue
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, ([f"{bad} unreadable line(s) in metrics.jsonl skipped"] if bad else [])


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def run_status(rows: list[dict], run_dir: str, now: float) -> tuple[str, str]:
    """finished (an export newer than the last training row), preempted (the last of the train and preempted
    rows is a preemption), else running or stopped by how long ago the last row came."""
    train_at = max((i for i, r in enumerate(rows) if r.get("event") == "train"), default=-1)
    preempt_at = max((i for i, r in enumerate(rows) if r.get("event") == "preempted"), default=-1)
    export = os.path.join(run_dir, "export.safetensors")
    last_train_time = rows[train_at].get("time") if train_at >= 0 else None
    if os.path.isfile(export) and not (is_number(last_train_time) and last_train_time > mtime(export) + 1):
        return "finished", "finished (export.safetensors written)"
    if preempt_at > train_at:
        r = rows[preempt_at]
        why = f": {r['reason']}" if isinstance(r.get("reason"), str) and r["reason"] else ""
        return "preempted", f"preempted at step {r.get('step', '?')}{why} (checkpoint saved; resume by rerunning)"
    times = [r["time"] for r in rows if is_number(r.get("time"))]
    if not times:
        return "unknown", "unknown (no metrics row yet)"
    age = max(0.0, now - max(times))
    train_times = [r["time"] for r in rows if r.get("event") == "train" and is_number(r.get("time"))]
    gaps = [b - a for a, b in zip(train_times, train_times[1:]) if b >= a]
    patience = max(300.0, 10 * statistics.median(gaps)) if gaps else 300.0  # a slow eval or save is not a stop
    kind = "running" if age <= patience else "stopped"
    return kind, f"{kind} (last row {age:.0f} s ago)"


def read_text(path: str) -> tuple[Optional[str], Optional[str]]:
    """(text, None) or (None, why not)."""
    if not os.path.isfile(path):
        return None, f"no {os.path.basename(path)}"
    try:
        if os.path.getsize(path) > MAX_TEXT_BYTES:
            return None, f"{os.path.basename(path)} is larger than {MAX_TEXT_BYTES >> 20} MiB: not shown"
        with open(path, "rb") as f:
            return redact(f.read().decode("utf-8", errors="replace")), None
    except OSError as e:
        return None, f"{os.path.basename(path)} is unreadable: {e.strerror}"


def mtime(path: str) -> float:
    """0 for a file gone meanwhile (training renames and rotates files while the report reads them)."""
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def picture(run_dir: str, path: str, note: str = "") -> Picture:
    rel = os.path.relpath(path, run_dir)
    if os.path.islink(path):
        return Picture(rel, None, "a symbolic link: not followed")
    try:
        if os.path.getsize(path) > MAX_IMAGE_BYTES:
            return Picture(rel, None, f"larger than {MAX_IMAGE_BYTES >> 20} MiB: not inlined")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Picture(rel, None, f"unreadable: {e.strerror}")
    if not data.startswith(PNG_SIGNATURE):
        return Picture(rel, None, "not a PNG file")
    return Picture(rel, data, note)


def walk_files(top: str, budget: list[int]):
    """Paths of the files under `top` (links not followed, SKIP_DIRS pruned), up to budget[0] of them in all."""
    for d, dirs, files in os.walk(top):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not os.path.islink(os.path.join(d, x)))
        for f in sorted(files):
            budget[0] -= 1
            if budget[0] < 0:
                return
            if not os.path.islink(os.path.join(d, f)):
                yield os.path.join(d, f)


def find_pictures(run_dir: str) -> tuple[Optional[Picture], Optional[Picture], Optional[Picture]]:
    """(newest training grid: final_grid.png, else the largest images count in grid_N.png; newest grid.png of
    `ddpm_dist.sample`; newest trajectory.png), each by the rule its writer names files with."""
    samples = os.path.join(run_dir, "samples")
    training, sampled, trajectories = [], [], []
    for path in walk_files(samples, [MAX_WALK_FILES]):
        name, where = os.path.basename(path), os.path.dirname(path)
        m = re.fullmatch(r"grid_(\d+)\.png", name)
        if where == samples and (m or name == "final_grid.png"):
            training.append((float("inf") if not m else int(m.group(1)), path))
        elif name == "grid.png" and where != samples:
            sampled.append((mtime(path), path))
        elif name == "trajectory.png":
            trajectories.append((mtime(path), path))
    out = []
    for found, note in (
        (training, "the newest grid written during training"),
        (sampled, "the newest grid of python -m ddpm_dist.sample"),
        (trajectories, "the newest denoising trajectory: noise on the left, images on the right"),
    ):
        if found:
            best = max(found)[1]
            sampling_json = os.path.join(os.path.dirname(best), "sampling.json")
            if best.endswith("/grid.png") and os.path.isfile(sampling_json):
                note += f" ({_sampling_summary(sampling_json)})"
            out.append(picture(run_dir, best, note))
        else:
            out.append(None)
    return out[0], out[1], out[2]


def _sampling_summary(path: str) -> str:
    try:
        with open(path) as f:
            s = json.load(f)
        return redact(
            ", ".join(f"{k} {s[k]}" for k in ("source", "sampler", "steps", "guidance", "num_images") if k in s)
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return "sampling.json unreadable"


def find_results(run_dir: str) -> tuple[list[dict], list[dict], list[str]]:
    """Result files anywhere in the run directory: `evaluate fid|frechet` JSON ({metric, value, ...}; named
    fid.json / frechet.json or --out) and `evaluate recon` outputs (recon.json with rows, and recon.png)."""
    results, recons, notes = [], [], []
    for path in walk_files(run_dir, [MAX_WALK_FILES]):
        if not path.endswith(".json"):
            continue
        rel = os.path.relpath(path, run_dir)
        try:
            if os.path.getsize(path) > MAX_TEXT_BYTES:
                continue
            with open(path, "rb") as f:
                data = json.loads(f.read())
        except (OSError, ValueError):
            if os.path.basename(path) in ("fid.json", "frechet.json", "recon.json"):
                notes.append(f"{rel} is unreadable (not JSON)")
            continue
        if not isinstance(data, dict):
            continue
        if "metric" in data and is_number(data.get("value")):
            results.append({"path": rel, **redact_data(data)})
        elif os.path.basename(path) == "recon.json" and isinstance(data.get("rows"), list):
            png = os.path.join(os.path.dirname(path), "recon.png")
            pic = picture(run_dir, png, "PSNR and SSIM per noise level") if os.path.isfile(png) else None
            recons.append({"path": rel, "data": redact_data(data), "picture": pic})
    return results, recons, notes


def dir_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                pass
    return total


def read_checkpoints(run_dir: str, now: float) -> tuple[list[dict], list[str]]:
    """One row per committed checkpoint: counters, world size, backend, size on disk, age since its commit,
    and the in-training Fréchet distance meta.json records for checkpoints kept by checkpoint.keep_best."""
    rows, notes = [], []
    for path in committed_checkpoints(os.path.join(run_dir, "checkpoints")):
        row = {"name": os.path.basename(path), "bytes": dir_bytes(path)}
        try:
            meta = read_meta(path)
        except (OSError, ValueError, AttributeError, CheckpointError) as e:  # AttributeError: not a JSON object
            notes.append(f"{row['name']}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            rows.append(row)
            continue
        row.update({k: meta.get(k) for k in ("step", "images", "world_size", "backend")})
        committed_at = None
        try:
            with open(os.path.join(path, MARKER)) as f:
                committed_at = json.load(f).get("time")
        except (OSError, ValueError, AttributeError):
            pass
        if not is_number(committed_at):
            committed_at = mtime(os.path.join(path, MARKER)) or now
        row["age_s"] = max(0.0, now - committed_at)
        score = meta.get("eval") if isinstance(meta.get("eval"), dict) else {}
        if is_number(score.get("frechet_distance")):
            row["frechet_distance"] = float(score["frechet_distance"])
            row["extractor"] = redact(str(score.get("extractor", "")))
        rows.append(row)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    done = {r["name"] for r in rows}
    pending = sorted(
        n
        for n in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
        if n.startswith("step_") and n not in done and os.path.isdir(os.path.join(ckpt_dir, n))
    )
    notes += [f"{n}: no {MARKER} marker (being written, or interrupted: resume skips it)" for n in pending]
    scored = [r for r in rows if "frechet_distance" in r]
    if scored:
        min(scored, key=lambda r: r["frechet_distance"])["best"] = True
    return rows, notes


def collect(run_dir: str, now: Optional[float] = None) -> RunData:
    """Everything the report shows, read from `run_dir` (which must exist)."""
    now = time.time() if now is None else now
    rows, metric_notes = read_rows(os.path.join(run_dir, "metrics.jsonl"))
    status, status_text = run_status(rows, run_dir, now)
    config_text, config_note = read_text(os.path.join(run_dir, "config.yaml"))
    name = os.path.basename(os.path.abspath(run_dir))
    if config_text:
        m = re.search(r"^name:\s*(\S.*)$", config_text, re.M)
        if m and m.group(1).strip("'\" "):
            name = m.group(1).strip("'\" ")
    starts = [r for r in rows if r.get("event") == "start"]
    bytes_rows = [r for r in rows if r.get("event") == "state_bytes" and isinstance(r.get("per_rank"), list)]
    checkpoints, ckpt_notes = read_checkpoints(run_dir, now)
    grid, sampled, trajectory = find_pictures(run_dir)
    results, recons, result_notes = find_results(run_dir)
    train = [r for r in rows if r.get("event") == "train" and is_number(r.get("images"))]
    goodput_notes = []
    if train and not any(isinstance(r.get("process"), dict) for r in train):
        goodput_notes.append("the training rows carry no per-process totals (written before goodput accounting)")
    return RunData(
        run_dir=redact(run_dir),
        name=redact(name),
        now=now,
        status=status,
        status_text=status_text,
        config_text=config_text,
        starts=starts,
        train=train,
        evals=[r for r in rows if r.get("event") == "eval" and is_number(r.get("frechet_distance"))],
        checkpoint_rows=[r for r in rows if r.get("event") == "checkpoint"],
        state_bytes=bytes_rows[-1]["per_rank"] if bytes_rows else None,
        checkpoints=checkpoints,
        grid=grid,
        sampled_grid=sampled,
        trajectory=trajectory,
        results=results,
        recons=recons,
        notes={
            "summary": metric_notes,
            "config": [config_note] if config_note else [],
            "checkpoints": ckpt_notes,
            "evaluation": result_notes,
            "goodput": goodput_notes,
        },
        goodput=goodput(rows),
    )
