"""Config: YAML + overrides, one-line errors naming the key, resolved copy, CLI exit codes."""
import os
import subprocess

import pytest

from ddpm_dist.config import ConfigError, check_batch, load_config, save_resolved
from tests.support.common import PYTHON, ROOT


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_then_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 0.5\nmodel:\n  preset: tiny\n"),
                      ["train.lr=0.25", "model.channel_mults=[1,2]", "sample.guidance=3"])
    assert cfg.train.lr == 0.25 and cfg.model.channel_mults == [1, 2] and cfg.sample.guidance == 3.0
    assert isinstance(cfg.sample.guidance, float)


@pytest.mark.parametrize("text,overrides,match", [
    ("train:\n  lrr: 1\n", [], "unknown key 'train.lrr'"),
    ("", ["nosection.x=1"], "unknown key 'nosection'"),
    ("train:\n  global_batch: many\n", [], "train.global_batch: expected an integer"),
    ("train:\n  bf16: 3\n", [], "train.bf16: expected true or false"),
    ("diffusion:\n  schedule: wiggly\n", [], "diffusion.schedule: 'wiggly' is not one of"),
    ("train:\n  global_batch: 0\n", [], "train.global_batch: must be positive"),
    ("sample:\n  eta: 2\n", [], "sample.eta"),
    ("train: [1, 2\n", [], "invalid YAML"),
    ("train: 5\n", [], "train: expected a mapping"),
])
def test_errors_name_the_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(write(tmp_path, text), overrides)
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/c.yaml")


def test_batch_arithmetic():
    cfg = load_config(None, ["train.global_batch=64", "train.micro_batch=8"])
    assert check_batch(cfg, 2) == (8, 4)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        check_batch(cfg, 3)
    with pytest.raises(ConfigError, match="micro_batch=8 does not divide"):
        check_batch(load_config(None, ["train.global_batch=60", "train.micro_batch=8"]), 2)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "digits.yaml"), ["train.lr=0.003"])
    path = save_resolved(cfg, str(tmp_path))
    again = load_config(path)
    assert again == cfg


@pytest.mark.parametrize("args,match", [
    (["--config", "/nope.yaml"], "does not exist"),
    (["--config", "configs/digits.yaml", "train.nope=1"], "unknown key 'train.nope'"),
    (["--config", "configs/digits.yaml", "train.total_images=abc"], "expected an integer"),
    (["--config", "configs/digits.yaml", "data.source=/nope/manifest.json", "run_dir=RUN"], "does not exist"),
])
def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path, cpu_env, args, match):
    args = [a.replace("RUN", str(tmp_path / "run")) for a in args]
    r = subprocess.run([PYTHON, "-m", "ddpm_dist.train", *args], cwd=ROOT, env=cpu_env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr


def test_all_shipped_configs_load():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        if name.endswith(".yaml"):
            load_config(os.path.join(ROOT, "configs", name))
