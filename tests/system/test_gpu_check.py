"""bench/gpu_check.py keeps working without a GPU: its reduced form runs every check and reports each figure as a
number or 'skipped: reason', in the JSON and the markdown table; a failing or timed-out check is recorded in one
line, the next check still runs, and the exit code says so."""

import json
import math
import os
import subprocess

import pytest

from tests.support.common import PYTHON, ROOT

CHECKS = ["smoke", "fsdp", "zero", "train_throughput", "sampling", "mfu"]  # issue 28's (a)-(e)
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


def gpu_check(out, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(
        [PYTHON, SCRIPT, "--out", str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    report = json.load(open(out / "gpu_check.json"))
    return r, report, (out / "gpu_check.md").read_text()


def real_or_skipped(value) -> bool:
    if isinstance(value, str):
        return value.startswith("skipped: ") and len(value) > len("skipped: ")
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    return gpu_check(tmp_path_factory.mktemp("gpu_check"), "--reduced")


def test_reduced_form_runs_every_check(reduced):
    r, report, _ = reduced
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert report["environment"]["mode"] == "reduced" and report["failed"] == 0
    assert list(report["checks"]) == CHECKS
    for name, check in report["checks"].items():
        assert check["status"] in ("ok", "skipped"), (name, check)
        assert check["seconds"] <= check["limit_s"], (name, check)
        if check["status"] == "skipped":
            assert real_or_skipped(check["reason"]), (name, check)
            continue
        assert check["figures"], name
        bad = {k: v for k, v in check["figures"].items() if not real_or_skipped(v)}
        assert not bad, (name, bad)


def test_reduced_figures_are_the_issues(reduced):
    _, report, _ = reduced
    checks = report["checks"]
    smoke = checks["smoke"]["figures"]
    assert smoke["checkpoints_committed"] >= 1 and smoke["samples_written"] > 0 and smoke["frechet_distance"] > 0
    assert checks["smoke"]["settings"]["bf16"] is True
    throughput = checks["train_throughput"]["figures"]
    for key in ("fp32_eager", "fp32_compiled", "bf16_eager", "bf16_compiled"):
        assert f"{key}_images_per_s" in throughput
        assert f"mfu_train_{key}" in checks["mfu"]["figures"]
    assert throughput["fp32_eager_images_per_s"] > 0 and throughput["bf16_eager_images_per_s"] > 0
    assert any(k.startswith("ddim") for k in checks["sampling"]["figures"])
    assert 0 < checks["mfu"]["figures"]["mfu_train_fp32_eager"] < 1
    for name in ("fsdp", "zero"):
        if checks[name]["status"] == "ok":
            assert checks[name]["figures"]["checkpoints_committed"] >= 1
    env = report["environment"]
    assert env["backend"] == "gloo" and {"torch", "cuda", "nccl", "device_name"} <= set(env)


def test_markdown_table(reduced):
    _, report, md = reduced
    e = report["environment"]
    assert e["device_name"] in md and e["torch"] in md and "NCCL" in md
    assert "| check | figure | value | published anchor |" in md
    for name in CHECKS:
        assert f"| {name} (" in md
    assert "21 steps/s at batch 128" in md and "145 img/s per V100" in md
    assert "fp32_eager_images_per_s" in md and "mfu_train_bf16_eager" in md


def test_a_failure_is_recorded_and_the_rest_still_run(tmp_path):
    r, report, md = gpu_check(
        tmp_path, "--reduced", "--only", "smoke,fsdp", "--inject-failure", "smoke", "--limit", "fsdp=0.05", timeout=120
    )
    assert r.returncode == 1, r.stdout + r.stderr
    smoke, fsdp = report["checks"]["smoke"], report["checks"]["fsdp"]
    assert smoke["status"] == fsdp["status"] == "failed" and report["failed"] == 2
    assert smoke["error"] == "RuntimeError: injected failure (--inject-failure), to test the report"
    assert fsdp["error"].startswith("timed out after its limit of 0.05 s")
    assert "\n" not in smoke["error"] + fsdp["error"]
    assert "| smoke (failed" in md and "| fsdp (failed" in md
