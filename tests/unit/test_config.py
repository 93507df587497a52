"""Config: YAML + overrides, one-line errors naming the key, resolved copy, CLI exit codes."""

import os
import re
import subprocess

import pytest
import yaml

from ddpm_dist.config import (
    RENAMED,
    Config,
    ConfigError,
    EMAConfig,
    EvalConfig,
    check_batch,
    load_config,
    save_resolved,
)
from tests.support.common import PYTHON, ROOT


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_then_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, "train:\n  lr: 0.5\nmodel:\n  preset: tiny\n"),
        ["train.lr=0.25", "model.channel_mults=[1,2]", "sample.guidance=3"],
    )
    assert cfg.train.lr == 0.25 and cfg.model.channel_mults == [1, 2] and cfg.sample.guidance == 3.0
    assert isinstance(cfg.sample.guidance, float)


@pytest.mark.parametrize(
    "text,overrides,match",
    [
        ("train:\n  lrr: 1\n", [], "unknown key 'train.lrr'"),
        ("", ["nosection.x=1"], "unknown key 'nosection'"),
        ("train:\n  global_batch: many\n", [], "train.global_batch: expected an integer"),
        ("train:\n  bf16: 3\n", [], "train.bf16: expected true or false"),
        ("diffusion:\n  schedule: wiggly\n", [], "diffusion.schedule: 'wiggly' is not one of"),
        ("train:\n  global_batch: 0\n", [], "train.global_batch: must be positive"),
        ("sample:\n  eta: 2\n", [], "sample.eta"),
        ("train: [1, 2\n", [], "invalid YAML"),
        ("train: 5\n", [], "train: expected a mapping"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(write(tmp_path, text), overrides)
    assert "\n" not in str(e.value)


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-7 as a string; a float key takes it as the number it plainly is, a word stays an error."""
    cfg = load_config(write(tmp_path, "train:\n  lr: 3e-4\n"), ["train.weight_decay=1E-2", "diffusion.beta_end=+2e-2"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.diffusion.beta_end) == (3e-4, 1e-2, 2e-2)
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'e-7'"):
        load_config(None, ["train.lr=e-7"])


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


@pytest.mark.parametrize(
    "args,match",
    [
        (["--config", "/nope.yaml"], "does not exist"),
        (["--config", "configs/digits.yaml", "train.nope=1"], "unknown key 'train.nope'"),
        (["--config", "configs/digits.yaml", "train.total_images=abc"], "expected an integer"),
        (["--config", "configs/digits.yaml", "data.source=/nope/manifest.json", "run_dir=RUN"], "does not exist"),
    ],
)
def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path, cpu_env, args, match):
    args = [a.replace("RUN", str(tmp_path / "run")) for a in args]
    r = subprocess.run(
        [PYTHON, "-m", "ddpm_dist.train", *args], cwd=ROOT, env=cpu_env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr


def test_all_shipped_configs_load():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        if name.endswith(".yaml"):
            load_config(os.path.join(ROOT, "configs", name))


@pytest.mark.parametrize(
    "override,match",
    [
        ("eval.batch_size=0", "eval.batch_size: must be positive, got 0"),
        ("eval.extractor=clip", "eval.extractor: 'clip' is not one of digits, inception"),
        ("eval.reference=test", "eval.reference: 'test' is not one of train, validation"),
        ("ema.stds=[0.3]", "ema.stds: [0.3] not in (0, 0.28)"),
        ("ema.stds=[0.05]", "ema.snapshot_every_images: must be positive with ema.stds set"),
        ("parallel.zero_stage=4", "parallel.zero_stage: must be 1, 2 or 3"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last: must be positive"),
        ("data.shard_buffer_mb=0", "data.shard_buffer_mb: must be at least 1"),
        ("diffusion.beta_end=2", "diffusion.beta_start/beta_end"),
        ("model.time_conditioning=film", "model.time_conditioning: 'film' is not one of scale_shift, add"),
        ("train.label_dropout=1", "train.label_dropout: must be in [0, 1)"),
    ],
)
def test_each_section_validates_itself_naming_the_full_key(override, match):
    with pytest.raises(ConfigError, match=re.escape(match)) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)
    dotted, value = override.split("=")
    section, key = dotted.split(".")
    alone = getattr(Config(), section)  # the same check, by the section alone
    alone.validate()
    setattr(alone, key, yaml.safe_load(value))
    with pytest.raises(ConfigError, match=re.escape(match)):
        alone.validate()


def test_checks_across_sections_name_both_keys():
    with pytest.raises(ConfigError, match=r"checkpoint.keep_best needs eval.every_images > 0"):
        load_config(None, ["checkpoint.keep_best=true"])
    with pytest.raises(ConfigError, match=r"eval.every_images: .* not super-resolution \(train.sr_factor\)"):
        load_config(None, ["train.sr_factor=2", "model.cond_channels=3", "eval.every_images=64"])
    EvalConfig(every_images=64).validate()  # neither section alone knows the other
    EMAConfig(stds=[0.05], snapshot_every_images=8).validate()


def test_renamed_keys_load_under_their_new_names_with_one_line_each(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    text = "train:\n  lr: 0.5\n  eval_every_images: 128\n  ema_halflife_images: 300\n"
    cfg = load_config(write(tmp_path, text), ["train.eval_num_images=32", "train.ema_warmup_ratio=0.2"])
    assert (cfg.train.lr, cfg.eval.every_images, cfg.eval.num_images) == (0.5, 128, 32)
    assert (cfg.ema.halflife_images, cfg.ema.warmup_ratio) == (300.0, 0.2)
    assert capsys.readouterr().err.splitlines() == [
        "config: train.ema_halflife_images is now ema.halflife_images",  # the file's, in RENAMED's order
        "config: train.eval_every_images is now eval.every_images",
        "config: train.eval_num_images is now eval.num_images",  # then each override's
        "config: train.ema_warmup_ratio is now ema.warmup_ratio",
    ]
    load_config(None, ["eval.every_images=8", "ema.halflife_images=10"])  # today's names: nothing said
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")  # one line per job, not per rank
    assert load_config(None, ["train.eval_every_images=8"]).eval.every_images == 8
    assert capsys.readouterr().err == ""


def test_an_old_and_a_new_key_for_the_same_setting_are_refused(tmp_path):
    path = write(tmp_path, "train:\n  eval_every_images: 1\neval:\n  every_images: 2\n")
    with pytest.raises(ConfigError, match="train.eval_every_images and eval.every_images are both set"):
        load_config(path)


def test_renamed_keys_map_old_names_that_are_gone_to_names_that_exist():
    cfg = Config()
    for old, new in RENAMED.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        assert not hasattr(getattr(cfg, old_section), old_key) and hasattr(getattr(cfg, new_section), new_key)
