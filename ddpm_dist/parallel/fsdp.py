"""FSDP2 (torch.distributed.fsdp.fully_shard): each UNet level, the middle blocks, then the root.
bf16 uses MixedPrecisionPolicy (bf16 parameters in compute, fp32 gradient reduction), not autocast.
Hybrid sharding: a 2-D mesh (replicate across nodes, shard within a node).
compile: each block is compiled before it is sharded (torchtitan), so FSDP's all-gathers and reduce-scatters run
between compiled blocks; the root's few layers stay eager."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .engine import Engine


def sharding_units(module: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: UNet levels and middle blocks (each a few % of the parameters)."""
    units = []
    for name in ("down", "mid", "up"):
        units += list(getattr(module, name, []))
    return units


def compile_blocks(units: list[nn.Module]) -> None:
    """Compile each block in place (state_dict keys unchanged). Static shapes: the levels run one forward at
    different sizes, which would make dynamo go dynamic, and inductor failed on that (torch 2.14, CPU); so one
    graph per block shape, and the recompile limit must cover them all."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(units))
    for unit in units:
        unit.compile(dynamic=False)


class FSDPEngine(Engine):
    name = "fsdp"
    nhwc_weights = False  # FSDP2 refuses non-contiguous parameters: channels_last reaches the inputs only

    def __init__(
        self,
        module,
        device,
        optimizer_args,
        bf16=False,
        *,
        world_size: int,
        local_world_size: int,
        reshard_after_forward: bool = True,
        hybrid: bool = False,
        compile: bool = False,
        channels_last: bool = False,
    ):
        self.world_size, self.local_world_size = world_size, local_world_size
        self.reshard_after_forward, self.hybrid = reshard_after_forward, hybrid
        super().__init__(module, device, optimizer_args, bf16, compile=compile, channels_last=channels_last)

    def autocast(self):
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts parameters instead

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.hybrid and self.world_size > self.local_world_size:
            nodes = self.world_size // self.local_world_size
            mesh = init_device_mesh(
                self.device.type, (nodes, self.local_world_size), mesh_dim_names=("replicate", "shard")
            )
        else:
            mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("shard",))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.bf16
            else MixedPrecisionPolicy()
        )
        units = sharding_units(module)
        if self.compile:
            compile_blocks(units)
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=mp)
        # The root keeps its parameters after forward: backward needs them right away.
        fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
        return module

    def compile_model(self) -> None:
        pass  # wrap compiled the blocks before sharding them

    @contextlib.contextmanager
    def sync_gradients(self, sync: bool):
        self.module.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def ema_sources(self):
        return [p.to_local().detach() for p in self.module.parameters()]

    def full_model_state(self):
        out = {}
        for k, v in self.module.state_dict().items():
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[k] = v.detach().float().cpu().clone()
        return out
