"""The real-size model: the DDPM paper's CIFAR-10 network (35.7M parameters, configs/cifar10.yaml) trains with
FSDP2 in two processes with bf16, checkpoints, resumes bitwise from a checkpoint and samples. A few steps at
a global batch of 4 on 32x32 RGB digits: what is tested is the path, at the size."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.train_helpers import PYTHON, assert_bitwise_equal, checkpoint_tensors, run_command, start_command

ARGS = [
    "data.num_workers=0",
    "parallel.backend=fsdp",
    "train.bf16=true",
    "train.global_batch=4",
    "train.total_images=12",
    "train.warmup_images=0",
    "train.log_every=1",
    "train.sample_grid_images=8",
    "checkpoint.every_images=8",
    "checkpoint.async_save=false",
    "checkpoint.keep_last=3",
    "sample.sampler=ddim",
    "sample.steps=2",
]


def torchrun(*args, timeout=900):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    r = run_command(cmd, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def rgb32(tmp_path_factory):
    from ddpm_dist.data import build_shards
    from ddpm_dist.data.sources import digits_images, iter_numpy

    tmp = tmp_path_factory.mktemp("rgb32")
    images, labels = digits_images(32)
    np.savez(tmp / "d.npz", images=np.repeat(images[:256], 3, axis=-1), labels=labels[:256])
    build_shards(iter_numpy(str(tmp / "d.npz")), str(tmp / "shards"), samples_per_shard=64, progress=False)
    return str(tmp / "shards" / "manifest.json")


def test_cifar10_preset_trains_with_fsdp_bf16_resumes_bitwise_and_samples(tmp_path, rgb32):
    train = ["-m", "ddpm_dist.train", "--config", "configs/cifar10.yaml", f"data.source={rgb32}", *ARGS]
    straight = tmp_path / "straight"
    r = torchrun(*train, f"run_dir={straight}")
    assert "fsdp, 2 rank(s)" in r.stderr and "35.7" in r.stderr
    ckpts = sorted(os.listdir(straight / "checkpoints"))
    assert ckpts[-2:] == ["step_000000002", "step_000000003"]
    meta = json.loads((straight / "checkpoints" / "step_000000003" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["backend"] == "fsdp"
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 3 and all(0 < v < 2 for v in losses)

    # resume from the step-2 checkpoint in another run directory: step 3 is bitwise the uninterrupted one
    resumed = tmp_path / "resumed"
    os.makedirs(resumed / "checkpoints")
    shutil.copytree(straight / "checkpoints" / "step_000000002", resumed / "checkpoints" / "step_000000002")
    # sampling reads only the straight run: it runs beside the resumed training (the start-ups overlap)
    out = tmp_path / "samples"
    sample = ["--run", straight, "--out", out, *"--num-images 4 --steps 2 --batch-size 2 --world-size 2".split()]
    with open(tmp_path / "sample.log", "w+") as sample_log:
        sampling = start_command(
            [PYTHON, "-m", "ddpm_dist.sample", *map(str, sample)], stdout=sample_log, stderr=subprocess.STDOUT
        )
        try:
            r = torchrun(*train, f"run_dir={resumed}")
        finally:
            sample_code = sampling.wait(timeout=600)
        sample_log.seek(0)
        sample_err = sample_log.read()
    assert "resumed from" in r.stderr and "1 steps to go" in r.stderr
    a = checkpoint_tensors(str(straight / "checkpoints" / "step_000000003"))
    assert sum(torch.is_tensor(v) and v.numel() for v in a.values()) > 3 * 35_700_000  # weights, EMA, Adam moments
    assert_bitwise_equal(a, checkpoint_tensors(str(resumed / "checkpoints" / "step_000000003")))

    assert sample_code == 0, sample_err[-4000:]
    pngs = sorted(p for p in os.listdir(out) if p[:6].isdigit() and p.endswith(".png"))
    assert pngs == [f"{i:06d}.png" for i in range(4)]
    imgs = np.stack([np.asarray(Image.open(out / p)) for p in pngs])
    assert imgs.shape == (4, 32, 32, 3) and imgs.std() > 5


def test_the_smoke_config_runs_on_the_cpu_as_documented(tmp_path):
    """configs/smoke.yaml's commands (train with a resume half-way, sample, evaluate), unchanged but the sizes."""
    run = tmp_path / "smoke"
    half = 1024  # the config's 4,096 images with a checkpoint and a sample grid every 2,048, at half the size
    train = [
        PYTHON,
        "-m",
        "ddpm_dist.train",
        "--config",
        "configs/smoke.yaml",
        f"run_dir={run}",
        f"checkpoint.every_images={half}",
        f"train.sample_every_images={half}",
    ]
    for cmd in (
        train + [f"train.total_images={half}"],
        train + [f"train.total_images={2 * half}"],
        [PYTHON, "-m", "ddpm_dist.sample", "--run", str(run), "--out", str(run / "check"), "--num-images", "16"],
        [PYTHON, "-m", "ddpm_dist.evaluate", "frechet", "--samples", str(run / "check")],
    ):
        r = run_command(cmd, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(os.listdir(run / "checkpoints"))[-2:] == ["step_000000032", "step_000000064"]
    assert (run / "export.safetensors").exists() and (run / "samples" / "final_grid.png").exists()
    result = json.loads((run / "check" / "frechet.json").read_text())
    assert result["n"] == 16 and result["value"] > 0 and "step 64" in result["source"]
