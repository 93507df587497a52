"""FSDP2 (torch.distributed.fsdp.fully_shard): each UNet level, the middle blocks, then the root.
bf16 uses MixedPrecisionPolicy (bf16 parameters in compute, fp32 gradient reduction), not autocast.
Hybrid sharding: a 2-D mesh (replicate across nodes, shard within a node)."""
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


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, module, device, optimizer_args, bf16=False, *, world_size: int, local_world_size: int,
                 reshard_after_forward: bool = True, hybrid: bool = False):
        self.world_size, self.local_world_size = world_size, local_world_size
        self.reshard_after_forward, self.hybrid = reshard_after_forward, hybrid
        super().__init__(module, device, optimizer_args, bf16)

    def autocast(self):
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts parameters instead

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.hybrid and self.world_size > self.local_world_size:
            nodes = self.world_size // self.local_world_size
            mesh = init_device_mesh(self.device.type, (nodes, self.local_world_size), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("shard",))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else MixedPrecisionPolicy()
        for unit in sharding_units(module):
            fully_shard(unit, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=mp)
        # The root keeps its parameters after forward: backward needs them right away.
        fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
        return module

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
