"""Goodput arithmetic (ddpm_dist/goodput.py) on a constructed metrics.jsonl, with every expected number worked out by
hand; the same account against a step-by-step brute force on random runs; and the metrics processor's live account
(what Prometheus gets) across a resume, read back from its registry."""

import json
import random

import pytest

from ddpm_dist.config import MetricsConfig
from ddpm_dist.goodput import goodput
from ddpm_dist.obs.metrics import Metrics
from tests.support.common import free_port
from tests.support.report_pages import sections


def proc(steps, step_s, data_wait_s, startup_s):
    return {"steps": steps, "step_s": step_s, "data_wait_s": data_wait_s, "startup_s": startup_s}


# Three processes: the first is killed after step 10 (its last checkpoint: step 5, no "end" row), the second resumes
# at step 5, trains to step 15 and is preempted (checkpoint at 15, "end" row), the third resumes at 15.
ROWS = [
    {"event": "start", "step": 0, "time": 1000.0},
    {"event": "train", "step": 5, "time": 1010.0, "process": proc(5, 6.0, 1.0, 2.0)},
    {"event": "checkpoint", "images": 80, "duration_s": 0.7, "stall_s": 0.5, "time": 1011.0},
    {"event": "train", "step": 10, "time": 1020.0, "process": proc(10, 12.0, 2.0, 2.0)},
    {"event": "start", "step": 5, "time": 1050.0},
    {"event": "train", "step": 10, "time": 1060.0, "process": proc(5, 5.0, 0.5, 3.0)},
    {"event": "checkpoint", "images": 240, "duration_s": 1.0, "stall_s": 1.0, "time": 1061.0},
    {"event": "train", "step": 15, "time": 1070.0, "process": proc(10, 10.0, 1.0, 3.0)},
    {"event": "preempted", "step": 15, "time": 1071.0},
    {"event": "end", "step": 15, "time": 1072.0, "process": proc(10, 10.0, 1.0, 3.0)},
    {"event": "start", "step": 15, "time": 1100.0},
    {"event": "train", "step": 20, "time": 1110.0, "process": proc(5, 4.0, 0.2, 1.0)},
    {"event": "end", "step": 20, "time": 1111.0, "process": proc(5, 4.0, 0.2, 1.0)},
]


