"""python -m ddpm_dist.report: one self-contained HTML page about a run, finished (checked in headless
Chromium: every section there, every picture decodes), running, preempted or stopped, and a one-line error
for what is not a run directory."""

import html
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from tests.support.common import ROOT, wait_for
from tests.support.report_pages import sections
from tests.support.train_helpers import child_env, run_module, run_train, train_cmd

SECTION_IDS = ("summary", "config", "hardware", "curves", "samples", "evaluation", "checkpoints", "performance")
# Without these Chromium reaches for the network (component updates, sync, field trials) and for a GPU.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Appended to a copy of the report: what the browser made of every <img>, once everything has loaded.
IMAGE_PROBE = """<script>
window.addEventListener("load", function () {
  var seen = [];
  document.querySelectorAll("img").forEach(function (img) {
    seen.push({alt: img.alt, width: img.naturalWidth, height: img.naturalHeight, complete: img.complete});
  });
  var out = document.createElement("pre");
  out.id = "image-probe";
  out.textContent = JSON.stringify(seen);
  document.body.appendChild(out);
});
</script>"""


def report_cli(*args):
    return run_module("ddpm_dist.report", *args, timeout=120)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """40 steps with two grids, two in-training evaluations and two checkpoints; then a sample folder (grid,
    trajectory), `evaluate frechet` (frechet.json) and `evaluate recon` (recon.json, recon.png)."""
    run = tmp_path_factory.mktemp("report") / "run"
    run_train(
        run,
        40,
        "train.sample_every_images=320",
        "checkpoint.every_images=320",
        "eval.every_images=320",
        "eval.num_images=64",
        "eval.extractor=digits",
    )
    for cmd in (
        ["ddpm_dist.sample", "--run", run, "--out", run / "samples" / "final", "--num-images", "16"],
        ["ddpm_dist.evaluate", "frechet", "--run", run, "--num-images", "64"],
        [
            "ddpm_dist.evaluate",
            "recon",
            "--run",
            run,
            *"--num-images 16 --t 10,100 --ddim-steps 4".split(),
            "--out",
            run / "recon",
        ],
    ):
        r = run_module(*cmd)
        assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_finished_run(finished_run):
    r = report_cli("--run", finished_run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished" in r.stdout
    page = (finished_run / "report.html").read_text()
    found = sections(page)
    assert set(SECTION_IDS) <= set(found.text)
    assert "<script" not in page and not re.search(
        r"(src|href)=\"(?!data:image/png;base64,|#)", page
    )  # nothing outside
    assert len(found.srcs) == 6  # curves, training grid, sampled grid, trajectory, eval curve, recon.png
    text = found.text
    assert "finished" in text["summary"] and "640" in text["summary"]
    assert "total_images: 640" in text["config"]
    frechet = json.loads((finished_run / "frechet.json").read_text())
    assert "frechet.json" in text["evaluation"] and f"{frechet['value']:.4g}" in text["evaluation"]
    assert "recon/recon.json" in text["evaluation"] and "digits-classifier" in text["evaluation"]
    assert "step_000000020" in text["checkpoints"] and "step_000000040" in text["checkpoints"]
    assert "images/s" in text["performance"] and "optimizer" in text["performance"]
    start = [json.loads(x) for x in (finished_run / "metrics.jsonl").read_text().splitlines() if '"start"' in x]
    assert ("unknown" in text["hardware"]) != bool(start)  # the start row, when training writes one


def test_finished_run_in_chromium(finished_run, tmp_path):
    """Chromium renders the page offline: every section, every picture decoded; a screenshot of the asked size."""
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.fail("chromium is not installed (`make system-deps` installs it)")  # CI has it: never skip silently
    out = tmp_path / "report.html"
    assert report_cli("--run", finished_run, "--out", out).returncode == 0
    probed = tmp_path / "probed.html"
    probed.write_text(out.read_text().replace("</body>", IMAGE_PROBE + "</body>"))

    def browse(*args):
        profile = tmp_path / f"profile{len(list(tmp_path.iterdir()))}"  # a fresh profile each time
        r = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    dom = browse("--dump-dom", "--virtual-time-budget=10000", f"file://{probed}")
    assert set(SECTION_IDS) <= set(sections(dom).text)
    probe = re.search(r'<pre id="image-probe">(.*?)</pre>', dom, re.S)
    assert probe, dom[-2000:]
    images = json.loads(html.unescape(probe.group(1)))
    assert len(images) == 6
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images), images
    shot = tmp_path / "shot.png"
    browse(f"--screenshot={shot}", "--window-size=1200,3000", f"file://{out}")
    from PIL import Image

    with Image.open(shot) as im:
        im.load()
        assert im.format == "PNG" and im.size == (1200, 3000)


def test_running_then_preempted_run(tmp_path):
    """While training appends to metrics.jsonl the report says running; after SIGTERM, preempted."""
    run = tmp_path / "run"
    p = subprocess.Popen(
        train_cmd(run, 100000),
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        metrics = run / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and '"event": "train"' in metrics.read_text(), 120, "a training row")
        r = report_cli("--run", run)
        assert r.returncode == 0 and "running (last row" in r.stdout, r.stdout + r.stderr[-3000:]
        assert "running (last row" in sections((run / "report.html").read_text()).text["summary"]
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(timeout=120) == 75
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    r = report_cli("--run", run)
    assert r.returncode == 0 and "preempted at step" in r.stdout, r.stdout + r.stderr[-3000:]
    text = sections((run / "report.html").read_text()).text
    assert "preempted at step" in text["summary"] and "signal SIGTERM" in text["summary"]
    assert "step_" in text["checkpoints"]  # the checkpoint saved on the way out


