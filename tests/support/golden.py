"""The golden learning curve (tests/system/test_golden_curves.py): a fixed digits recipe, its loss curve (mean loss
per window of WINDOW steps, as metrics.jsonl logs it) and the Fréchet distance of a fixed-seed sample from its EMA,
compared with tests/golden/digits.json.

Regenerate (a commit of its own, with the old and new figures in the message, which this prints):

    .venv/bin/python -m tests.support.golden            # measures the recipe, writes tests/golden/digits.json
    .venv/bin/python -m tests.support.golden --controls # also re-measures the tolerance's evidence (~5 runs)
"""

import argparse
import json
import os
import subprocess

from tests.support.common import DIGITS, PYTHON, ROOT
from tests.support.train_helpers import child_env

GOLDEN = os.path.join(ROOT, "tests", "golden", "digits.json")
WINDOW = 20
STEPS = 240
RECIPE = [  # configs/digits.yaml (lr, cosine schedule, warm-up, clipping, label dropout, EMA) at a width CI can afford
    "model.base_channels=16",
    "model.norm_groups=8",
    "train.global_batch=32",
    f"train.total_images={32 * STEPS}",
    "train.warmup_images=640",
    f"train.log_every={WINDOW}",
    "train.sample_every_images=0",
    "checkpoint.every_images=0",
]
SAMPLE = ["--num-images", "256", "--batch-size", "128", "--seed", "0", "--sampler", "ddim", "--steps", "20"]
# What the golden test allows (evidence: `measured` and `controls` in the golden file; the test's docstring):
LOSS_MEAN_TOLERANCE = 0.06  # mean over windows of |loss / golden - 1|: the recipe's level
LOSS_MAX_TOLERANCE = 0.20  # the worst window: a blow-up somewhere in the run
FRECHET_TOLERANCE = 0.25  # |frechet / golden - 1|: another CPU moved it 16.4% with the loss curve equal to 1e-7


def train(run_dir, *extra, nproc=1, timeout=900) -> list[float]:
    """The recipe (plus `extra` overrides) trained into run_dir; its windowed loss curve."""
    args = ["--config", "configs/digits.yaml", f"run_dir={run_dir}", *RECIPE, *extra]
    if nproc == 1:
        cmd = [PYTHON, "-m", "ddpm_dist.train", *args]
    else:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
        cmd += ["ddpm_dist.train", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    curve = [r["loss"] for r in rows if r["event"] == "train"]
    assert len(curve) == STEPS // WINDOW, curve
    return curve


def frechet(run_dir, out, *extra, timeout=600) -> float:
    """The project's Fréchet distance (digits classifier features, the training data as reference) of a fixed-seed
    sample from the run's export (its EMA weights)."""
    cmd = [PYTHON, "-m", "ddpm_dist.evaluate", "frechet", "--export", os.path.join(run_dir, "export.safetensors")]
    cmd += ["--data", DIGITS, *SAMPLE, "--no-feature-metrics", "--out", out, *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return float(json.load(open(out))["value"])


def deviation(curve, frechet_distance, golden) -> dict:
    """Relative deviations from the golden figures: mean and worst window of the loss curve, the Fréchet distance."""
    rel = [abs(a / b - 1) for a, b in zip(curve, golden["loss"], strict=True)]
    return {
        "loss_mean": sum(rel) / len(rel),
        "loss_max": max(rel),
        "frechet": abs(frechet_distance / golden["frechet"] - 1),
    }


def within(curve, frechet_distance, golden) -> bool:
    d = deviation(curve, frechet_distance, golden)
    return (
        d["loss_mean"] <= LOSS_MEAN_TOLERANCE
        and d["loss_max"] <= LOSS_MAX_TOLERANCE
        and d["frechet"] <= FRECHET_TOLERANCE
    )


def measure(tmp, name, *extra, nproc=1) -> dict:
    run = os.path.join(tmp, name)
    curve = train(run, *extra, nproc=nproc)
    return {"loss": curve, "frechet": frechet(run, os.path.join(tmp, f"{name}.json"))}


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--controls", action="store_true", help="re-measure the runs behind the tolerance too")
    args = ap.parse_args()
    old = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else None
    with tempfile.TemporaryDirectory() as tmp:
        new = {"recipe": RECIPE, "window": WINDOW, "sample": SAMPLE, **measure(tmp, "golden")}
        if args.controls or old is None:
            new["measured"] = {  # what must stay within the tolerance: the same recipe, run again or sharded
                "rerun": measure(tmp, "rerun"),
                "fsdp 2 processes": measure(tmp, "fsdp", "parallel.backend=fsdp", nproc=2),
            }
            new["controls"] = {"lr x 3": measure(tmp, "lr3", "train.lr=0.003")}  # what must not
            new["information"] = {  # neither: another seed is another run; see the test's docstring for EMA off
                "seed 1": measure(tmp, "seed1", "seed=1"),
                "EMA off": measure(tmp, "noema", "ema.halflife_images=1"),
            }
        else:
            for key in ("measured", "controls", "information"):
                new[key] = old.get(key, {})
    for name, m in {**new["measured"], **new["controls"], **new["information"]}.items():
        d = deviation(m["loss"], m["frechet"], new)
        print(
            f"{name:18s} "
            + "  ".join(f"{k} {v:.4f}" for k, v in d.items())
            + f"  within: {within(m['loss'], m['frechet'], new)}"
        )
    if old:
        print(f"old: frechet {old['frechet']:.3f}, final loss {old['loss'][-1]:.4f}")
    print(f"new: frechet {new['frechet']:.3f}, final loss {new['loss'][-1]:.4f}")
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
        json.dump(new, f, indent=1)
    print(f"wrote {os.path.relpath(GOLDEN, ROOT)}")


if __name__ == "__main__":
    main()
