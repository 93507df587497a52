"""`python -m ddpm_dist.ema sweep` on a 4-step digits run with two EMA profiles snapshotted twice: one result per std,
each distance the one `evaluate frechet --export` gives that std's export with the same arguments (same seeds, same
code), the best the argmin, a PNG figure; a re-run reuses the exports; bad input is a one-line error with exit 2.
Each length's profile fit error is listed; one above --max-fit-error is never best, even with the smallest distance;
a range with no reliable length is a one-line error naming the profiles to track."""

import json
import math
import os
import subprocess

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.support.common import ROOT
from tests.support.train_helpers import PYTHON, child_env, run_train

STD_RANGE, STDS = "0.03:0.09:3", [0.03, 0.06, 0.09]  # between and around the snapshotted profiles 0.05 and 0.10
FIT_ERRORS = [0.2286, 0.0413, 0.0297]  # theirs from 0.05 and 0.10 at 32 and 64 images (phema.fit_error, closed form)
PERMISSIVE = ["--max-fit-error", "1"]  # every length of STD_RANGE eligible: best is the plain argmin
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
    r = subprocess.run(
        [PYTHON, "-m", "ddpm_dist.ema", "sweep", "--run", str(run), "--std-range", STD_RANGE, *SAMPLING, *PERMISSIVE],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "sweep.json"))
    rows = summary["results"]
    assert [row["std"] for row in rows] == STDS and not any(row["export_reused"] for row in rows)
    progress = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 3 and all(
        line.startswith(f"[{i + 1}/3] std {s:.4f}: Fréchet distance ")
        for i, (line, s) in enumerate(zip(progress, STDS))
    ), r.stdout
    distances = [row["frechet_distance"] for row in rows]
    assert all(math.isfinite(d) and d > 0 for d in distances), distances
    best = min(rows, key=lambda row: row["frechet_distance"])
    assert summary["best"] == best and f"best std: {best['std']:.4f}" in r.stdout
    with open(summary["best_export"], "rb") as a, open(best["export"], "rb") as b:
        assert a.read() == b.read()  # OUT/best.safetensors: the winner's export under a fixed name
    assert f"| {best['std']:.4f} (best) |" in r.stdout
    assert [row["profile_fit_error"] for row in rows] == pytest.approx(FIT_ERRORS, abs=1e-4)
    for row, line in zip(rows, progress):  # each listed: the progress line, the table, the export's own record
        assert f"profile fit error {row['profile_fit_error']:.1e}" in line and row["reliable"]
        assert f" | {row['profile_fit_error']:.1e} | {os.path.basename(row['export'])} |" in r.stdout
        info = json.loads(safe_open(row["export"], "pt").metadata()["info"])
        assert info["posthoc_ema"]["profile_fit_error"] == pytest.approx(row["profile_fit_error"], rel=1e-12)
    with Image.open(out / "sweep.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
        png.load()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep's subprocess (OMP_NUM_THREADS=1): the same arithmetic
    try:
        for row in rows:
            res = tmp_path / f"frechet-{row['std']}.json"
            code, _, err = _cli(
                evaluate_main,
                [
                    "frechet",
                    "--export",
                    row["export"],
                    "--data",
                    summary["data"],
                    "--no-feature-metrics",
                    "--out",
                    str(res),
                    *SAMPLING,
                ],
                capsys,
            )
            assert code == 0, err[-3000:]
            value = json.load(open(res))["value"]
            assert abs(value - row["frechet_distance"]) <= 1e-9 * max(1.0, abs(value)), (row, value)

        # A re-run reuses the exports (not rewritten) and scores them the same.
        mtimes = [os.stat(row["export"]).st_mtime_ns for row in rows]
        code, stdout, err = _cli(
            ema_main, ["sweep", "--run", str(run), "--std-range", STD_RANGE, *SAMPLING, *PERMISSIVE], capsys
        )
        assert code == 0, err[-3000:]
    finally:
        torch.set_num_threads(threads)
    again = json.load(open(out / "sweep.json"))["results"]
    assert all(row["export_reused"] for row in again) and stdout.count("(reused ") == 3
    assert [os.stat(row["export"]).st_mtime_ns for row in again] == mtimes
    assert [row["frechet_distance"] for row in again] == pytest.approx(distances, rel=1e-9)


@pytest.mark.parametrize(
    "std_range, message",
    [
        ("0.10:0.05:3", "--std-range '0.10:0.05:3': expected LOW:HIGH:COUNT"),
        ("0.01:0.30:4", "0 < LOW < HIGH < 0.28"),
        ("0.01:0.20", "expected LOW:HIGH:COUNT"),
        ("0.01:0.20:1", "COUNT >= 2"),
        ("0.01:0.02:500", "closer than 1e-4"),
        ("0.01:0.20:3", "no committed EMA snapshot"),  # a good range, a run without snapshots
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, std_range, message):
    from ddpm_dist.ema import main as ema_main

    empty = tmp_path / "run"
    empty.mkdir()
    code, _, err = _cli(ema_main, ["sweep", "--run", str(empty), "--std-range", std_range], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err
    assert os.listdir(empty) == []  # nothing written


def test_unreliable_length_is_never_best(run, tmp_path, capsys):
    """The case the demo hit: the smallest distance at a length the snapshots cannot express. On this run the
    distance falls from 0.05 (tracked: fit error 0) to 0.07 (fit error 0.055, interpolated from 2 snapshot times);
    with --max-fit-error 0.045 that length is scored, drawn and listed, never best. With a threshold below every fit
    error the sweep fails before writing anything, naming the profiles to track."""
    from ddpm_dist.ema import main as ema_main

    out = tmp_path / "sweep"
    argv = ["sweep", "--run", str(run), *SAMPLING, "--out", str(out)]
    code, _, err = _cli(ema_main, [*argv, "--std-range", STD_RANGE, "--max-fit-error", "0.01"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "within --max-fit-error 0.01" in err and '"ema.stds=[0.03,0.06,0.09]"' in err, err  # what to track
    assert not out.exists()

    threshold = 0.045
    code, stdout, err = _cli(ema_main, [*argv, "--std-range", "0.05:0.07:2", "--max-fit-error", str(threshold)], capsys)
    assert code == 0, err[-3000:]
    summary = json.load(open(out / "sweep.json"))
    rows = summary["results"]
    assert [row["profile_fit_error"] for row in rows] == pytest.approx([0.0, 0.0550], abs=1e-4)
    assert summary["max_fit_error"] == threshold and summary["unreliable"] == [0.07]
    assert [row["reliable"] for row in rows] == [True, False]
    assert rows[1]["frechet_distance"] < rows[0]["frechet_distance"], rows  # the case is built: 0.07 scores best
    assert summary["best"] == rows[0] and "best std: 0.0500" in stdout
    assert "| 0.0700 (unreliable) |" in stdout and "never best): std 0.0700" in stdout
    with open(out / "best.safetensors", "rb") as a, open(summary["best"]["export"], "rb") as b:
        assert a.read() == b.read()
    with Image.open(out / "sweep.png") as png:
        assert png.format == "PNG"


def test_choose_best_skips_unreliable_lengths():
    from ddpm_dist.posthoc.sweep import choose_best

    rows = [
        {"std": 0.1, "frechet_distance": 5.0, "profile_fit_error": 0.001},
        {"std": 0.2, "frechet_distance": 4.0, "profile_fit_error": 0.02},
        {"std": 0.3, "frechet_distance": 1.0, "profile_fit_error": 0.2},  # smallest distance, unreliable
        {"std": 0.4, "frechet_distance": float("nan"), "profile_fit_error": 0.0},
    ]
    assert choose_best(rows, 0.02)["std"] == 0.2  # at the threshold counts as reliable
    assert choose_best(rows, 0.01)["std"] == 0.1
    assert choose_best(rows, 1.0)["std"] == 0.3
    assert choose_best(rows, 1e-4) is None  # only a NaN distance left


def test_demo_case_and_suggested_profiles():
    """The issue's case in closed form: profiles 0.05 and 0.10 every 15,000 of 150,000 images cannot express 0.25
    (fit error 0.14) under the default threshold; the suggestion for the range does, at the same spacing."""
    from ddpm_dist.posthoc.sweep import DEFAULT_MAX_FIT_ERROR, _fit_errors, suggest_profiles

    stds = [0.05, 0.1, 0.15, 0.2, 0.25]
    errors = _fit_errors([0.05, 0.1], 15000, 150000, stds)
    assert errors[0] < 1e-6 and errors[1] < 1e-6 and errors[4] == pytest.approx(0.14, abs=0.005)
    assert errors[4] > DEFAULT_MAX_FIT_ERROR
    times = list(range(15000, 150001, 15000))
    profiles, every = suggest_profiles(stds, times, DEFAULT_MAX_FIT_ERROR)
    assert every == 15000 and max(_fit_errors(profiles, every, 150000, stds)) <= DEFAULT_MAX_FIT_ERROR
    profiles, every = suggest_profiles(stds, times, 1e-5)  # tighter: denser snapshots
    assert every < 15000 and max(_fit_errors(profiles, every, 150000, stds)) <= 1e-5
