"""DDP: every rank holds the whole model; gradients all-reduced in buckets during backward.
For small models (up to a few hundred M parameters on fast links) it is the fastest backend."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .engine import Engine


class DDPEngine(Engine):
    name = "ddp"

    def wrap(self, module: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def sync_gradients(self, sync: bool):
        return super().sync_gradients(sync) if sync else self.model.no_sync()
