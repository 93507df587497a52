"""Render a RunData as one self-contained HTML page: CSS inline, pictures as data: URIs, no script and no
address outside the page. Every string from the run is escaped; a missing piece is one line in its section."""

from __future__ import annotations

import base64
import html
import statistics
import time
from typing import Iterable, Optional, Sequence

from . import charts
from .collect import RECENT_ROWS, Picture, RunData, is_number

SECTIONS = (
    ("summary", "Summary"),
    ("config", "Config"),
    ("hardware", "Hardware and world size"),
    ("curves", "Training curves"),
    ("samples", "Samples"),
    ("evaluation", "Evaluation"),
    ("checkpoints", "Checkpoints"),
    ("performance", "Performance"),
    ("goodput", "Goodput"),
)
CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1150px; padding: 0 16px 40px; color: #222; }
nav a { margin-right: 12px; } h1 { margin-bottom: 4px; } section { border-top: 1px solid #ddd; padding: 6px 0 12px; }
table { border-collapse: collapse; margin: 6px 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td.text, th.text { text-align: left; } pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 13px; }
figure { display: inline-block; margin: 6px 16px 6px 0; vertical-align: top; }
figcaption { font-size: 13px; color: #555; width: 0; min-width: 100%; }  /* as wide as its picture */
img.pixels { image-rendering: pixelated; max-height: 400px; } img { max-width: 100%; }
pre.config { columns: 3 340px; column-rule: 1px solid #e4e4e4; }
.note { color: #775; font-style: italic; } .best { font-weight: bold; }
.status { font-size: 18px; padding: 2px 8px; border-radius: 4px; }
.finished { background: #d8f0d8; } .running { background: #dbe8fb; } .preempted { background: #fbeed0; }
.stopped, .unknown { background: #f4d6d6; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def num(value, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return esc(value)


def human_bytes(n) -> str:
    if not is_number(n):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def human_seconds(s) -> str:
    if not is_number(s):
        return ""
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.3g} s" if s < 10 else f"{s:.0f} s"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(header: Sequence[str], rows: Iterable[Sequence], text_cols: Sequence[int] = (), row_classes=None) -> str:
    """Cells are pre-escaped HTML; columns in text_cols are left-aligned."""

    def cls(i: int) -> str:
        return ' class="text"' if i in text_cols else ""

    out = [
        "<table>"
        + (
            "<tr>" + "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(header)) + "</tr>"
            if any(header)
            else ""
        )
    ]
    for k, row in enumerate(rows):
        rc = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        out.append(f"<tr{rc}>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    return "".join(out) + "</table>"


def image(png: bytes, alt: str, caption: str = "", pixels: bool = False) -> str:
    data = base64.b64encode(png).decode("ascii")
    cls = ' class="pixels"' if pixels else ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img{cls} alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def picture(p: Optional[Picture], alt: str, missing: str, pixels: bool = True) -> str:
    if p is None:
        return note(missing)
    if p.png is None:
        return note(f"{p.path}: {p.note}")
    return image(p.png, alt, f"{p.path}: {p.note}" if p.note else p.path, pixels=pixels)


def kv(pairs: Iterable[tuple[str, str]]) -> str:
    return table(("", ""), ([esc(k), v] for k, v in pairs), text_cols=(0, 1))


def section_summary(d: RunData) -> str:
    last = d.last_train
    newest = next((c for c in reversed(d.checkpoints) if "step" in c), None)
    pairs = [
        ("run", esc(d.name)),
        ("directory", esc(d.run_dir)),
        ("status", f'<span class="status {esc(d.status)}">{esc(d.status_text)}</span>'),
    ]
    if last:
        pairs += [
            ("steps", num(last.get("step"))),
            ("images seen", num(last.get("images"))),
            ("epoch", num(last.get("epoch"))),
            ("last loss", num(last.get("loss"))),
        ]
    else:
        pairs.append(("steps", "no training row yet"))
    if newest:
        pairs.append(("newest checkpoint", f"step {num(newest.get('step'))}, {num(newest.get('images'))} images"))
    pairs.append(("report written", esc(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(d.now)))))
    return kv(pairs)


def section_config(d: RunData) -> str:
    return f'<pre class="config">{esc(d.config_text)}</pre>' if d.config_text is not None else ""


def section_hardware(d: RunData) -> str:
    if not d.starts:
        newest = next((c for c in reversed(d.checkpoints) if "world_size" in c), None)
        known = (
            f" The newest checkpoint was written by world size {newest['world_size']} ({newest.get('backend')})."
            if newest
            else ""
        )
        return note("unknown: metrics.jsonl has no start row (a run from before it was recorded)." + known)
    s = d.starts[-1]
    hosts = s.get("hosts")
    out = kv(
        [
            ("world size", num(s.get("world_size"))),
            ("backend", esc(s.get("backend", ""))),
            ("hosts", esc(", ".join(map(str, hosts)) if isinstance(hosts, list) else hosts or "")),
            ("device", esc(s.get("device", ""))),
            ("torch", esc(s.get("torch", ""))),
            ("parameters", num(s.get("num_params"))),
            ("resumed from", esc(s["resumed_from"]) if s.get("resumed_from") else "a fresh start"),
            (
                "started",
                esc(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(s["time"]))) if is_number(s.get("time")) else "",
            ),
        ]
    )
    if len(d.starts) > 1:
        out += "<p>Every start and resume:</p>" + table(
            ("started (UTC)", "world size", "backend", "device"),
            (
                [
                    esc(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"]))) if is_number(r.get("time")) else "",
                    num(r.get("world_size")),
                    esc(r.get("backend", "")),
                    esc(r.get("device", "")),
                ]
                for r in d.starts
            ),
            text_cols=(0, 2, 3),
        )
    return out


def section_curves(d: RunData) -> str:
    png = charts.training_curves(d.train)
    if png is None:
        return note("no training rows in metrics.jsonl yet (one every train.log_every steps)")
    return image(png, "training curves", f"from {len(d.train)} rows of metrics.jsonl")


def section_samples(d: RunData) -> str:
    cmd = f"python -m ddpm_dist.sample --run {d.run_dir} --out {d.run_dir}/samples/final --num-images 16"
    out = picture(
        d.grid,
        "latest sample grid",
        "no sample grid yet: training writes samples/grid_N.png every "
        "train.sample_every_images and samples/final_grid.png at the end",
    )
    if d.sampled_grid is not None:
        out += picture(d.sampled_grid, "sampled grid", "")
    out += picture(d.trajectory, "denoising trajectory", f"no trajectory.png under samples/: make one with {cmd}")
    return out


def section_evaluation(d: RunData) -> str:
    out = []
    if d.evals:
        out.append("<h3>In training (eval.every_images)</h3>")
        out.append(
            table(
                ("images seen", "Fréchet distance", "extractor", "n"),
                (
                    [num(r.get("images")), num(r.get("frechet_distance")), esc(r.get("extractor", "")), num(r.get("n"))]
                    for r in d.evals
                ),
                text_cols=(2,),
            )
        )
        png = charts.eval_curve(d.evals)
        if png:
            out.append(image(png, "in-training Fréchet distance"))
    if d.results:
        out.append("<h3>python -m ddpm_dist.evaluate fid | frechet</h3>")
        cols = ("value", "n", "ref_n", "extractor", "class_accuracy", "source", "sampler", "steps", "guidance")
        out.append(
            table(
                ("file", "metric", *cols),
                ([esc(r["path"]), esc(r.get("metric"))] + [num(r.get(c)) for c in cols] for r in d.results),
                text_cols=(0, 1, 5, 7, 8),
            )
        )
    for rec in d.recons:
        data = rec["data"]
        rows = [r for r in data["rows"] if isinstance(r, dict)]
        metrics = [
            k
            for k in ("one_step_psnr", "one_step_ssim", "ddim_psnr", "ddim_ssim", "one_step_lpips", "ddim_lpips")
            if any(k in r for r in rows)
        ]
        out.append(f"<h3>Reconstruction: {esc(rec['path'])}</h3>")
        out.append(
            f"<p>{num(data.get('n'))} images of {esc(data.get('data', '?'))} by {esc(data.get('source', '?'))}</p>"
        )
        out.append(
            table(
                ("t", *(m.replace("_", " ") for m in metrics)),
                ([num(r.get("t"))] + [num(r.get(m)) for m in metrics] for r in rows),
            )
        )
        if rec["picture"] is not None:
            out.append(picture(rec["picture"], "reconstruction metrics", "", pixels=False))
    if not out:
        return note(
            f"no evaluation yet: train with eval.every_images, or run python -m ddpm_dist.evaluate "
            f"frechet --run {d.run_dir} (writes frechet.json there)"
        )
    return "".join(out)


def section_checkpoints(d: RunData) -> str:
    if not d.checkpoints:
        return note("no committed checkpoint under checkpoints/ yet")
    scored = any("frechet_distance" in c for c in d.checkpoints)
    header = ["checkpoint", "step", "images", "world size", "backend", "size", "age"] + (
        ["Fréchet distance"] if scored else []
    )
    rows = []
    for c in d.checkpoints:
        row = [
            esc(c["name"]) + (" (best)" if c.get("best") else ""),
            num(c.get("step")),
            num(c.get("images")),
            num(c.get("world_size")),
            esc(c.get("backend") or ""),
            human_bytes(c.get("bytes")),
            human_seconds(c.get("age_s")),
        ]
        if scored:
            row.append(num(c.get("frechet_distance")))
        rows.append(row)
    return table(header, rows, text_cols=(0, 4), row_classes=["best" if c.get("best") else "" for c in d.checkpoints])


def _values(rows: Sequence[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if is_number(r.get(key))]


def section_performance(d: RunData) -> str:
    recent = d.train[-RECENT_ROWS:]
    pairs = []
    ips, wait, step_s = (
        _values(recent, "images_per_s"),
        _values(d.train, "data_wait_share"),
        _values(recent, "step_seconds"),
    )
    if ips:
        pairs.append(("images/s", f"{statistics.median(ips):,.1f} (median of the last {len(ips)} rows)"))
    if wait:
        pairs.append(("data-wait share", f"{100 * statistics.mean(wait):.1f}% (mean of {len(wait)} rows)"))
    pairs.append(
        (
            "step time",
            f"{human_seconds(statistics.median(step_s))} (median of the last {len(step_s)} rows)"
            if step_s
            else "not recorded (no step_seconds in the training rows)",
        )
    )
    ages = _values(d.train[-1:], "checkpoint_age_s")
    if ages:
        pairs.append(("checkpoint age at the last row", human_seconds(ages[0])))
    dur, stall = _values(d.checkpoint_rows, "duration_s"), _values(d.checkpoint_rows, "stall_s")

    def spread(values: list[float]) -> str:
        return (
            f"last {human_seconds(values[-1])}, mean {human_seconds(statistics.mean(values))}, "
            f"max {human_seconds(max(values))}"
        )

    if dur:
        pairs.append(("checkpoint duration", f"{spread(dur)} ({len(dur)} saves)"))
    if stall:
        pairs.append(("checkpoint stall (training blocked)", spread(stall)))
    if not dur:
        pairs.append(("checkpoints", "no checkpoint row in metrics.jsonl"))
    out = kv((k, esc(v)) for k, v in pairs)
    per_rank = [r for r in (d.state_bytes or []) if isinstance(r, dict)]
    if per_rank:
        kinds = sorted({k for r in per_rank for k in r})
        out += "<h3>State bytes per rank</h3>" + table(
            ("rank", *kinds, "total"),
            (
                [str(i)]
                + [human_bytes(r.get(k)) for k in kinds]
                + [human_bytes(sum(v for v in r.values() if is_number(v)))]
                for i, r in enumerate(per_rank)
            ),
        )
    else:
        out += note("state bytes per rank: no state_bytes row in metrics.jsonl yet")
    return out


def section_goodput(d: RunData) -> str:
    """The goodput ratio and its parts (definitions: ddpm_dist/goodput.py, docs/DISTRIBUTED.md), each part also as a
    share of the wall time since the first start."""
    g = d.goodput
    if g is None:
        return note("no start row in metrics.jsonl: no goodput")

    def part(seconds: float) -> str:
        return f"{human_seconds(seconds)} ({100 * seconds / g.wall_s:.1f}%)" if g.wall_s > 0 else human_seconds(seconds)

    return kv(
        (k, esc(v))
        for k, v in (
            ("goodput ratio", f"{100 * g.ratio:.1f}% (time in kept steps / wall time)"),
            ("wall time since the first start", human_seconds(g.wall_s)),
            ("time in kept steps", part(g.kept_s)),
            ("re-done steps", f"{g.redone_steps:,} ({part(g.redone_s)})"),
            ("restarts", f"{g.restarts:,}; time lost to them {part(g.restart_lost_s)}"),
            ("checkpoint stall", part(g.checkpoint_stall_s)),
            ("data wait", part(g.data_wait_s)),
            ("other (sampling, evaluation, logging, set-up)", part(g.other_s)),
        )
    )


RENDER = {
    "summary": section_summary,
    "config": section_config,
    "hardware": section_hardware,
    "curves": section_curves,
    "samples": section_samples,
    "evaluation": section_evaluation,
    "checkpoints": section_checkpoints,
    "performance": section_performance,
    "goodput": section_goodput,
}


def render(d: RunData) -> str:
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in SECTIONS)
    body = []
    for sid, title in SECTIONS:
        notes = "".join(note(n) for n in d.notes.get(sid, []))
        body.append(f'<section id="{sid}"><h2>{esc(title)}</h2>{notes}{RENDER[sid](d)}</section>')
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(d.name)}: {esc(d.status)}'
        f"</title><style>{CSS}</style></head><body><h1>Run report: {esc(d.name)}</h1><nav>{nav}</nav>"
        + "".join(body)
        + "</body></html>\n"
    )
