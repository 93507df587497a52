"""Seed-addressed sampling: the same images for any world size, resumable, complete."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.common import PYTHON, ROOT
from tests.support.train_helpers import run_module

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A class-conditional digits-shaped model with random (non-zero) weights, as an export file."""
    from ddpm_dist.artifacts import save_export
    from ddpm_dist.models import build_model

    torch.manual_seed(0)
    model = build_model({"preset": "digits", "base_channels": 16, "norm_groups": 8})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("export") / "export.safetensors"
    save_export(
        str(path),
        model.state_dict(),
        None,
        model.config,
        {"diffusion": {"schedule": "cosine", "num_steps": 100}, "sample": {"sampler": "ddim", "steps": 6}},
    )
    return str(path)


def sample(export, out, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = run_module("ddpm_dist.sample", "--export", export, "--out", out, *args, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def pngs(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n[:6].isdigit()}


COMMON = [
    "--num-images",
    "11",
    "--batch-size",
    "4",
    "--sampler",
    "ddpm",
    "--steps",
    "6",
    "--guidance",
    "1.5",
    "--extras",
    "no",
    "--seed",
    "5",
]


def test_bitwise_identical_for_world_sizes_1_2_3(export, tmp_path):
    results = {}
    for world in (1, 2, 3):
        sample(export, tmp_path / f"w{world}", *COMMON, "--world-size", str(world))
        results[world] = pngs(tmp_path / f"w{world}")
    assert list(results[1]) == [f"{i:06d}.png" for i in range(11)]
    assert results[1] == results[2] == results[3]


def test_batch_size_changes_images_by_at_most_one_level(export, tmp_path):
    """Stated tolerance across batch sizes: at most 1/255 per pixel (batched convolutions round differently)."""
    sample(export, tmp_path / "b4", *COMMON)
    args = list(COMMON)
    args[args.index("--batch-size") + 1] = "3"
    sample(export, tmp_path / "b3", *args)
    a, b = pngs(tmp_path / "b4"), pngs(tmp_path / "b3")
    assert a.keys() == b.keys()
    for name in a:
        x = np.asarray(Image.open(tmp_path / "b4" / name)).astype(int)
        y = np.asarray(Image.open(tmp_path / "b3" / name)).astype(int)
        assert np.abs(x - y).max() <= 1, name


def test_interrupted_run_resumes_to_exactly_the_requested_set(export, tmp_path):
    args = ["--num-images", "40", "--batch-size", "4", "--sampler", "ddim", "--steps", "20", "--extras", "no"]
    sample(export, tmp_path / "ref", *args)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [PYTHON, "-m", "ddpm_dist.sample", "--export", export, "--out", str(out), *args, "--world-size", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    end = time.time() + 120
    while time.time() < end and not (out.is_dir() and len([n for n in os.listdir(out) if n.endswith(".png")]) >= 8):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    partial = [n for n in os.listdir(out) if n[:6].isdigit()]
    assert 8 <= len(partial) < 40
    r = sample(export, out, *args, "--world-size", "2")
    assert pngs(out) == pngs(tmp_path / "ref")
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert "sampling" in r.stderr
