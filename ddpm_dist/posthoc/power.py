"""Power-function EMA profiles during training: one ShardedEMA per relative std, on the engine's local shards
(DTensor shards under FSDP2, the fp32 partition under ZeRO-3), each step one foreach lerp per profile and no
communication. A CheckpointManager component: its state is the profiles in the engine's checkpoint shape."""

from __future__ import annotations

import torch

from ..parallel.sharded_ema import ShardedEMA
from .phema import power_beta, std_to_exp


def profile_key(std: float) -> str:
    """A profile's name in checkpoints: no dots (DCP joins nested keys with dots)."""
    return f"std{std:.4f}".replace(".", "p")


class PowerEMA:
    def __init__(self, engine, stds: list[float]):
        self.stds = [float(s) for s in stds]
        self.gammas = [float(g) for g in std_to_exp(self.stds)]
        self.keys = [profile_key(s) for s in self.stds]
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"ema.stds {self.stds}: profiles must differ in the first 4 decimals")
        self.profiles = [ShardedEMA(engine) for _ in self.stds]

    @torch.no_grad()
    def update(self, images: int, batch: int) -> None:
        """After a step of `batch` images that brought the run to `images` seen (EDM2: t counted in images)."""
        sources = self.profiles[0].sources()
        for gamma, profile in zip(self.gammas, self.profiles):
            profile.update(power_beta(gamma, images, batch), sources)

    def items(self):
        """(std, gamma, ShardedEMA) per profile."""
        return zip(self.stds, self.gammas, self.profiles)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {k: p.state_dict() for k, p in zip(self.keys, self.profiles)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.keys) - set(state)
        if missing:
            raise KeyError(f"power EMA state lacks the profiles {sorted(missing)} (ema.stds changed across a resume?)")
        for k, p in zip(self.keys, self.profiles):
            p.load_state_dict(state[k])

    def local_bytes(self) -> int:
        return sum(p.local_bytes() for p in self.profiles)
