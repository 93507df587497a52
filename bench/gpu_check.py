"""Every CUDA check of issue 28 in one command, on one GPU within 10 minutes: a JSON and a markdown table.

    .venv/bin/python bench/gpu_check.py [--out runs/gpu_check] [--reduced | --full] [--only a,b] [--limit NAME=S]

(a) smoke: configs/smoke.yaml end to end (train -> checkpoint -> sample -> evaluate) with bf16 autocast and
    torch.compile; (b) fsdp, zero: FSDP2 and DeepSpeed ZeRO-2 in one process on a world-size-1 NCCL process group,
    a few steps of the train command; (c) train_throughput: ddpm-cifar10 training images/s at batch 128, eager vs
    compiled, fp32 vs bf16; (d) sampling: DDIM-50 images/s; (e) mfu: bench/flops.py's FLOP count over (c) and (d).

Each check runs in its own process (its own session) under its own time limit; a failure or a timeout is recorded
with its one-line error and the next check runs; the exit code is 1 if any check failed. The limits of the full
form add up to 600 s. On a machine without a GPU (the device ddpm_dist.parallel.env picks), or with --reduced, the
same checks run reduced: small presets and batches, gloo, a few steps, no compile, DeepSpeed only if importable;
that is what tests/system/test_gpu_check.py runs. Output: OUT/gpu_check.json, OUT/gpu_check.md; the runs and each
check's logs under OUT/work.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

ORDER = ("smoke", "fsdp", "zero", "train_throughput", "sampling", "mfu")
LIMITS = {  # seconds; the full form's add up to 600
    "full": {"smoke": 150, "fsdp": 45, "zero": 75, "train_throughput": 240, "sampling": 40, "mfu": 50},
    "reduced": {"smoke": 180, "fsdp": 120, "zero": 120, "train_throughput": 120, "sampling": 60, "mfu": 60},
}
ANCHORS = {
    "ddpm": "DDPM (Ho et al. 2020): 21 steps/s at batch 128 = 2,688 img/s on a TPU v3-8",
    "edm": "EDM (Karras et al. 2022): ~145 img/s per V100",
}
ANCHOR_OF = {  # figure -> anchor shown beside it
    "fp32_eager_steps_per_s": "ddpm",
    "bf16_compiled_steps_per_s": "ddpm",
    "fp32_eager_images_per_s": "edm",
    "bf16_compiled_images_per_s": "edm",
}
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def one_line(text: str) -> str:
    lines = [seg.strip() for line in text.splitlines() for seg in line.split("\r") if seg.strip()]
    return lines[-1][:300] if lines else "(no output)"


def child(name: str, mode: str, work: str) -> int:
    """Run one check here and write work/<name>.json: its figures, or its one-line error."""
    from gpu_check_checks import CHECKS

    path = os.path.join(work, f"{name}.json")
    try:
        if os.environ.get("GPU_CHECK_INJECT_FAILURE") == name:
            raise RuntimeError("injected failure (--inject-failure), to test the report")
        result = CHECKS[name](mode, work)
    except Exception as e:  # noqa: BLE001 - every failure is recorded, in one line
        traceback.print_exc()
        result, rc = {"error": type(e).__name__ + (f": {one_line(str(e))}" if str(e).strip() else "")}, 1
    else:
        rc = 0
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return rc


def run_check(name: str, mode: str, work: str, limit: float, inject: str = "") -> dict:
    """One check in a child process (a new session: on timeout its whole process group is killed)."""
    path, log = os.path.join(work, f"{name}.json"), os.path.join(work, f"{name}.log")
    partial = os.path.join(work, f"{name}.partial.json")
    for stale in (path, partial):
        if os.path.exists(stale):
            os.remove(stale)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["GPU_CHECK_INJECT_FAILURE"] = inject
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--mode", mode, "--work", work]
    t0 = time.perf_counter()
    error = None
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = None
            error = f"timed out after its limit of {limit:g} s (log: {log})"
        try:  # the check's session: whatever it started and left behind goes too, so the next check has the device
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rc = p.wait() if rc is None else rc
    seconds = time.perf_counter() - t0
    result = json.load(open(path)) if os.path.exists(path) and error is None else {}
    if error is None and rc and not result.get("error"):
        error = f"exit code {rc}: {one_line(open(log, errors='replace').read())}"
    error = error or result.get("error")
    status = "failed" if error else ("skipped" if result.get("skipped") else "ok")
    out = {"status": status, "seconds": round(seconds, 2), "limit_s": limit, "log": log}
    if error:
        out["error"] = error
    if result.get("skipped"):
        out["reason"] = result["skipped"]
    for key in ("figures", "settings"):
        if key in result:
            out[key] = result[key]
    if "figures" not in out and os.path.exists(partial):  # measured before the failure or the timeout
        out["figures"] = json.load(open(partial))
    with open(path, "w") as f:  # the record, which a later check (mfu) reads
        json.dump(out, f, indent=1)
    return out


def environment(mode: str) -> dict:
    """The device ddpm_dist.parallel.env picks and the versions, read for the report only."""
    import torch

    from ddpm_dist.parallel.env import read_env

    env = read_env()
    info = {
        "mode": mode,
        "device": str(env.device),
        "backend": env.backend,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # noqa: BLE001
        info["nccl"] = f"unavailable ({type(e).__name__})"
    try:
        info["deepspeed"] = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        info["deepspeed"] = "not installed"
    if env.device.type == "cuda":
        props = torch.cuda.get_device_properties(env.device)
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["gpus"] = torch.cuda.device_count()
    else:
        info["device_name"] = f"CPU ({platform.processor() or platform.machine()}), no GPU"
    return info


def fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isfinite(value) and abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.4g}"


def markdown(report: dict) -> str:
    e = report["environment"]
    lines = [
        f"# GPU check ({e['mode']} form), {e['date']}",
        "",
        f"- device: {e['device_name']}"
        + (f", {e['device_memory_gib']} GiB, sm {e['compute_capability']}" if "device_memory_gib" in e else ""),
        f"- torch {e['torch']}, CUDA {e['cuda']}, cuDNN {e['cudnn']}, NCCL {e['nccl']}, DeepSpeed {e['deepspeed']}, "
        f"Python {e['python']}; process groups: {e['backend']}",
        f"- {report['seconds']:.0f} s in all; {report['failed']} check(s) failed",
        "",
        "| check | figure | value | published anchor |",
        "| --- | --- | ---: | --- |",
    ]
    for name, c in report["checks"].items():
        head = f"| {name} ({c['status']}, {c['seconds']:.0f} s of {c['limit_s']:g})"
        if c["status"] != "ok":
            what = ("error", c["error"]) if c["status"] == "failed" else ("", c["reason"])
            lines.append(f"{head} | {what[0]} | {what[1].replace('|', '/')} | |")
            head = "| "
        for key, value in c.get("figures", {}).items():
            anchor = ANCHORS[ANCHOR_OF[key]] if key in ANCHOR_OF else ""
            lines.append(f"{head} | {key} | {fmt(value)} | {anchor} |")
            head = "| "
    lines += ["", "Anchors: " + "; ".join(ANCHORS.values()) + ". Settings of each check: gpu_check.json."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    form = p.add_mutually_exclusive_group()
    form.add_argument("--reduced", action="store_true", help="the CPU form (the default without a GPU)")
    form.add_argument("--full", action="store_true", help="the GPU form even without a GPU (hours on a CPU)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"))
    p.add_argument("--only", default="", help=f"comma list of checks (default all: {','.join(ORDER)})")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=S", help="a check's time limit (seconds)")
    p.add_argument("--inject-failure", default="", metavar="NAME", help="make this check raise (tests the report)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.mode, args.work)
    names = [n for n in args.only.split(",") if n] or list(ORDER)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        p.error(f"unknown check(s) {', '.join(unknown)} (known: {', '.join(ORDER)})")
    from ddpm_dist.parallel.env import read_env

    mode = (
        "reduced"
        if args.reduced
        else "full"
        if args.full
        else ("full" if read_env().device.type == "cuda" else "reduced")
    )
    limits = dict(LIMITS[mode])
    for item in args.limit:
        name, _, sec = item.partition("=")
        if name not in limits:
            p.error(f"--limit {item}: unknown check '{name}'")
        limits[name] = float(sec)
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    t0 = time.perf_counter()
    report = {"environment": environment(mode), "anchors": ANCHORS, "order": names, "checks": {}}
    print(f"gpu_check ({mode}): {report['environment']['device_name']}, {', '.join(names)} -> {out}", flush=True)
    for name in names:
        c = report["checks"][name] = run_check(name, mode, work, limits[name], args.inject_failure)
        print(
            f"  {name:17s} {c['status']:7s} {c['seconds']:6.1f} s  {c.get('error') or c.get('reason') or ''}",
            flush=True,
        )
        report["seconds"] = time.perf_counter() - t0
        report["failed"] = sum(c["status"] == "failed" for c in report["checks"].values())
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(out, "gpu_check.md"), "w") as f:
            f.write(markdown(report))
    print(f"{report['seconds']:.0f} s; {report['failed']} failed; {out}/gpu_check.md", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
