"""The interface the training loop drives, and its single-process form. DDP, FSDP2 and DeepSpeed
ZeRO (ddp.py, fsdp.py, zero.py) implement the same methods; the loop does not know which it has."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn


def make_optimizer(params, lr: float, betas, weight_decay: float) -> torch.optim.Optimizer:
    # torch's AdamW resumes bitwise under every backend (DeepSpeed's fused CPU Adam does not).
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=1e-8, foreach=True)


def _norm_tensor(norm) -> torch.Tensor:
    """The total norm as a plain tensor, left on the device: no host sync per step."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.detach() if torch.is_tensor(norm) else torch.tensor(math.nan if norm is None else float(norm))


def to_memory_format(module: nn.Module, channels_last: bool) -> nn.Module:
    """NHWC 4-D weights (Engine.forward converts the inputs; a convolution's output takes the layout of its input or
    weight, so the activations follow): the layout tensor-core convolutions want."""
    return module.to(memory_format=torch.channels_last) if channels_last else module


def _nhwc(v):
    return v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v


class Engine:
    """Single process: the module itself, autocast for bf16, torch AdamW, clip_grad_norm_.

    compile=True compiles in place (nn.Module.compile: the state_dict keys stay those of the plain module, so
    checkpoints and exports move freely between compiled and eager runs); FSDP2 compiles each sharded block."""

    name = "single"
    nhwc_weights = True  # channels_last converts the weights too (sharding engines keep theirs contiguous)

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        optimizer_args: dict,
        bf16: bool = False,
        *,
        compile: bool = False,
        channels_last: bool = False,
    ):
        self.module = to_memory_format(module.to(device), channels_last and self.nhwc_weights)
        self.device = device
        self.bf16, self.compile, self.channels_last = bf16, compile, channels_last
        self.model = self.wrap(self.module)  # what forward calls
        if compile:
            self.compile_model()
        self.optimizer = make_optimizer(self.module.parameters(), **optimizer_args)

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def compile_model(self) -> None:
        """The whole wrapped model, in place (under DDP, dynamo splits the graph at the gradient buckets so their
        all-reduce overlaps backward). Static shapes: another batch shape compiles anew, which is rare in training;
        inductor failed on this UNet's dynamic-shape graphs (torch 2.14, CPU)."""
        self.model.compile(dynamic=False)

    def inputs(self, x: torch.Tensor, kw: dict) -> tuple[torch.Tensor, dict]:
        """The model's inputs in the engine's memory format (image-shaped tensors: x and e.g. `cond`)."""
        if not self.channels_last:
            return x, kw
        return _nhwc(x), {k: _nhwc(v) for k, v in kw.items()}

    # -- forward/backward ------------------------------------------------------------------------
    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, x, t, **kw):
        x, kw = self.inputs(x, kw)
        with self.autocast():
            return self.model(x, t, **kw)

    def sync_gradients(self, sync: bool):
        """Context for one micro-step; sync=False skips gradient communication (inner accumulation steps)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accum_steps: int, last: bool) -> None:
        (loss / accum_steps).backward()

    def step(self, lr: float, grad_clip: float) -> torch.Tensor:
        """One optimizer step at learning rate `lr`; returns the global gradient norm before clipping (a tensor)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(
            self.module.parameters(), grad_clip if grad_clip > 0 else float("inf"), foreach=True
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _norm_tensor(norm)

    # -- EMA ---------------------------------------------------------------------------------------
    def ema_named_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) the EMA copies at start: full tensors here, DTensor / partition for sharded engines."""
        yield from ((n, p.detach()) for n, p in self.module.named_parameters())

    def ema_sources(self) -> list[torch.Tensor]:
        """The local fp32 tensors the EMA follows, in ema_named_params order."""
        return [p.detach() for p in self.module.parameters()]

    def gather_ema(self, names: list[str], shadow: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full fp32 EMA tensors on CPU (DTensors are gathered: a collective under FSDP2)."""
        out = {}
        for n, s in zip(names, shadow):
            s = s.full_tensor() if hasattr(s, "full_tensor") else s
            out[n] = s.detach().float().cpu().clone(memory_format=torch.contiguous_format)  # NCHW under channels_last
        return out

    def ema_state(self, names: list[str], shadow: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The EMA as DCP saves it: full tensors here, DTensors under FSDP2 (sharded writes, resharding loads)."""
        return dict(zip(names, shadow))

    def load_ema_state(self, names: list[str], shadow: list[torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        """Copy an ema_state()-shaped state into the EMA tensors."""
        with torch.no_grad():
            for name, s in zip(names, shadow):
                src = state[name]
                if hasattr(s, "to_local") and hasattr(src, "to_local"):
                    s.to_local().copy_(src.to_local())
                else:
                    s.copy_(src)

    # -- state (a CheckpointManager component) ------------------------------------------------------
    def state_dict(self) -> dict:
        """Model and optimizer state as DCP saves them (sharded under FSDP2)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded fp32 weights on CPU (every rank must call it for sharded engines)."""
        return {
            k: v.detach().float().cpu().clone(memory_format=torch.contiguous_format)
            for k, v in self.module.state_dict().items()
        }

    def local_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer state (for the memory test)."""

        def nbytes(t):
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()

        params = list(self.module.parameters())
        opt = sum(
            nbytes(v) for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
        )
        return {
            "params": sum(nbytes(p) for p in params),
            "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": opt,
        }
