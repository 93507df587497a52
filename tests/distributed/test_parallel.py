"""Engines against a single-process reference on the same global batch (2 gloo processes, tiny UNet)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.support.dist_workers import parity_worker, spawn, train_steps

pytestmark = pytest.mark.distributed


def run_parity(tmp_path, backend, world_size, **kwargs):
    out = (
        tmp_path
        / f"{backend}-{world_size}-{kwargs.get('accum', 1)}-{kwargs.get('zero_stage', '')}-{kwargs.get('bf16', False)}"
    )
    out.mkdir()
    spawn(parity_worker, world_size, str(out), backend, kwargs)
    return (
        json.load(open(out / "losses.json")),
        load_file(out / "params.safetensors"),
        load_file(out / "ema.safetensors"),
    )


@pytest.fixture(scope="module")
def reference():
    """One process, global batch 8, fp32."""
    torch.set_num_threads(2)
    losses, params, ema, _, _ = train_steps("single", 1, 0, steps=20, global_batch=8)
    return losses, params, ema


def assert_close(ref, got, loss_rel=1e-5, param_abs=1e-4):
    (l0, p0, e0), (l1, p1, e1) = ref, got
    for a, b in zip(l0, l1):
        assert abs(a - b) <= loss_rel * abs(a), (a, b)
    assert p0.keys() == p1.keys() and e0.keys() == e1.keys()
    worst_p = max((p0[k] - p1[k]).abs().max().item() for k in p0)
    worst_e = max((e0[k] - e1[k]).abs().max().item() for k in e0)
    assert worst_p <= param_abs and worst_e <= param_abs, (worst_p, worst_e)


@pytest.mark.parametrize(
    "backend,kwargs",
    [
        ("ddp", {}),
        ("fsdp", {}),
        ("zero", {"zero_stage": 1}),
        ("zero", {"zero_stage": 2}),
        ("zero", {"zero_stage": 3}),
    ],
)
def test_two_ranks_match_one_process(tmp_path, reference, backend, kwargs):
    assert_close(reference, run_parity(tmp_path, backend, 2, steps=20, **kwargs))


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_gradient_accumulation_2x1_matches_1x2(tmp_path, reference, backend):
    # 2 ranks x 1 micro-step of 4 (no accumulation) vs 1 rank x 2 micro-steps of 4 (no sync on the first).
    two_ranks = run_parity(tmp_path, backend, 2, steps=20)
    one_rank_accum = run_parity(tmp_path, backend, 1, steps=20, accum=2)
    assert_close(reference, one_rank_accum)
    assert_close(two_ranks, one_rank_accum)


def test_zero_accumulation_matches(tmp_path, reference):
    assert_close(reference, run_parity(tmp_path, "zero", 2, steps=20, accum=2, zero_stage=2))


@pytest.mark.parametrize("backend,kwargs", [("fsdp", {}), ("zero", {"zero_stage": 3})])
def test_bf16_stays_within_stated_tolerance(tmp_path, reference, backend, kwargs):
    """bf16 (FSDP2 MixedPrecisionPolicy / DeepSpeed bf16) against fp32 after 20 AdamW steps at lr 1e-3: loss within
    2e-3 relative, and the parameter update within 25% of its size in L2 (measured: 9% FSDP2, 16% ZeRO-3, 9% for
    bf16 autocast in one process; single elements can differ by a whole Adam step, so no elementwise bound)."""
    from ddpm_dist.models import build_model
    from ddpm_dist.parallel.seeding import seed_everything

    seed_everything(0)
    init = build_model("tiny").state_dict()
    l0, p0, _ = reference
    l1, p1, _ = run_parity(tmp_path, backend, 2, steps=20, bf16=True, **kwargs)
    assert max(abs(a - b) / a for a, b in zip(l0, l1)) <= 2e-3
    diff = sum(((p1[k] - p0[k]) ** 2).sum() for k in p0) ** 0.5
    update = sum(((p0[k] - init[k]) ** 2).sum() for k in p0) ** 0.5
    assert diff / update <= 0.25, (diff / update).item()


@pytest.mark.parametrize("backend,stage", [("fsdp", 0), ("zero", 3)])
def test_sharded_bytes_per_rank(tmp_path, backend, stage):
    """Parameters, gradients, optimizer state and EMA per rank at world sizes 1, 2, 4: sharded x world / full <= 1.05"""
    from tests.support.dist_workers import memory_worker

    totals = {}
    for world in (1, 2, 4):
        out = tmp_path / f"w{world}"
        out.mkdir()
        spawn(memory_worker, world, str(out), backend, stage)
        per_rank = [json.load(open(out / f"bytes-{r}.json")) for r in range(world)]
        for part in ("params", "grads", "optimizer", "ema"):
            totals[(world, part)] = max(p[part] for p in per_rank)
    for part in ("params", "grads", "optimizer", "ema"):
        full = totals[(1, part)]
        assert full > 0, part
        for world in (2, 4):
            ratio = totals[(world, part)] * world / full
            assert ratio <= 1.05, (part, world, ratio)
