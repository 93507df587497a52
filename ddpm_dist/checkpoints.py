"""python -m ddpm_dist.checkpoints verify RUN: check everything a run directory holds against the digests written with
it: every committed checkpoint, every one moved aside as corrupt at a resume, every EMA snapshot and the export.
One line per item, OK or CORRUPT (naming the file); exit code 0 when all are OK, 2 otherwise. Nothing is changed."""

from __future__ import annotations

import argparse
import os

from .command_line import run_cli
from .redact import redact

UNVERIFIED = "no digests: written before ddpm_dist recorded them, not verified"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_dist.checkpoints", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    verify = sub.add_parser("verify", help="check every checkpoint, EMA snapshot and export of a run directory")
    verify.add_argument("run", help="the run directory (run_dir of the training config)")
    return p


def verify_run(run_dir: str) -> list[tuple[str, str, str]]:
    """(item, 'OK' or 'CORRUPT', detail) for everything under `run_dir` that carries digests, oldest first."""
    from .artifacts import CheckpointError, committed_checkpoints, load_export
    from .artifacts.digests import verify_dir
    from .posthoc.snapshots import SNAPSHOT_DIR, committed_snapshots
    from .training.checkpoint import QUARANTINE

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory '{run_dir}' does not exist")
    rows = []

    def add(path: str, verdict=None, problem=None):
        if verdict is not None:
            problem = verdict.problem
        detail = problem or (UNVERIFIED if verdict is not None and verdict.unverified else "")
        rows.append((os.path.relpath(path, run_dir), "CORRUPT" if problem else "OK", detail))

    ckpts = os.path.join(run_dir, "checkpoints")
    for path in committed_checkpoints(ckpts):
        add(path, verify_dir(path))
    if os.path.isdir(ckpts):
        for name in sorted(n for n in os.listdir(ckpts) if n.startswith(QUARANTINE)):
            verdict = verify_dir(os.path.join(ckpts, name))
            add(verdict.path, problem=f"moved aside at a resume: {verdict.problem or 'its files match now'}")
    try:
        snapshots = [s.path for s in committed_snapshots(os.path.join(run_dir, SNAPSHOT_DIR))]
    except CheckpointError as e:  # an unreadable snapshot.json
        add(os.path.join(run_dir, SNAPSHOT_DIR), problem=str(e))
        snapshots = []
    for path in snapshots:
        add(path, verify_dir(path))
    export = os.path.join(run_dir, "export.safetensors")
    if os.path.exists(export):
        try:
            load_export(export, which=None)
            rows.append(("export.safetensors", "OK", "" if _export_has_digests(export) else UNVERIFIED))
        except (CheckpointError, ValueError) as e:
            add(export, problem=str(e))
    return rows


def _export_has_digests(path: str) -> bool:
    from safetensors import safe_open

    from .artifacts.digests import EXPORT_DIGESTS

    with safe_open(path, framework="pt") as f:
        return EXPORT_DIGESTS in (f.metadata() or {})


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    rows = verify_run(args.run)
    if not rows:
        raise FileNotFoundError(f"no committed checkpoint, EMA snapshot or export under '{args.run}'")
    width = max(len(item) for item, _, _ in rows)
    for item, status, detail in rows:
        print(redact(f"{status:8s}{item:{width}s}  {detail}".rstrip()), flush=True)
    return 0 if all(status == "OK" for _, status, _ in rows) else 2


if __name__ == "__main__":
    run_cli(main)
