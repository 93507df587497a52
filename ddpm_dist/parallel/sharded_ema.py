"""EMA of the weights, kept on the same shards as the parameters: DTensor clones under FSDP2, the local
fp32 partition under ZeRO-3, full tensors otherwise. One foreach lerp per step, no communication;
gathering happens only for export, sampling and (under ZeRO) checkpoints. Length is a half-life in images (EDM)."""

from __future__ import annotations

import torch


def ema_beta(batch_images: int, images_seen: int, halflife_images: float, warmup_ratio: float) -> float:
    """Decay for one step of `batch_images`; the half-life ramps up as images_seen * warmup_ratio (EDM)."""
    halflife = halflife_images
    if warmup_ratio > 0:
        halflife = min(halflife, images_seen * warmup_ratio)
    return 0.5 ** (batch_images / max(halflife, 1e-8))


class ShardedEMA:
    def __init__(self, engine):
        self.engine = engine
        named = list(engine.ema_named_params())
        self.names = [n for n, _ in named]
        self.shadow = [t.detach().clone().float() for _, t in named]
        self._local = [s.to_local() if hasattr(s, "to_local") else s for s in self.shadow]

    def sources(self) -> list[torch.Tensor]:
        """The engine's local fp32 tensors this EMA follows (one list serves several EMAs of the same engine)."""
        sources = self.engine.ema_sources()
        if sources and sources[0].dtype != torch.float32:
            sources = [s.float() for s in sources]
        return sources

    @torch.no_grad()
    def update(self, beta: float, sources: list[torch.Tensor] | None = None) -> None:
        torch._foreach_lerp_(self._local, self.sources() if sources is None else sources, 1.0 - beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds, in the engine's shape (DTensors under FSDP2, gathered under ZeRO)."""
        return self.engine.ema_state(self.names, self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        self.engine.load_ema_state(self.names, self.shadow, state)

    def local_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._local)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Unsharded fp32 EMA weights on CPU, keyed like the plain module's state_dict (collective)."""
        return self.engine.gather_ema(self.names, self.shadow)


def gather_flat_to_main(local: torch.Tensor, counts: list[int]) -> list[torch.Tensor] | None:
    """Every rank's flat vector (rank r's has counts[r] elements, known to all) on rank 0, in rank order, on the CPU;
    None on the other ranks. Padded to the longest for the collective (rank 0 holds about one full copy)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local.cpu()]
    rank, size = dist.get_rank(), max(counts)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(size, dtype=local.dtype, device=device)
    padded[: local.numel()] = local.to(device)
    parts = [torch.empty_like(padded) for _ in counts] if rank == 0 else None
    dist.gather(padded, parts, dst=0)
    return [p[:c].cpu() for p, c in zip(parts, counts)] if rank == 0 else None
