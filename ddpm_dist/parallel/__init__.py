"""Distribution: process environment, engines (single, DDP, FSDP2, DeepSpeed ZeRO), sharded EMA."""

from __future__ import annotations

import os

import torch.distributed as dist

from .engine import Engine
from .env import DistEnv, free_port, init_distributed, read_env

BACKENDS = ("single", "ddp", "fsdp", "zero")


def resolve_backend(name: str, env: DistEnv) -> str:
    if name == "auto":
        return "ddp" if env.distributed else "single"
    return name


def ensure_process_group(env: DistEnv) -> None:
    """FSDP2 and DeepSpeed need a process group even for one process: a private one-rank gloo group."""
    if dist.is_initialized():
        return
    port = free_port()
    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(port)),
    ):
        os.environ.setdefault(key, value)  # DeepSpeed reads these even for one process
    dist.init_process_group(env.backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def parallelize(module, parallel, env: DistEnv, train, *, micro_batch: int, accum_steps: int) -> Engine:
    """Wrap a single-device module in the engine that `parallel` (the config's parallel section: backend, zero_stage,
    reshard_after_forward, hybrid_shard) names, with the optimizer and precision of `train` (its train section: lr,
    betas, weight_decay, bf16, grad_clip, compile and channels_last as in Engine)."""
    backend = resolve_backend(parallel.backend, env)
    optimizer_args = dict(lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    bf16, fast = train.bf16, {"compile": train.compile, "channels_last": train.channels_last}
    if backend == "single":
        if env.distributed:
            raise ValueError(
                f"parallel.backend=single cannot run with {env.world_size} processes (use ddp, fsdp or zero)"
            )
        return Engine(module, env.device, optimizer_args, bf16, **fast)
    ensure_process_group(env)
    if backend == "ddp":
        from .ddp import DDPEngine

        return DDPEngine(module, env.device, optimizer_args, bf16, **fast)
    if backend == "fsdp":
        from .fsdp import FSDPEngine

        return FSDPEngine(
            module,
            env.device,
            optimizer_args,
            bf16,
            world_size=env.world_size,
            local_world_size=env.local_world_size,
            reshard_after_forward=parallel.reshard_after_forward,
            hybrid=parallel.hybrid_shard,
            **fast,
        )
    if backend == "zero":
        from .zero import ZeroEngine

        return ZeroEngine(
            module,
            env.device,
            optimizer_args,
            bf16,
            stage=parallel.zero_stage,
            micro_batch=micro_batch,
            accum_steps=accum_steps,
            world_size=env.world_size,
            grad_clip=train.grad_clip,
            **fast,
        )
    raise ValueError(f"unknown parallel.backend '{backend}' (expected auto, {', '.join(BACKENDS)})")


__all__ = [
    "BACKENDS",
    "DistEnv",
    "Engine",
    "ensure_process_group",
    "free_port",
    "init_distributed",
    "parallelize",
    "read_env",
    "resolve_backend",
]
