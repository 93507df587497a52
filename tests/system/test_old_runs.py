"""Config files and run directories of the shape before the eval: and ema: sections still load, resume and sample.

tests/fixtures/run_v1 is a 4-step digits run written by that code (its config.yaml has train.eval_* and
train.ema_*); run_v1_expected.json holds what that code gave when resuming a copy of it and sampling.
tests/fixtures/config_v1.yaml is configs/digits.yaml of that shape."""

import json
import os
import shutil

import numpy as np
import pytest
import yaml

from ddpm_dist.config import RENAMED, load_config, to_dict
from tests.support.common import ROOT
from tests.support.train_helpers import run_module

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
EXPECTED = json.load(open(os.path.join(FIXTURES, "run_v1_expected.json")))
NOTICES = [f"config: {old} is now {new}" for old, new in RENAMED.items()]  # every old key is in an old config.yaml


def run(module, *args, timeout=300):
    r = run_module(module, *args, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("config: ")]


def copy_of_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("old") / "run_v1"
    shutil.copytree(os.path.join(FIXTURES, "run_v1"), out)
    return out


def sample(run_dir, out):
    r = run("ddpm_dist.sample", "--run", str(run_dir), "--out", str(out), *EXPECTED["sample_args"])
    z = np.load(out / "samples.npz")
    return r, z["labels"].tolist(), z["images"][..., 0].astype(int)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A copy of the old run resumed from its checkpoint (step 4) to step 8 by today's code, from its config.yaml."""
    run_dir = copy_of_run(tmp_path_factory)
    r = run(
        "ddpm_dist.train",
        "--config",
        str(run_dir / "config.yaml"),
        f"run_dir={run_dir}",
        f"train.total_images={EXPECTED['resumed_to_images']}",
    )
    return run_dir, r


def test_an_old_run_directory_resumes_where_it_stopped(resumed):
    run_dir, r = resumed
    assert notices(r.stderr) == NOTICES, r.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_000000004 (step 4, 64 images" in r.stderr
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    losses = {str(row["step"]): row["loss"] for row in rows if row["event"] == "train" and row["step"] > 4}
    assert losses == pytest.approx(EXPECTED["resumed_losses"], rel=1e-5)  # what the old code gave, step for step
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_000000004", "step_000000008"]
    saved = yaml.safe_load(open(run_dir / "config.yaml"))  # rewritten in today's shape
    assert saved["eval"]["every_images"] == 0 and saved["ema"]["halflife_images"] == 20000.0
    assert not [k for k in saved["train"] if k.startswith(("eval_", "ema_"))], saved["train"]


def test_the_resumed_run_samples_as_the_old_code_did(resumed, tmp_path):
    run_dir, _ = resumed
    _, labels, images = sample(run_dir, tmp_path / "s")
    assert labels == EXPECTED["sample_labels"]
    assert np.abs(images - np.array(EXPECTED["sample_images"])).max() <= 1  # uint8 rounding on another CPU at most


def test_an_old_run_directory_as_written_samples(tmp_path_factory, tmp_path):
    run_dir = copy_of_run(tmp_path_factory)
    _, labels, images = sample(run_dir, tmp_path / "s")
    assert labels == EXPECTED["as_written_sample_labels"]
    assert np.abs(images - np.array(EXPECTED["as_written_sample_images"])).max() <= 1
    assert open(run_dir / "config.yaml").read() == open(os.path.join(FIXTURES, "run_v1", "config.yaml")).read()


def test_an_old_shape_config_file_loads_with_one_line_per_renamed_key():
    r = run("ddpm_dist.train", "--config", "tests/fixtures/config_v1.yaml", "--print-config", timeout=120)
    assert r.stderr.splitlines() == NOTICES  # config_v1.yaml sets every renamed key, nothing else is said
    old = yaml.safe_load(r.stdout)
    today = load_config(
        os.path.join(ROOT, "configs", "digits.yaml"),
        ["eval.every_images=50000", "eval.num_images=500", "eval.batch_size=100", "eval.reference=validation"],
    )
    assert old == to_dict(today)  # the same run as today's digits.yaml with those evaluation settings
