"""The loop's components: keep-every-N counted in images across a changed batch size, the LR schedule's
state, and a train() that raises releasing the exporter, the discovery file and the signal handlers."""

import logging
import os
import signal
import socket

import pytest

from tests.support.common import DIGITS, ROOT, free_port
from tests.support.train_helpers import FAST, run_train


def steps_kept(run) -> list[int]:
    return sorted(int(n.split("_")[1]) for n in os.listdir(run / "checkpoints") if n.startswith("step_"))


def test_keep_every_n_is_counted_in_images_when_the_batch_changes(tmp_path):
    """Batch 16 to 256 images, then batch 48 to 640: every 128 images the first checkpoint to reach a new
    multiple stays (128, 256, 400, 544, 640 images), whatever the batch size. Counted in steps from the batch
    of the day (the old rule: every 128 // 48 = 2 steps) it would keep steps 18 and 20 (352 and 448 images)."""
    run = tmp_path / "run"
    keep = ["checkpoint.every_images=64", "checkpoint.keep_last=1", "checkpoint.keep_every_images=128"]
    run_train(run, 16, *keep)
    assert steps_kept(run) == [8, 16]  # 128 and 256 images
    r = run_train(run, 0, *keep, "train.global_batch=48", "train.total_images=640")
    assert "resumed from" in r.stderr and "data layout changed" in r.stderr
    # saves at 352 (step 18), 400 (19), 448 (20), 544 (22), 592 (23), 640 (24) images
    assert steps_kept(run) == [8, 16, 19, 22, 24]


def test_lr_schedule_is_a_component_that_reports_a_changed_schedule(caplog):
    from ddpm_dist.config import load_config
    from ddpm_dist.training.state import LRSchedule, Progress

    old = LRSchedule.from_config(load_config(None, ["train.lr=0.001", "train.warmup_images=100"]).train)
    new = LRSchedule.from_config(load_config(None, ["train.lr=0.0005", "train.warmup_images=100"]).train)
    assert old(0) == pytest.approx(0.001 * 64 / 100) and new(1000) == 0.0005
    with caplog.at_level(logging.INFO):
        new.load_state_dict(old.state_dict())
    assert "lr 0.001 -> 0.0005" in caplog.text and "warmup" not in caplog.text
    p = Progress()
    p.load_state_dict(Progress(7, 448).state_dict())
    assert (p.step, p.images) == (7, 448)


def test_train_that_raises_releases_what_it_started(tmp_path, monkeypatch):
    """In-training evaluation with a missing Inception file raises after the exporter, the discovery file and
    the signal handlers exist: all three are gone when train() has raised."""
    from ddpm_dist.config import load_config
    from ddpm_dist.training.loop import train

    monkeypatch.delenv("DDPM_SIGNAL_DIR", raising=False)
    port, sd = free_port(), tmp_path / "sd"
    previous = signal.getsignal(signal.SIGTERM)
    cfg = load_config(
        os.path.join(ROOT, "configs", "digits.yaml"),
        [
            f"run_dir={tmp_path / 'run'}",
            *FAST,
            "data.audit=false",
            f"data.source={DIGITS}",
            "train.total_images=64",
            "train.log_every=1",
            "eval.every_images=16",
            "eval.extractor=inception",
            f"eval.inception={tmp_path / 'none.pt'}",
            "metrics.prometheus=true",
            f"metrics.prometheus_port={port}",
            f"metrics.sd_dir={sd}",
        ],
    )
    monkeypatch.setenv("DDPM_INCEPTION", str(tmp_path / "none.pt"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Inception weights"):
        train(cfg)
    assert (tmp_path / "run" / "metrics.jsonl").exists()  # it did run steps before raising
    assert signal.getsignal(signal.SIGTERM) is previous
    assert not list(sd.glob("*.json"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the exporter's port is free again
