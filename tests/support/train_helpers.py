"""Run the project's commands and training as users do (subprocesses, torchrun) and read checkpoints back for
bitwise comparisons."""

import json
import os
import subprocess
import sys

import torch

from tests.support.common import ROOT

PYTHON = sys.executable
FAST = [
    "model.preset=digits",
    "model.base_channels=16",
    "model.norm_groups=8",
    "train.global_batch=16",
    "train.lr=0.001",
    "train.lr_schedule=constant",
    "train.warmup_images=64",
    "train.log_every=5",
    "train.sample_every_images=0",
    "sample.steps=4",
    "data.audit=true",
    "diffusion.num_steps=200",
]


def child_env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    }
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)
    return env


def run_command(cmd, *, timeout=300, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """`cmd` run to its end in `cwd` (the repository root), output captured as text, in child_env() unless `env`."""
    env = child_env() if env is None else env
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_module(module, *args, timeout=300, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """`python -m module args` (each argument as a string) by run_command."""
    return run_command([PYTHON, "-m", module, *map(str, args)], timeout=timeout, env=env, cwd=cwd)


def start_command(cmd, **popen) -> subprocess.Popen:
    """`cmd` started in the repository root in child_env(); `popen` says where its output goes."""
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(), **popen)


def digits_args(run_dir, *extra) -> list[str]:
    """ddpm_dist.train's arguments for the digits config as it stands (full size), then `extra`."""
    return ["--config", "configs/digits.yaml", f"run_dir={run_dir}", *extra]


def train_args(run_dir, steps, *extra) -> list[str]:
    """ddpm_dist.train's arguments: the digits config made fast, `steps` steps of 16 images, then `extra`."""
    return digits_args(run_dir, *FAST, f"train.total_images={16 * steps}", *extra)


def train_cmd(run_dir, steps, *extra, nproc=1, launcher="python"):
    args = train_args(run_dir, steps, *extra)
    if nproc == 1 and launcher == "python":
        return [PYTHON, "-m", "ddpm_dist.train", *args]
    module = "launchers.torchrun" if launcher == "launcher" else "torch.distributed.run"
    return [PYTHON, "-m", module, "--standalone", f"--nproc-per-node={nproc}", "-m", "ddpm_dist.train", *args]


def train_without(package: str, run_dir, steps, *extra) -> subprocess.CompletedProcess:
    """ddpm_dist.train as run_train starts it, in a Python where `package` cannot be imported (as if not installed)."""
    hide = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] == {package!r}: raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from ddpm_dist.command_line import run_cli\n"
        "from ddpm_dist.train import main\n"
        "run_cli(main)\n"
    )
    return run_command([PYTHON, "-c", hide, *train_args(run_dir, steps, *extra)])


# A metrics sink's test run: logs, a sample grid, a checkpoint and an evaluation every few steps (batch 16).
SINK_CADENCE = [
    "train.log_every=2",
    "train.sample_every_images=64",
    "checkpoint.every_images=64",
    "eval.every_images=64",
    "eval.num_images=32",
    "eval.batch_size=32",
]


def assert_missing_sink_is_one_line(package: str, run_dir) -> None:
    """`metrics.<package>=true` in a Python without `package`: one line, exit 2, before any work (no run_dir)."""
    r = train_without(package, run_dir, 2, f"metrics.{package}=true")
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert errors == [f"error: metrics.{package}=true needs the {package} package: pip install {package}"], errors
    assert not os.path.exists(run_dir)


def run_train(run_dir, steps, *extra, nproc=1, launcher="python", timeout=600, check=True):
    r = run_command(train_cmd(run_dir, steps, *extra, nproc=nproc, launcher=launcher), timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def snapshot_tensors(run_dir) -> dict:
    """Every committed post-hoc EMA snapshot of a run (RUN/ema_snapshots/<images>-<std>/), as checkpoint_tensors."""
    root = os.path.join(run_dir, "ema_snapshots")
    names = sorted(n for n in os.listdir(root) if not n.startswith(".") and os.path.isdir(os.path.join(root, n)))
    return {f"{n}/{k}": v for n in names for k, v in checkpoint_tensors(os.path.join(root, n)).items()}


def checkpoint_tensors(ckpt_dir) -> dict:
    """Every tensor of a DCP checkpoint (model, optimizer, EMA), flattened to 'a.b.c' keys, on CPU."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(ckpt_dir, "..", f"{os.path.basename(ckpt_dir)}.pt")
    dcp_to_torch_save(ckpt_dir, out)
    state = torch.load(out, weights_only=True)
    os.unlink(out)
    flat = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)
        elif torch.is_tensor(v):
            flat[prefix] = v
        else:
            flat[prefix] = torch.tensor(float(v)) if isinstance(v, (int, float)) else v

    walk("", state)
    return flat


def final_checkpoint(run_dir) -> str:
    ck = os.path.join(run_dir, "checkpoints")
    return os.path.join(ck, sorted(d for d in os.listdir(ck) if d.startswith("step_"))[-1])


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def assert_runs_equal(a, b, ranks=(0,), snapshots=False) -> dict:
    """Run `b` ended as run `a` did: the last checkpoints bitwise equal, the post-hoc EMA snapshots too when
    `snapshots`, and each rank's data audit the same; returns b's last checkpoint, as checkpoint_tensors."""
    last = checkpoint_tensors(final_checkpoint(b))
    assert_bitwise_equal(checkpoint_tensors(final_checkpoint(a)), last)
    if snapshots:
        assert_bitwise_equal(snapshot_tensors(a), snapshot_tensors(b))
    for rank in ranks:
        assert audit(a, rank) == audit(b, rank)
    return last


def audit(run_dir, rank=0) -> dict:
    """step -> sample indices, the last record of each step winning (steps redone after a crash repeat)."""
    out = {}
    with open(os.path.join(run_dir, "data_audit", f"rank{rank}.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row["index"]
    return out
