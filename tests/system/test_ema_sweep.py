"""`python -m ddpm_dist.ema sweep` on a 4-step digits run with two EMA profiles snapshotted twice: one result per std,
each distance the one `evaluate frechet --export` gives that std's export with the same arguments (same seeds, same
code), the best the argmin, a PNG figure; a re-run reuses the exports; bad input is a one-line error with exit 2."""
import json
import math
import os
import subprocess

import pytest
import torch
from PIL import Image

from tests.support.common import ROOT
from tests.support.train_helpers import PYTHON, child_env, run_train

STD_RANGE, STDS = "0.03:0.09:3", [0.03, 0.06, 0.09]  # between and around the snapshotted profiles 0.05 and 0.10
SAMPLING = ["--num-images", "32", "--batch-size", "16", "--steps", "2", "--guidance", "2", "--classes", "0,3,7"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ema_sweep") / "run"
    run_train(run, 4, "ema.stds=[0.05,0.1]", "ema.snapshot_every_images=32")  # 16 images a step: 2 snapshot times
    return run


def _cli(main, argv, capsys) -> tuple[int, str, str]:
    """An entry point in this process, as `python -m` runs it (run_cli: one-line errors, exit codes)."""
    from ddpm_dist.command_line import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_sweep_scores_each_length_as_evaluate_frechet_does(run, tmp_path, capsys):
    from ddpm_dist.ema import main as ema_main
    from ddpm_dist.evaluate import main as evaluate_main

    out = run / "ema_sweep"
    r = subprocess.run([PYTHON, "-m", "ddpm_dist.ema", "sweep", "--run", str(run), "--std-range", STD_RANGE, *SAMPLING],
                       cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "sweep.json"))
    rows = summary["results"]
    assert [row["std"] for row in rows] == STDS and not any(row["export_reused"] for row in rows)
    progress = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 3 and all(line.startswith(f"[{i + 1}/3] std {s:.4f}: Fréchet distance ")
                                      for i, (line, s) in enumerate(zip(progress, STDS))), r.stdout
    distances = [row["frechet_distance"] for row in rows]
    assert all(math.isfinite(d) and d > 0 for d in distances), distances
    best = min(rows, key=lambda row: row["frechet_distance"])
    assert summary["best"] == best and f"best std: {best['std']:.4f}" in r.stdout
    with open(summary["best_export"], "rb") as a, open(best["export"], "rb") as b:
        assert a.read() == b.read()  # OUT/best.safetensors: the winner's export under a fixed name
    assert f"| {best['std']:.4f} (best) |" in r.stdout
    with Image.open(out / "sweep.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
        png.load()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep's subprocess (OMP_NUM_THREADS=1): the same arithmetic
    try:
        for row in rows:
            res = tmp_path / f"frechet-{row['std']}.json"
            code, _, err = _cli(evaluate_main, ["frechet", "--export", row["export"], "--data", summary["data"],
                                                "--no-feature-metrics", "--out", str(res), *SAMPLING], capsys)
            assert code == 0, err[-3000:]
            value = json.load(open(res))["value"]
            assert abs(value - row["frechet_distance"]) <= 1e-9 * max(1.0, abs(value)), (row, value)

        # A re-run reuses the exports (not rewritten) and scores them the same.
        mtimes = [os.stat(row["export"]).st_mtime_ns for row in rows]
        code, stdout, err = _cli(ema_main, ["sweep", "--run", str(run), "--std-range", STD_RANGE, *SAMPLING], capsys)
        assert code == 0, err[-3000:]
    finally:
        torch.set_num_threads(threads)
    again = json.load(open(out / "sweep.json"))["results"]
    assert all(row["export_reused"] for row in again) and stdout.count("(reused ") == 3
    assert [os.stat(row["export"]).st_mtime_ns for row in again] == mtimes
    assert [row["frechet_distance"] for row in again] == pytest.approx(distances, rel=1e-9)


@pytest.mark.parametrize("std_range, message", [
    ("0.10:0.05:3", "--std-range '0.10:0.05:3': expected LOW:HIGH:COUNT"),
    ("0.01:0.30:4", "0 < LOW < HIGH < 0.28"),
    ("0.01:0.20", "expected LOW:HIGH:COUNT"),
    ("0.01:0.20:1", "COUNT >= 2"),
    ("0.01:0.02:500", "closer than 1e-4"),
    ("0.01:0.20:3", "no committed EMA snapshot"),  # a good range, a run without snapshots
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, std_range, message):
    from ddpm_dist.ema import main as ema_main

    empty = tmp_path / "run"
    empty.mkdir()
    code, _, err = _cli(ema_main, ["sweep", "--run", str(empty), "--std-range", std_range], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err
    assert os.listdir(empty) == []  # nothing written
