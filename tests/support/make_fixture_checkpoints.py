"""Write tests/fixtures/checkpoint_v2: today's checkpoint format, frozen, and what resuming it must give.

    .venv/bin/python -m tests.support.make_fixture_checkpoints [--out DIR] [--work DIR]

For each case (`single`: one process; `fsdp2`: FSDP2 on 2 gloo ranks under torchrun) it trains the tiny digits
model (TINY below, on top of train_helpers.FAST) twice from scratch, as tests/distributed/test_checkpoint_resume.py
does: straight to M steps, and interrupted at N steps (train.total_images=16*N). It checks that the interrupted
run's step-N checkpoint is bitwise the straight run's, then writes to OUT/<case>/ the interrupted run directory as a
resume needs it (config.yaml, metrics.jsonl, data_audit/, checkpoints/step_N with its COMMITTED marker, ema_snapshots/
up to step N; no export, samples or curves) and OUT/<case>/expected.json: what the straight run gave after step N
(the exact loss of each step, the data samples of each step, digests of the step-M checkpoint's tensors and of every
post-hoc EMA snapshot's). tests/system/test_fixture_checkpoint.py resumes a copy of OUT/<case> to M steps and
compares. Run it only when the checkpoint format changes on purpose (see tests/fixtures/checkpoint_v2/README.md)."""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

from tests.support.common import ROOT
from tests.support.train_helpers import (
    assert_bitwise_equal,
    audit,
    checkpoint_tensors,
    final_checkpoint,
    run_train,
    snapshot_tensors,
)

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "checkpoint_v2")
N, M = 4, 8  # steps of 16 images in the fixture's checkpoint; steps the test resumes it to
TINY = [  # small enough that both cases together stay under 5 MB on disk, with every component of a checkpoint
    "model.base_channels=8",
    "model.norm_groups=4",
    "model.channel_mults=[1]",  # one level (71 tensors: DCP's cost per tensor, not the weights, sets the size)
    "model.attn_resolutions=[]",  # the middle block's attention stays
    "train.log_every=1",  # every step's loss in metrics.jsonl
    "ema.stds=[0.05,0.1]",  # post-hoc EMA profiles (power_ema)
    "ema.snapshot_every_images=64",  # one snapshot time in the fixture (step 4), one after it (step 8)
    "checkpoint.every_images=64",  # the straight run also commits step 4, to compare with the interrupted one
]
CASES = {"single": (1, ["parallel.backend=single"]), "fsdp2": (2, ["parallel.backend=fsdp"])}
MADE_BY = "tests/support/make_fixture_checkpoints.py"
KEPT = ("config.yaml", "metrics.jsonl", "data_audit", "ema_snapshots")  # besides checkpoints/step_N


def tensor_digest(value) -> str:
    h = hashlib.sha256()
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()


def digests(flat: dict) -> dict:
    """Digests of checkpoint_tensors()/snapshot_tensors() output, one per group of keys (the first two dotted parts,
    e.g. 'model.down' or 'optimizer.state'), plus the digest of all the key names: compact, and a mismatch names the
    group that differs."""
    groups: dict = {}
    for key in sorted(flat):
        group = ".".join(key.split(".")[:2])
        groups.setdefault(group, hashlib.sha256())
        groups[group].update(key.encode() + tensor_digest(flat[key]).encode())
    out = {g: h.hexdigest() for g, h in groups.items()}
    out["(keys)"] = hashlib.sha256("\n".join(sorted(flat)).encode()).hexdigest()
    return out


EXPECTED_TENSORS = (
    "expected.safetensors"  # the straight run's step-M tensors, for machines whose kernels round otherwise
)


def split_values(flat: dict, prefix: str) -> tuple[dict, dict]:
    """checkpoint_tensors()/snapshot_tensors() output as (tensors under `prefix`, repr of every other value)."""
    tensors = {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in flat.items() if torch.is_tensor(v)}
    return tensors, {k: repr(v) for k, v in flat.items() if not torch.is_tensor(v)}


def write_expected_tensors(final: dict, snapshots: dict, dest: str) -> dict:
    """OUT/<case>/expected.safetensors from the straight run's step-M checkpoint and snapshots (checkpoint_tensors /
    snapshot_tensors output); returns the non-tensor values (for expected.json)."""
    from safetensors.torch import save_file

    final_tensors, final_values = split_values(final, "final/")
    snap_tensors, snap_values = split_values(snapshots, "snapshots/")
    save_file({**final_tensors, **snap_tensors}, os.path.join(dest, EXPECTED_TENSORS))
    return {"final_values": final_values, "snapshot_values": snap_values}


def train_losses(run_dir, after: int) -> dict:
    """step -> loss of every train row of metrics.jsonl past step `after` (JSON floats: exact)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {str(r["step"]): r["loss"] for r in rows if r.get("event") == "train" and r["step"] > after}


def audits(run_dir, nproc: int, after: int) -> dict:
    """rank -> step -> sample indices of the steps from `after` on (audit steps count from 0)."""
    return {str(r): {str(s): v for s, v in audit(run_dir, r).items() if s >= after} for r in range(nproc)}


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def make_case(case: str, work: str, out: str) -> dict:
    nproc, backend = CASES[case]
    opts = [*TINY, *backend]
    straight, interrupted = os.path.join(work, case, "straight"), os.path.join(work, case, "run")
    run_train(straight, M, *opts, nproc=nproc)
    run_train(interrupted, N, *opts, nproc=nproc)
    step_n = f"step_{N:09d}"
    assert_bitwise_equal(  # the fixture is the state the uninterrupted run passed through
        checkpoint_tensors(os.path.join(straight, "checkpoints", step_n)),
        checkpoint_tensors(os.path.join(interrupted, "checkpoints", step_n)),
    )
    dest = os.path.join(out, case)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.join(dest, "checkpoints"))
    shutil.copytree(os.path.join(interrupted, "checkpoints", step_n), os.path.join(dest, "checkpoints", step_n))
    for name in KEPT:
        src = os.path.join(interrupted, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(dest, name))
    final, snapshots = checkpoint_tensors(final_checkpoint(straight)), snapshot_tensors(straight)  # read once
    expected = {
        "made_by": f"ddpm_dist at commit {commit()}, torch {torch.__version__}, by {MADE_BY}",
        "nproc": nproc,
        "train_args": [*TINY, *backend],
        "fixture_step": N,
        "resumed_to_images": 16 * M,
        "losses": train_losses(straight, N),
        "audit": audits(straight, nproc, N),
        "final_checkpoint": digests(final),
        "snapshots": digests(snapshots),
        **write_expected_tensors(final, snapshots, dest),
    }
    with open(os.path.join(dest, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    return expected


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=FIXTURE, help="where <case>/ go (default: the committed fixture)")
    p.add_argument("--work", default=None, help="where the runs are trained (default: a temporary directory)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, of " + ", ".join(CASES))
    args = p.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="checkpoint_v2-")
    for case in args.cases.split(","):
        make_case(case, work, args.out)
        print(f"{case}: {os.path.join(args.out, case)}", file=sys.stderr)
    if not args.work:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
