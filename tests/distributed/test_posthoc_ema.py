"""Post-hoc EMA (EDM2): the math, reconstruction against a profile tracked in full, sharded snapshots (FSDP2, ZeRO-3)
against one process, the CLI at world sizes 1 and 4, exact resume of the profiles through the training loop."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpm_dist.config import ConfigError, load_config
from ddpm_dist.posthoc.phema import exp_to_std, fit_error, power_beta, profile_inner, solve_coefficients, std_to_exp
from tests.support.phema_workers import GLOBAL_BATCH, profiles_run, snapshot_weights
from tests.support.train_helpers import (
    assert_bitwise_equal,
    checkpoint_tensors,
    final_checkpoint,
    run_module,
    run_train,
)

STDS, TRUTH_STD, STEPS = [0.05, 0.10], 0.08, 16  # the target std is none of the snapshotted profiles
SHARDED_STEPS, SHARDED_EVERY = 8, 2  # a profile at t does not depend on later steps: compared with the 16-step run's


# -- the math ------------------------------------------------------------------------------------------------------
def test_std_and_exponent_are_inverse():
    stds = np.array([0.01, 0.05, 0.10, 0.20, 0.27])
    assert np.allclose(exp_to_std(std_to_exp(stds)), stds, rtol=1e-12)
    assert abs(float(std_to_exp(0.10)) - 6.9372) < 1e-4  # EDM2's sigma_rel = 0.10


def test_inner_product_is_the_integral():
    tau = np.linspace(0, 3.0, 2_000_001)
    for (ta, sa), (tb, sb) in [((1.0, 0.05), (3.0, 0.10)), ((2.5, 0.2), (1.5, 0.03)), ((2.0, 0.1), (2.0, 0.1))]:
        ga, gb = float(std_to_exp(sa)), float(std_to_exp(sb))
        pa = np.where(tau <= ta, (ga + 1) * tau**ga / ta ** (ga + 1), 0)
        pb = np.where(tau <= tb, (gb + 1) * tau**gb / tb ** (gb + 1), 0)
        assert np.isclose(np.trapezoid(pa * pb, tau), profile_inner(ta, ga, tb, gb), rtol=1e-4)  # a jump at min(ta, tb)


def test_step_by_step_beta_gives_the_profile_mass_of_each_step():
    """With beta = (1 - batch/t)^(gamma+1) the average weighs each step by the profile's mass over it, whatever the
    batches (here changed mid-run, as a resume may)."""
    gamma, batches = float(std_to_exp(0.07)), [8] * 5 + [32] * 4 + [16] * 3
    ends = np.cumsum(batches).astype(np.float64)
    weights = np.zeros(len(batches))
    for k, (t, b) in enumerate(zip(ends, batches)):
        beta = power_beta(gamma, t, b)
        weights *= beta
        weights[k] = 1 - beta
    starts = ends - np.array(batches)
    assert np.allclose(weights, (ends ** (gamma + 1) - starts ** (gamma + 1)) / ends[-1] ** (gamma + 1), rtol=1e-12)


def test_coefficients_are_exact_for_a_snapshotted_profile():
    times = np.repeat(np.arange(1, 11) * 1000.0, 2)
    stds = np.tile(STDS, 10)
    x = solve_coefficients(times, stds, [10_000.0, 6_000.0, 10_000.0], [0.10, 0.05, TRUTH_STD])
    assert np.allclose(x[:, 0], np.eye(20)[19], atol=1e-9) and np.allclose(x[:, 1], np.eye(20)[10], atol=1e-9)
    assert fit_error(times, stds, 10_000.0, 0.10, x[:, 0]) < 1e-6
    errors = []
    for n in (2, 4, 8):  # snapshot times every 10000/n images
        t, s = np.repeat(np.arange(1, n + 1) * 10_000.0 / n, 2), np.tile(STDS, n)
        errors.append(fit_error(t, s, 10_000.0, TRUTH_STD, solve_coefficients(t, s, 10_000.0, TRUTH_STD)))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02, errors  # 4.9%, 3.1%, 1.1%


def test_config():
    cfg = load_config(None, ["ema.stds=[0.05,0.1]", "ema.snapshot_every_images=64"])
    assert cfg.ema.stds == [0.05, 0.1] and cfg.ema.halflife_images > 0  # the half-life EMA stays as it is
    for bad in (["ema.stds=[0.3]", "ema.snapshot_every_images=64"], ["ema.stds=[0.05]"], ["ema.stds=[0,0.1]"]):
        with pytest.raises(ConfigError, match="ema.s") as e:
            load_config(None, bad)
        assert "\n" not in str(e.value)


# -- reconstruction against the truth ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process, snapshots at every step; truth.safetensors holds the power EMA at TRUTH_STD tracked in full."""
    run = str(tmp_path_factory.mktemp("single"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one thread is the fastest here
    try:
        profiles_run(0, 1, run, "single", STDS, [TRUTH_STD], STEPS, 1)
    finally:
        torch.set_num_threads(threads)
    return run


def _norm(d: dict) -> float:
    return float(sum((v.double() ** 2).sum() for v in d.values()) ** 0.5)


def test_reconstruction_matches_the_tracked_profile_and_improves_with_denser_snapshots(single_run):
    from ddpm_dist.posthoc.reconstruct import accumulate, make_plan, param_shapes
    from ddpm_dist.posthoc.snapshots import committed_snapshots

    truth = load_file(os.path.join(single_run, "truth.safetensors"))
    snapshots = committed_snapshots(os.path.join(single_run, "ema_snapshots"))
    assert len(snapshots) == 2 * STEPS
    plan = make_plan(single_run, [TRUTH_STD])
    names = list(param_shapes(plan.model_config))
    want = {k: truth[f"{TRUTH_STD:.4f}.{k}"] for k in names}
    spread = _norm({k: truth[f"raw.{k}"] - want[k] for k in names})  # how far the raw weights are from the average
    errors = {}
    for every in (4, 2, 1):
        used = [s for s in snapshots if (s.images // GLOBAL_BATCH) % every == 0]
        got = accumulate(make_plan(single_run, [TRUTH_STD], snapshots=used), names)[0]
        errors[every] = _norm({k: got[k].float() - want[k] for k in names}) / spread
    print("relative reconstruction error (snapshot every 4, 2, 1 steps):", errors)
    assert errors[1] < 1e-3 and errors[2] < errors[4] / 3 and errors[1] < errors[2] / 3, errors
    # A requested profile that was snapshotted comes back as that snapshot.
    exact = accumulate(make_plan(single_run, [STDS[0]]), names)[0]
    last = snapshot_weights(snapshots[-2].path)
    assert snapshots[-2].std == STDS[0] and all(torch.allclose(exact[k].float(), last[k], atol=1e-6) for k in names)


# -- sharded snapshots and reconstruction at other world sizes -----------------------------------------------------
def _sharded(tmp_path, backend, **kwargs):
    from tests.support.dist_workers import spawn

    run = tmp_path / backend
    run.mkdir()
    spawn(profiles_run, 2, str(run), backend, STDS, [TRUTH_STD], SHARDED_STEPS, SHARDED_EVERY, *kwargs.values())
    return run


@pytest.mark.distributed
def test_sharded_snapshots_match_one_process_and_reconstruct_at_any_world_size(tmp_path, single_run):
    from ddpm_dist.artifacts import load_export, load_trained
    from ddpm_dist.posthoc.snapshots import committed_snapshots

    ref = {os.path.basename(s.path): s for s in committed_snapshots(os.path.join(single_run, "ema_snapshots"))}
    runs = {"fsdp": _sharded(tmp_path, "fsdp"), "zero3": _sharded(tmp_path, "zero", zero_stage=3)}
    for name, run in runs.items():
        found = committed_snapshots(str(run / "ema_snapshots"))
        assert len(found) == 2 * SHARDED_STEPS // SHARDED_EVERY
        index = json.load(open(run / "ema_snapshots" / "index.json"))
        assert [(r["images"], r["std"], r["path"]) for r in index["snapshots"]] == [
            (s.images, s.std, os.path.basename(s.path)) for s in found
        ]
        worst = 0.0
        for s in found:
            a, b = snapshot_weights(s.path), snapshot_weights(ref[os.path.basename(s.path)].path)
            worst = max(worst, max((a[k] - b[k]).abs().max().item() for k in a))
        assert worst <= 1e-4, (name, worst)
        sizes = [json.load(open(run / f"bytes-{r}.json")) for r in range(2)]
        full = len(STDS) * sizes[0]["numel"] * 4
        assert max(s["power_ema"] for s in sizes) * 2 / full <= 1.05, (name, sizes, full)

    exports = {}
    for world in (1, 4):
        out = tmp_path / f"exports-{world}"
        std = f"0.03,{TRUTH_STD}"
        r = run_module(
            "ddpm_dist.ema", "reconstruct", "--run", runs["fsdp"], "--std", std, "--world-size", world, "--out", out
        )
        assert r.returncode == 0, r.stderr[-3000:]
        exports[world] = sorted(out.iterdir())
        assert [p.name for p in exports[world]] == [
            f"phema-{SHARDED_STEPS * GLOBAL_BATCH:012d}-{s:.4f}.safetensors" for s in (0.03, TRUTH_STD)
        ]
    for a, b in zip(exports[1], exports[4]):
        wa, wb = load_export(str(a))[0], load_export(str(b))[0]
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    weights, _, info = load_export(str(exports[1][1]))
    assert info["posthoc_ema"]["std"] == TRUTH_STD and info["images"] == SHARDED_STEPS * GLOBAL_BATCH
    truth = load_file(runs["fsdp"] / "truth.safetensors")  # every 2 steps: within the coarse reconstruction's error
    spread = _norm({k: truth[f"raw.{k}"] - truth[f"{TRUTH_STD:.4f}.{k}"] for k in weights})
    assert _norm({k: weights[k] - truth[f"{TRUTH_STD:.4f}.{k}"] for k in weights}) / spread < 0.1
    assert load_trained(str(exports[1][1])).model is not None  # sample --export reads it


# -- exact resume through the training loop ------------------------------------------------------------------------
def test_exact_resume_keeps_profiles_and_snapshots(tmp_path):
    """4 steps straight = 2 steps, stop, 2 more (16 images a step, snapshots every 2 steps), bitwise: the profiles in
    the checkpoint and every snapshot; a stale snapshot newer than the resumed checkpoint (a crash after writing it)
    and a half-written one are replaced by the replay."""
    from ddpm_dist.posthoc.snapshots import committed_snapshots

    opts = [
        "ema.stds=[0.05,0.1]",
        "ema.snapshot_every_images=32",
        "checkpoint.every_images=32",
        "checkpoint.keep_last=4",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, 4, *opts)
    run_train(resumed, 4, *opts)  # then pretend it died after the snapshot at 64 images, before its checkpoint
    shutil.rmtree(final_checkpoint(resumed))
    snaps = resumed / "ema_snapshots"
    stale = snaps / "000000000064-0.0500"
    shutil.rmtree(stale)
    shutil.copytree(snaps / "000000000032-0.0500", stale)  # other weights under the name the replay writes
    meta = json.load(open(stale / "snapshot.json"))
    json.dump({**meta, "images": 64}, open(stale / "snapshot.json", "w"))
    (snaps / ".tmp-000000000064-0.1000").mkdir()
    second = run_train(resumed, 4, *opts)
    assert f"resumed from {resumed}/checkpoints/step_{2:09d}" in second.stderr
    assert "removed 2 EMA snapshot(s)" in second.stderr
    a, b = checkpoint_tensors(final_checkpoint(straight)), checkpoint_tensors(final_checkpoint(resumed))
    assert any(k.startswith("power_ema.std0p1000.") for k in a)
    assert_bitwise_equal(a, b)
    sa, sb = committed_snapshots(str(straight / "ema_snapshots")), committed_snapshots(str(snaps))
    assert [(s.images, s.std) for s in sa] == [(s.images, s.std) for s in sb] and len(sa) == 4
    for x, y in zip(sa, sb):
        assert_bitwise_equal(snapshot_weights(x.path), snapshot_weights(y.path))
    assert sorted(os.listdir(snaps)) == sorted(os.listdir(straight / "ema_snapshots"))
