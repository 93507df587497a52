"""Functions that run inside spawned gloo worker processes (top level, so spawn can pickle them)."""

import dataclasses
import json
import os

import torch

from ddpm_dist.parallel.env import free_port, local_rank_env


def spawn(fn, world_size: int, *args) -> None:
    """fn(rank, world_size, *args) in `world_size` processes joined by a gloo process group."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_entry, args=(fn, world_size, port, args), nprocs=world_size, join=True)


def _entry(rank, fn, world_size, port, args):
    os.environ.update(local_rank_env(rank, world_size, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from ddpm_dist.parallel.env import init_distributed, read_env

    init_distributed(read_env())
    try:
        fn(rank, world_size, *args)
        if torch.distributed.is_initialized():  # no rank tears down while another still works (DeepSpeed once aborted)
            torch.distributed.barrier()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def make_engine(model_cfg, parallel, train, micro_batch=1, accum_steps=1):
    """A UNet(model_cfg) made an engine by ddpm_dist.parallel.parallelize on this process's ranks (read_env())."""
    from ddpm_dist.models import UNet
    from ddpm_dist.parallel import parallelize, read_env

    return parallelize(UNet(model_cfg), parallel, read_env(), train, micro_batch=micro_batch, accum_steps=accum_steps)


def synthetic_batch(global_batch: int, channels=3, size=16, num_classes=0, seed=1234):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(global_batch, channels, size, size, generator=g) * 2 - 1
    y = torch.randint(0, max(num_classes, 1), (global_batch,), generator=g)
    return x, y


def train_steps(
    backend: str,
    world_size: int,
    rank: int,
    *,
    steps=20,
    global_batch=8,
    accum=1,
    bf16=False,
    zero_stage=2,
    model="tiny",
    lr=1e-3,
    ema_beta=0.9,
    hybrid=False,
    compile=False,
    channels_last=False,
    overrides=(),
):
    """Run `steps` optimizer steps on a fixed global batch; returns (losses, full params, full EMA) on every rank."""
    from ddpm_dist.config import ParallelConfig, TrainConfig, load_config
    from ddpm_dist.diffusion import make_schedule
    from ddpm_dist.models import resolve_model_config
    from ddpm_dist.parallel.collectives import all_reduce_mean
    from ddpm_dist.parallel.seeding import seed_everything
    from ddpm_dist.parallel.sharded_ema import ShardedEMA
    from ddpm_dist.training.loop import StepRecipe, run_step

    cfg = load_config(
        None,
        [
            f"model.preset={model}",
            f"train.global_batch={global_batch}",
            "train.grad_clip=1.0",
            "train.label_dropout=0.1",
            "diffusion.num_steps=100",
            *overrides,
        ],
    )
    model_cfg = resolve_model_config(cfg.model)
    seed_everything(0)
    micro = global_batch // (world_size * accum)
    engine = make_engine(
        model_cfg,
        ParallelConfig(backend=backend, zero_stage=zero_stage, hybrid_shard=hybrid),
        TrainConfig(lr=lr, bf16=bf16, grad_clip=1.0, compile=compile, channels_last=channels_last),
        micro,
        accum,
    )
    ema = ShardedEMA(engine)
    schedule = make_schedule("linear", 100)
    x, y = synthetic_batch(global_batch, model_cfg.in_channels, model_cfg.image_size, model_cfg.num_classes)
    losses = []
    for step in range(steps):
        micro_batches = []
        for i in range(accum):
            s = slice((i * world_size + rank) * micro, (i * world_size + rank + 1) * micro)
            micro_batches.append({"image": x[s], "label": y[s]})
        loss, _ = run_step(
            engine,
            schedule,
            micro_batches,
            step=step,
            rank=rank,
            world_size=world_size,
            recipe=StepRecipe.of(cfg, model_cfg.num_classes),
            lr=lr,
        )
        ema.update(ema_beta)
        losses.append(all_reduce_mean([float(loss)], engine.device)[0])
    return losses, engine.full_model_state(), ema.full_state(), engine, ema


def parity_worker(rank, world_size, out_dir, backend, kwargs):
    losses, params, ema_full, engine, _ = train_steps(backend, world_size, rank, **kwargs)
    with open(os.path.join(out_dir, f"bytes-{rank}.json"), "w") as f:
        json.dump(engine.local_bytes(), f)
    if rank == 0:
        from safetensors.torch import save_file

        save_file(params, os.path.join(out_dir, "params.safetensors"))
        save_file({k: v.contiguous() for k, v in ema_full.items()}, os.path.join(out_dir, "ema.safetensors"))
        with open(os.path.join(out_dir, "losses.json"), "w") as f:
            json.dump(losses, f)


def compiled_parity_worker(rank, world_size, out_dir, backend, kwargs, compile_backend):
    """parity_worker with every torch.compile on `compile_backend` (e.g. aot_eager: dynamo and autograd tracing
    through the engine's hooks without inductor's C++ code generation, which takes minutes on 2 cores); also
    writes how many graphs dynamo captured and how many graph breaks it took."""
    import functools

    from torch._dynamo.utils import counters

    torch.compile = functools.partial(torch.compile, backend=compile_backend)  # nn.Module.compile calls torch.compile
    parity_worker(rank, world_size, out_dir, backend, kwargs)
    if rank == 0:
        with open(os.path.join(out_dir, "dynamo.json"), "w") as f:
            json.dump(
                {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}, f
            )