def test_constructed_run_by_hand(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    g = goodput(json.loads(line) for line in path.read_text().splitlines())
    assert g.wall_s == 111.0  # 1111 - 1000
    assert g.step_s == 26.0  # 12 + 10 + 4
    assert g.redone_steps == 5  # steps 6..10 of the first process, trained again after the resume at 5
    assert g.redone_s == pytest.approx(6.0)  # 5 of its 10 steps, 12 s over 10 steps
    assert g.kept_s == pytest.approx(20.0)
    assert g.ratio == pytest.approx(20.0 / 111.0)
    assert g.restart_lost_s == pytest.approx((1050 - 1020) + 3.0 + (1100 - 1072) + 1.0)  # 62
    assert g.checkpoint_stall_s == pytest.approx(1.5)
    assert g.data_wait_s == pytest.approx(3.2)
    assert g.restarts == 2
    assert g.other_s == pytest.approx(111 - 26 - 3.2 - 1.5 - 62)  # 18.3
    assert goodput(ROWS, now=1222.0).wall_s == 222.0  # live: up to now
    assert goodput(ROWS[:4]).restarts == 0 and goodput(ROWS[:4]).redone_steps == 0
    assert goodput(ROWS[:4]).ratio == pytest.approx(12.0 / 20.0)


def test_rows_it_cannot_use():
    assert goodput([]) is None
    assert goodput([{"event": "train", "step": 5, "time": 1.0, "process": proc(5, 1.0, 0.0, 0.0)}]) is None
    rows = [
        {"event": "start", "step": 0, "time": 10.0},
        {"event": "train", "step": 5, "time": 20.0},  # an older run's row: no totals, time only
        {"event": "train", "step": 6, "time": "x", "process": {"steps": "6"}},
        "not a row",
        {"event": "checkpoint", "stall_s": None, "time": 21.0},
    ]
    g = goodput(rows)
    assert (g.wall_s, g.step_s, g.checkpoint_stall_s, g.ratio) == (11.0, 0.0, 0.0, 0.0)


def test_resumed_twice_from_the_same_checkpoint():
    """100 steps at 1 s; resume at 80, 10 steps at 2 s, killed; resume at 80 again, 20 steps: 20 + 10 re-done steps,
    20 s + 20 s re-done time, not the 20 + 20 steps 'furthest step minus resume step' would count."""
    rows = [
        {"event": "start", "step": 0, "time": 0.0},
        {"event": "end", "step": 100, "time": 101.0, "process": proc(100, 100.0, 0.0, 1.0)},
        {"event": "start", "step": 80, "time": 111.0},
        {"event": "train", "step": 90, "time": 131.0, "process": proc(10, 20.0, 0.0, 0.0)},
        {"event": "start", "step": 80, "time": 141.0},
        {"event": "end", "step": 100, "time": 161.0, "process": proc(20, 20.0, 0.0, 0.0)},
    ]
    g = goodput(rows)
    assert (g.redone_steps, g.redone_s, g.kept_s, g.restarts) == (30, 40.0, 100.0, 2)
    assert g.ratio == pytest.approx(100 / 161)


def brute_force(processes):
    """Step by step: each trained step's time in a dict; a resume at S drops (re-does) every step past S."""
    trained, redone_steps, redone_s = {}, 0, 0.0
    for start, steps, per_step in processes:
        for k in [k for k in trained if k > start]:
            redone_steps += 1
            redone_s += trained.pop(k)
        for k in range(start + 1, start + steps + 1):
            trained[k] = per_step
    return redone_steps, redone_s, sum(trained.values())


@pytest.mark.parametrize("seed", range(20))
def test_random_runs_against_a_step_by_step_brute_force(seed):
    rng = random.Random(seed)
    processes, rows, t, furthest = [], [], 0.0, 0
    for _ in range(rng.randint(1, 6)):
        start = rng.randint(0, furthest)  # any committed step up to the furthest reached
        steps, per_step = rng.randint(0, 30), rng.choice([0.5, 1.0, 2.0])
        processes.append((start, steps, per_step))
        rows.append({"event": "start", "step": start, "time": t})
        t += 1 + steps * per_step
        rows.append({"event": "end", "step": start + steps, "time": t, "process": proc(steps, steps * per_step, 0, 0)})
        furthest, t = max(furthest, start + steps), t + rng.randint(0, 5)
    g = goodput(rows)
    redone_steps, redone_s, kept = brute_force(processes)
    assert g.redone_steps == redone_steps
    assert g.redone_s == pytest.approx(redone_s) and g.kept_s == pytest.approx(kept)
    assert 0 <= g.ratio <= 1 and g.restarts == len(processes) - 1


STEADY = {"loss": 0.5, "lr": 1e-3, "grad_norm": 1.0, "ema_seconds": 0.0, "rank_images": 16, "skipped_total": 0}


def train(metrics, step, step_seconds, data_wait):
    """One step of 16 images; only the times vary."""
    return metrics.train_step(
        step=step, images=16 * step, step_seconds=step_seconds, data_wait=data_wait, epoch=0, **STEADY
    )


def test_metrics_processor_accounts_across_a_resume(tmp_path):
    """Process 1: 10 steps, its "end" row. Process 2 (a new Metrics on the same run directory) resumes at step 5 and
    starts its counters at the run's totals: 5 re-done steps, 1 restart, a ratio in (0, 1]."""
    cfg = MetricsConfig(prometheus=True, prometheus_addr="127.0.0.1", prometheus_port=free_port(), job="7")
    kw = dict(rank=0, local_rank=0, world_size=1, run="r", run_dir=str(tmp_path), log_every=5)
    with Metrics(cfg, **kw) as m:
        m.event("start", step=0)
        for step in range(1, 11):
            train(m, step, 0.02, 0.005)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows] == ["start", "train", "train", "end"]
    assert rows[-1]["process"]["steps"] == 10 and rows[-1]["step"] == 10
    assert rows[-1]["process"]["step_s"] == pytest.approx(10 * 0.015)
    assert rows[-1]["process"]["data_wait_s"] == pytest.approx(10 * 0.005)
    cfg.prometheus_port = free_port()
    with Metrics(cfg, **kw) as m:
        m.event("start", step=5)
        for step in range(6, 11):
            train(m, step, 0.02, 0.005)
        m.checkpoint(duration=0.3, stall=0.25, success_time=1.0, images=160)

        def value(name):
            return m.prom.registry.get_sample_value(name, {"rank": "0", "job": "7", "run": "r"})

        assert value("ddpm_restarts_total") == 1
        assert value("ddpm_goodput_redone_steps_total") == 5
        assert value("ddpm_goodput_step_seconds_total") == pytest.approx(15 * 0.015)
        assert value("ddpm_goodput_redone_seconds_total") == pytest.approx(5 * 0.015)
        assert value("ddpm_goodput_data_wait_seconds_total") == pytest.approx(15 * 0.005)
        assert value("ddpm_goodput_checkpoint_stall_seconds_total") == pytest.approx(0.25)
        assert value("ddpm_goodput_restart_lost_seconds_total") >= 0
        assert 0 < value("ddpm_goodput_ratio") <= 1
    g = goodput(json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert (g.restarts, g.redone_steps) == (1, 5) and g.kept_s == pytest.approx(10 * 0.015)


def test_only_rank_0_publishes_goodput(tmp_path):
    cfg = MetricsConfig(prometheus=True, prometheus_addr="127.0.0.1", prometheus_port=free_port(), job="7")
    with Metrics(cfg, rank=1, local_rank=0, world_size=2, run="r", run_dir=str(tmp_path)) as m:
        m.event("start", step=0)
        train(m, 50, 0.02, 0.0)
        assert m.ledger is None and not m.prom.goodput
        assert m.prom.registry.get_sample_value("ddpm_goodput_ratio", {"rank": "1", "job": "7", "run": "r"}) is None


def test_report_section_from_the_constructed_run(tmp_path):
    from ddpm_dist.reporting.collect import collect
    from ddpm_dist.reporting.html import render

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    d = collect(str(tmp_path), now=2000.0)
    assert d.goodput == goodput(ROWS) and not d.notes["goodput"]
    text = " ".join(sections(render(d)).text["goodput"].split())
    assert "goodput ratio 18.0% (time in kept steps / wall time)" in text  # 20 s of 111 s
    assert "wall time since the first start 1.9 min" in text and "time in kept steps 20 s (18.0%)" in text
    assert "re-done steps 5 (6 s (5.4%))" in text and "restarts 2; time lost to them 1.0 min (55.9%)" in text
    assert "checkpoint stall 1.5 s (1.4%)" in text and "data wait 3.2 s (2.9%)" in text
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "train", "images": 16, "time": 1.0}) + "\n")
    assert "no start row in metrics.jsonl: no goodput" in sections(render(collect(str(tmp_path)))).text["goodput"]