def test_partial_last_line_stale_run_and_start_row(tmp_path):
    """A row being written is skipped, a run silent for an hour is stopped, the start row fills the hardware
    section, and what is missing is one line in its section."""
    from ddpm_dist.reporting import write_report

    now = time.time()
    rows = [
        {
            "event": "start",
            "world_size": 2,
            "backend": "fsdp",
            "hosts": ["node-a", "node-b"],
            "device": "cpu",
            "torch": "2.x",
            "num_params": 1234,
            "time": now - 3700,
        },
        {
            "event": "train",
            "step": 5,
            "images": 80,
            "epoch": 0,
            "loss": 0.5,
            "lr": 1e-3,
            "images_per_s": 100.0,
            "data_wait_share": 0.1,
            "step_seconds": 0.2,
            "checkpoint_age_s": 30.0,
            "time": now - 3600,
        },
        {"event": "checkpoint", "duration_s": 1.5, "stall_s": 0.5, "time": now - 3600},
    ]
    (tmp_path / "config.yaml").write_text("run_dir: x\nname: stale <run>\n")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"event": "train", "st')
    path, data = write_report(str(tmp_path), now=now)
    assert data.status == "stopped" and data.status_text == "stopped (last row 3600 s ago)"
    page = open(path).read()
    text = sections(page).text
    assert "stale &lt;run&gt;" in page and "stale <run>" in text["summary"]
    assert "node-a, node-b" in text["hardware"] and "fsdp" in text["hardware"]
    assert "no sample grid yet" in text["samples"] and "ddpm_dist.sample --run" in text["samples"]
    assert "no committed checkpoint" in text["checkpoints"] and "no evaluation yet" in text["evaluation"]
    assert "0.2 s" in text["performance"] and "30 s" in text["performance"]  # step time, checkpoint age
    assert len(sections(page).srcs) == 1  # the curves


def test_garbled_run_directory_is_notes_not_errors(tmp_path):
    """Run directories are data: wrong types, non-JSON, a fake PNG, a link out of the directory and a
    checkpoint still being written each end up as a line of the page (escaped), never as an exception."""
    from ddpm_dist.reporting import write_report

    (tmp_path / "metrics.jsonl").write_bytes(
        b'[1, 2]\nnot json\n\xff\xfe\n{"event": "train", "step": "x", "images": 16, "loss": "nan?", "time": "t"}\n'
        b'{"event": "start", "world_size": "<b>", "hosts": 3, "time": null}\n'
        b'{"event": "state_bytes", "per_rank": [{"params": "many"}, 7]}\n{"event": "checkpoint", "stall_s": []}\n'
    )
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "final_grid.png").write_bytes(b"<script>not a png</script>")
    (samples / "x").mkdir()
    (samples / "x" / "trajectory.png").symlink_to("/etc/hostname")
    (tmp_path / "fid.json").write_text('{"metric": {"a": "<i>"}, "value": 1.5, "n": "<script>"}')
    (tmp_path / "recon.json").write_text('{"rows": [1, {"t": "<t>", "ddim_psnr": 3.0}], "n": []}')
    ckpts = tmp_path / "checkpoints"
    for name, meta in (
        ("step_000000001", "[1]"),
        ("step_000000002", '{"checkpoint_format": 2, "step": "<s>", "eval": 5}'),
    ):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "meta.json").write_text(meta)
        (ckpts / name / "COMMITTED").write_text("[]")
    (ckpts / "step_000000003").mkdir()
    path, data = write_report(str(tmp_path))
    page = open(path).read()
    assert "<script" not in page and "<b>" not in page and "<i>" not in page and "<t>" not in page
    text = sections(page).text
    assert "unreadable line(s)" in text["summary"] and "not a PNG file" in text["samples"]
    assert "symbolic link" in text["samples"] or "no trajectory" in text["samples"]
    assert "fid.json" in text["evaluation"] and "recon.json" in text["evaluation"]
    assert "step_000000001" in text["checkpoints"] and "step_000000003: no COMMITTED marker" in text["checkpoints"]


def test_checkpoints_kept_by_keep_best_show_their_score(tmp_path):
    """meta.json's optional "eval" (checkpoint.keep_best): the score in the table, the lowest marked best."""
    from ddpm_dist.reporting import write_report

    (tmp_path / "config.yaml").write_text("run_dir: x\n")
    now = time.time()
    for step, score in ((10, 7.5), (20, 3.25), (30, None)):
        d = tmp_path / "checkpoints" / f"step_{step:09d}"
        d.mkdir(parents=True)
        meta = {"checkpoint_format": 2, "step": step, "images": 16 * step, "world_size": 2, "backend": "fsdp"}
        if score is not None:
            meta["eval"] = {"frechet_distance": score, "extractor": "digits-classifier", "images": 16 * step}
        (d / "meta.json").write_text(json.dumps(meta))
        (d / "COMMITTED").write_text(json.dumps({"step": step, "time": now - 120}))
    path, data = write_report(str(tmp_path), now=now)
    assert [c.get("best", False) for c in data.checkpoints] == [False, True, False]
    text = sections(open(path).read()).text["checkpoints"]
    assert "step_000000020 (best)" in text and "3.25" in text and "7.5" in text and "2.0 min" in text


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_bad_input_is_one_line(tmp_path, where):
    run = tmp_path / "nope" if where == "missing" else tmp_path
    r = report_cli("--run", run)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(run) in r.stderr