def memory_worker(rank, world_size, out_dir, backend, zero_stage):
    _, _, _, engine, ema = train_steps(
        backend, world_size, rank, steps=1, global_batch=8, zero_stage=zero_stage, model="tiny"
    )
    # Gradients exist between backward and step: measure there.
    from ddpm_dist.diffusion import diffusion_loss, make_schedule

    micro = 8 // world_size
    x, _ = synthetic_batch(8)
    t = torch.randint(0, 100, (micro,), generator=torch.Generator().manual_seed(rank))
    loss = diffusion_loss(engine.forward, make_schedule("linear", 100), x[:micro], t, torch.randn_like(x[:micro]))
    engine.backward(loss, 1, True)
    sizes = engine.local_bytes()
    sizes["ema"] = ema.local_bytes()
    with open(os.path.join(out_dir, f"bytes-{rank}.json"), "w") as f:
        json.dump(sizes, f)


def reshard_worker(rank, world_size, ckpt_path, out_file):
    """Load a DCP checkpoint into an FSDP2 engine at this world size; rank 0 writes the gathered full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from ddpm_dist.artifacts import read_meta
    from ddpm_dist.config import ParallelConfig, TrainConfig
    from ddpm_dist.models import resolve_model_config
    from ddpm_dist.parallel.sharded_ema import ShardedEMA
    from ddpm_dist.training.checkpoint import CheckpointManager

    meta = read_meta(ckpt_path)
    model_cfg = resolve_model_config(meta["model_config"])
    engine = make_engine(model_cfg, ParallelConfig(backend="fsdp"), TrainConfig(lr=1e-3, grad_clip=1.0))
    ema = ShardedEMA(engine)
    manager = CheckpointManager(
        os.path.dirname(ckpt_path),
        {"engine": engine, "ema": ema},
        rank=rank,
        identity={"backend": "fsdp", "model_config": meta["model_config"]},
    )
    manager.load(ckpt_path)
    model_sd, optim_sd = get_state_dict(
        engine.model, engine.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    ema_full = ema.full_state()
    if rank == 0:
        torch.save({"engine": {"model": model_sd, "optim": optim_sd}, "ema": ema_full}, out_file)


def resume_worker(rank, world_size, out_dir, backend, zero_stage):
    """Components trained 3 steps and saved; fresh components (another initial seed) restored with the
    manager's one call; both train 2 more steps. Rank 0 writes both ends for a bitwise comparison."""
    from safetensors.torch import save_file

    from ddpm_dist.config import ParallelConfig, TrainConfig, load_config
    from ddpm_dist.data import Layout, TrainStream, load_manifest
    from ddpm_dist.models import resolve_model_config
    from ddpm_dist.parallel.seeding import seed_everything
    from ddpm_dist.parallel.sharded_ema import ShardedEMA
    from ddpm_dist.training.checkpoint import CheckpointManager
    from ddpm_dist.training.loop import StepRecipe, run_step
    from ddpm_dist.training.state import LRSchedule, Progress
    from tests.support.common import DIGITS

    cfg = load_config(
        None,
        [
            "model.preset=digits",
            "model.base_channels=16",
            "model.norm_groups=8",
            "train.global_batch=8",
            "train.warmup_images=64",
            "diffusion.num_steps=100",
        ],
    )
    model_cfg = resolve_model_config(cfg.model)
    schedule = cfg.diffusion.make_schedule()
    micro = 8 // world_size

    def build(seed):
        seed_everything(seed)
        parallel = ParallelConfig(backend=backend, zero_stage=zero_stage)
        engine = make_engine(model_cfg, parallel, TrainConfig(lr=1e-3, grad_clip=1.0), micro)
        parts = {
            "engine": engine,
            "ema": ShardedEMA(engine),
            "progress": Progress(),
            "lr_schedule": LRSchedule.from_config(cfg.train),
            "data": TrainStream(load_manifest(DIGITS), rank=rank, seed=3, layout=Layout(world_size, micro, 0)),
        }
        return parts, CheckpointManager(
            os.path.join(out_dir, "ck"),
            parts,
            rank=rank,
            identity={"backend": backend, "model_config": dataclasses.asdict(model_cfg)},
        )

    def train(parts, batches, steps):
        p = parts["progress"]
        for _ in range(steps):
            lr = parts["lr_schedule"](p.images)
            run_step(
                parts["engine"],
                schedule,
                [next(batches)],
                step=p.step,
                rank=rank,
                world_size=world_size,
                recipe=StepRecipe.of(cfg, model_cfg.num_classes),
                lr=lr,
            )
            parts["ema"].update(0.9)
            p.step, p.images = p.step + 1, p.images + 8

    def dump(parts, name):
        params, ema = parts["engine"].full_model_state(), parts["ema"].full_state()
        if rank == 0:
            save_file(
                {**{f"model.{k}": v for k, v in params.items()}, **{f"ema.{k}": v for k, v in ema.items()}},
                os.path.join(out_dir, f"{name}.safetensors"),
            )
            with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
                json.dump({"progress": parts["progress"].state_dict(), "data": parts["data"].state_dict()}, f)

    first, manager = build(0)
    batches = iter(first["data"])
    train(first, batches, 3)
    manager.save(3, first["progress"].images)
    train(first, batches, 2)
    dump(first, "straight")
    fresh, manager = build(1)
    meta = manager.restore_latest()
    assert meta["step"] == 3 and fresh["progress"].step == 3, meta["step"]
    train(fresh, iter(fresh["data"]), 2)
    dump(fresh, "resumed")
