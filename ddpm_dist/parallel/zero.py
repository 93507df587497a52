"""DeepSpeed ZeRO stage 1, 2 or 3 behind the Engine interface.

Ours, not DeepSpeed's: the optimizer (torch AdamW: DeepSpeed's fused CPU Adam does not resume
bitwise), the learning rate (set on the param groups each step) and the EMA, which follows the fp32
master weights where DeepSpeed keeps them: the local partition of each parameter under ZeRO-3, the
local fragment of the flat fp32 partition under ZeRO-1/2. DeepSpeed does gradient accumulation
itself (ZeRO-2/3 reduce-scatter every micro-step by design; ZeRO-1 reduces at the boundary)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re

import torch
import torch.distributed as dist
from torch import nn

from .engine import Engine, _norm_tensor, make_optimizer

LAYOUT_FILE = "ddpm_zero.json"


def deepspeed_globals() -> list:
    """Every class DeepSpeed's ZeRO-1/2/3 checkpoints (fp32 and bf16) pickle besides tensors and plain data, as
    torch.serialization.get_unsafe_globals_in_checkpoint lists them: resuming admits these and nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine, but loading with torch.load(weights_only=True) and deepspeed_globals(): its
    TorchCheckpointEngine unpickles whatever a file holds (weights_only=False); checkpoints sit on shared storage."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def load(self, path, map_location=None):
        with torch.serialization.safe_globals(deepspeed_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                found = re.search(r"GLOBAL (\S+)", str(e))  # torch writes builtins.exec as exec
                name = found and (found.group(1) if "." in found.group(1) else "builtins." + found.group(1))
                why = f"it references {name}, which" if name else "it holds what"
                raise ValueError(
                    f"refusing to load '{path}': {why} a DeepSpeed checkpoint never contains (a "
                    f"checkpoint from an untrusted source?)"
                ) from None


class ZeroEngine(Engine):
    name = "zero"
    nhwc_weights = False  # channels_last reaches the inputs only
    native_format = "deepspeed"  # the CheckpointManager calls save_native / load_native instead of state_dict

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        optimizer_args: dict,
        bf16: bool = False,
        *,
        stage: int,
        micro_batch: int,
        accum_steps: int,
        world_size: int,
        grad_clip: float,
        compile: bool = False,
        channels_last: bool = False,
    ):
        import deepspeed

        self.device, self.bf16, self.stage = device, bf16, stage
        self.compile, self.channels_last = compile, channels_last
        module = module.to(device)  # contiguous weights whatever channels_last: DeepSpeed views them as flat bytes
        optimizer = make_optimizer(module.parameters(), **optimizer_args)
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accum_steps,
            "train_batch_size": micro_batch * accum_steps * world_size,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": bf16},
            "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.module = self.model.module
        if compile:  # DeepSpeed's own: nn.Module.compile of the module in place, its accelerator's backend. Under
            # ZeRO-3 its parameter hooks break the graph (38 graphs for the tiny UNet): correct, but it gains less.
            self.model.compile(compile_kwargs={"dynamic": False})
        self.input_dtype = torch.bfloat16 if bf16 else torch.float32
        self._params = [(n, p) for n, p in self.module.named_parameters()]

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed holds bf16 weights itself

    def forward(self, x, t, **kw):
        x, kw = self.inputs(x, kw)
        kw = {k: v.to(self.input_dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
        return self.model(x.to(self.input_dtype), t, **kw)

    def backward(self, loss, accum_steps, last):
        self.model.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps
        if not last:
            self.model.step()  # not a boundary: DeepSpeed only counts the micro-step

    def step(self, lr, grad_clip):
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.step()
        return _norm_tensor(self.model.get_global_grad_norm())

    # -- EMA on the fp32 master shards ------------------------------------------------------------
    def _local_fp32(self, p: torch.Tensor) -> torch.Tensor:
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p)
        mapping = getattr(p, "_hp_mapping", None)
        return mapping.hp_fragment if mapping is not None else torch.empty(0, device=self.device)

    def ema_named_params(self):
        yield from ((n, self._local_fp32(p).detach()) for n, p in self._params)

    def ema_sources(self):
        return [self._local_fp32(p).detach() for _, p in self._params]

    def gather_ema(self, names, shadow):
        out = {}
        by_name = dict(self._params)
        for n, local in zip(names, shadow):
            p = by_name[n]
            if self.stage == 3:
                parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, local.contiguous())
                full = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
            else:
                full = torch.zeros(p.numel(), dtype=torch.float32, device=self.device)
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is not None:
                    a = mapping.lp_fragment_address
                    full.narrow(0, a.start, a.numel).copy_(local)
                dist.all_reduce(full)
                full = full.view(p.shape)
            out[n] = full.float().cpu().clone()
        return out

    def ema_state(self, names, shadow):
        """Gathered: plain local partitions would look replicated to DCP. Portable to any world size and engine."""
        return self.gather_ema(names, shadow)

    def load_ema_state(self, names, shadow, state):
        super().load_ema_state(names, shadow, self.scatter_ema(state))

    def scatter_ema(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The local EMA shards for full EMA tensors (inverse of gather_ema): loads at any world size."""
        out = {}
        for n, p in self._params:
            flat = full[n].reshape(-1).to(self.device, torch.float32)
            if self.stage == 3:
                size = self._local_fp32(p).numel()
                start = dist.get_rank() * size
                part = torch.zeros(size, device=self.device)
                piece = flat[start : start + size]
                part[: piece.numel()] = piece
                out[n] = part
            else:
                mapping = getattr(p, "_hp_mapping", None)
                out[n] = (
                    flat.narrow(0, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel).clone()
                    if mapping is not None
                    else torch.empty(0, device=self.device)
                )
        return out

    # -- state ---------------------------------------------------------------------------------------
    def full_model_state(self):
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in self._params}

    def state_dict(self):
        raise NotImplementedError("DeepSpeed keeps its own checkpoint format: save_native / load_native")

    def save_native(self, directory: str) -> None:
        """DeepSpeed's files (collective), and the world size they are bound to."""
        self.model.save_checkpoint(directory, tag="zero", save_latest=False)
        if dist.get_rank() == 0:
            with open(os.path.join(directory, LAYOUT_FILE), "w") as f:
                json.dump({"world_size": dist.get_world_size(), "stage": self.stage}, f)

    def load_native(self, directory: str) -> None:
        with open(os.path.join(directory, LAYOUT_FILE)) as f:
            saved = json.load(f)
        if saved["world_size"] != dist.get_world_size():
            raise ValueError(
                f"a DeepSpeed ZeRO checkpoint of {saved['world_size']} ranks resumes only at that world "
                f"size, not {dist.get_world_size()} (its EMA and the run's export are portable; to reshard "
                f"the optimizer, convert it with DeepSpeed's ds_to_universal)"
            )
        engine = self.model.checkpoint_engine
        self.model.checkpoint_engine = WeightsOnlyLoads(engine)  # every file DeepSpeed reads goes through its load
        try:
            path, _ = self.model.load_checkpoint(
                directory, tag="zero", load_optimizer_states=True, load_lr_scheduler_states=False
            )
        finally:
            self.model.checkpoint_engine = engine
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under '{directory}'")

    def local_bytes(self):
        def nbytes(t):
            return t.numel() * t.element_size() if torch.is_tensor(t) else 0

        opt = self.optimizer
        inner = getattr(opt, "optimizer", opt)
        state = sum(nbytes(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        if self.stage == 3:
            lp = sum(nbytes(p.ds_tensor) for _, p in self._params)
            master = sum(nbytes(t) for t in opt.fp32_partitioned_groups_flat)
            grads = nbytes(getattr(opt, "grad_partitions_flat_buffer", None))  # persistent, partitioned
        else:
            lp = sum(nbytes(p) for _, p in self._params)
            master = sum(nbytes(t) for t in getattr(opt, "single_partition_of_fp32_groups", []))
            grads = sum(
                nbytes(t.grad) for t in getattr(opt, "single_partition_of_fp32_groups", []) if t.grad is not None
            )
        return {"params": lp + (master if self.bf16 else 0), "grads": grads, "optimizer": state}
