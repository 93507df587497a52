"""checkpoint.keep_best: beside the last k, the committed checkpoint with the lowest in-training Fréchet distance
stays, through pruning and a resume, and `sample --checkpoint best` uses it."""

import json
import os

import numpy as np
import pytest
import torch

from ddpm_dist.artifacts import committed_checkpoints, read_meta
from ddpm_dist.training.checkpoint import CheckpointManager
from tests.support.train_helpers import digits_args, run_module, run_train


class Weights:
    def __init__(self):
        self.w = torch.zeros(3)

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w.copy_(state["w"])


def kept_steps(directory) -> list[int]:
    return [read_meta(p)["step"] for p in committed_checkpoints(directory)]


def test_pruning_keeps_the_best_and_the_last(tmp_path):
    directory = str(tmp_path / "ck")
    manager = CheckpointManager(directory, {"weights": Weights()}, rank=0, keep_last=1, keep_best=True)
    expected = []
    for step, fd in [(1, 5.0), (2, 3.0), (3, 4.0), (4, None), (5, 6.0)]:
        manager.save(step, step * 8, evaluation=None if fd is None else {"frechet_distance": fd, "images": step * 8})
        expected.append(kept_steps(directory))
    assert expected == [[1], [2], [2, 3], [2, 4], [2, 5]]
    resumed = CheckpointManager(directory, {"weights": Weights()}, rank=0, keep_last=1, keep_best=True)
    resumed.save(6, 48, evaluation={"frechet_distance": 3.0, "images": 48})  # a tie: the older one stays best
    assert kept_steps(directory) == [2, 6]
    resumed.save(7, 56, evaluation={"frechet_distance": 2.0, "images": 56})
    resumed.save(8, 64)
    assert kept_steps(directory) == [7, 8]
    plain = CheckpointManager(directory, {"weights": Weights()}, rank=0, keep_last=1)
    plain.save(9, 72)
    assert kept_steps(directory) == [9]  # without keep_best the best is pruned like any other


def eval_rows(run) -> list[dict]:
    with open(run / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["event"] == "eval"]


EVAL = [
    "eval.every_images=32",
    "eval.num_images=32",
    "eval.batch_size=32",
    "checkpoint.keep_last=1",
    "checkpoint.keep_best=true",
    "eval.reference=validation",
]


def test_training_keeps_the_best_evaluated_checkpoint_through_a_resume(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    # the second run resumes the first with a learning rate that spoils the model: its evaluations are worse,
    # so the best stays the first run's last checkpoint while the ones after it are pruned
    for steps, lr in ((8, 0.003), (14, 0.05)):
        run_train(run, steps, *EVAL, f"train.lr={lr}")
        rows = eval_rows(run)
        assert len(rows) == steps // 2, "an evaluation every 2 steps"
        best = min(rows, key=lambda r: r["frechet_distance"])
        found = committed_checkpoints(str(ck))
        metas = [read_meta(p) for p in found]
        assert [m["images"] for m in metas] == sorted({best["images"], 16 * steps}), (
            f"kept {[m['images'] for m in metas]}, best Fréchet distance {best['frechet_distance']:.3f} at "
            f"{best['images']} images, last at {16 * steps}"
        )
        kept_best = next(m for m in metas if m["images"] == best["images"])
        assert kept_best["eval"]["frechet_distance"] == pytest.approx(best["frechet_distance"], rel=1e-12)
    assert best["images"] == 16 * 8, f"the spoiled steps were evaluated better: {[r['frechet_distance'] for r in rows]}"
    with np.load(run / "ref_stats_digits-classifier_validation.npz", allow_pickle=False) as z:
        assert int(z["n"]) == 179  # the reference is the held-out split (eval.reference=validation)

    out = tmp_path / "best"
    args = ["--run", run, "--checkpoint", "best", "--out", out, *"--num-images 4 --steps 2 --extras no".split()]
    r = run_module("ddpm_dist.sample", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "sampling.json") as f:
        source = json.load(f)["source"]
    assert f"step {kept_best['step']} " in source, source


def test_best_without_evaluations_is_one_line(tmp_path):
    run = tmp_path / "run"
    run_train(run, 2)
    r = run_module(
        "ddpm_dist.sample", "--run", run, "--checkpoint", "best", "--out", tmp_path / "out", "--num-images", 2
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: no checkpoint under"), r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


def test_keep_best_needs_evaluation(tmp_path):
    r = run_module("ddpm_dist.train", *digits_args(tmp_path / "run", "checkpoint.keep_best=true"))
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: checkpoint.keep_best needs eval.every_images > 0 (the Fréchet distance it keeps the best of)"
    )
    assert not os.path.exists(tmp_path / "run")
