"""Single-process training end to end: loss falls, the run directory has everything, sampling reads it."""

import json
import os

import pytest

from tests.support.common import ROOT
from tests.support.train_helpers import digits_args, run_module


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "digits"
    env = {**os.environ, "PYTHONPATH": ROOT}
    schedule = "train.total_images=3200 train.warmup_images=320 train.log_every=5 train.sample_every_images=0".split()
    args = digits_args(run, *schedule, "checkpoint.every_images=1600", "sample.steps=10")
    r = run_module("ddpm_dist.train", *args, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return run, r


def test_loss_falls(short_run):
    run, _ = short_run
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["event"] == "train"]
    assert len(losses) == 10
    assert losses[-1] < 0.5 * losses[0], losses


def test_run_directory_contents(short_run):
    run, r = short_run
    assert (run / "config.yaml").exists() and (run / "export.safetensors").exists()
    ckpts = sorted(os.listdir(run / "checkpoints"))
    assert ckpts == ["step_000000025", "step_000000050"]  # keep_last=2
    assert all((run / "checkpoints" / c / "COMMITTED").exists() for c in ckpts)
    assert (run / "samples" / "final_grid.png").exists() and (run / "curves.png").exists()
    assert "resumed from" not in r.stderr


def test_sample_cli_from_export_and_run(short_run, tmp_path):
    run, _ = short_run
    env = {**os.environ, "PYTHONPATH": ROOT}
    for src in (["--export", str(run / "export.safetensors")], ["--run", str(run)]):
        out = tmp_path / src[0][2:]
        options = "--num-images 6 --batch-size 4 --steps 5 --classes 3 --guidance 2.0 --npz".split()
        r = run_module("ddpm_dist.sample", *src, "--out", out, *options, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        names = sorted(os.listdir(out))
        assert [n for n in names if n[0].isdigit()] == [f"{i:06d}.png" for i in range(6)]
        for extra in ("grid.png", "trajectory.png", "reverse.gif", "samples.npz", "sampling.json"):
            assert extra in names
        assert json.load(open(out / "sampling.json"))["labels"] == [3] * 6
    # EMA weights from the run directory's checkpoint equal those of the export: same images.
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "export" / "000004.png"))
    b = np.asarray(Image.open(tmp_path / "run" / "000004.png"))
    assert np.array_equal(a, b)
