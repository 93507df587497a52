"""The loop's own stateful components: progress counters and the learning-rate schedule. Like the engine,
the EMA and the data stream they have state_dict / load_state_dict, and the CheckpointManager saves them."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Optimizer steps taken and training images seen (progress is counted in images: EDM)."""

    step: int = 0
    images: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "images": self.images}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.images = int(state["step"]), int(state["images"])


@dataclass
class LRSchedule:
    """Linear warm-up over warmup_images, then constant or cosine decay to 0 at total_images. A function of
    images seen; its state is its settings, so a resume that changes them says so."""

    lr: float
    kind: str = "constant"  # constant | cosine
    warmup_images: int = 0
    total_images: int = 1
    global_batch: int = 1

    @classmethod
    def from_config(cls, train) -> "LRSchedule":
        return cls(train.lr, train.lr_schedule, train.warmup_images, train.total_images, train.global_batch)

    def __call__(self, images: int) -> float:
        if self.warmup_images and images < self.warmup_images:
            return self.lr * (images + self.global_batch) / self.warmup_images
        if self.kind == "cosine":
            span = max(self.total_images - self.warmup_images, 1)
            frac = min(max(images - self.warmup_images, 0) / span, 1.0)
            return self.lr * 0.5 * (1 + math.cos(math.pi * frac))
        return self.lr

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        changed = {k: (v, getattr(self, k)) for k, v in state.items() if getattr(self, k, v) != v}
        if changed:
            log.info(
                "learning-rate schedule changed on resume: %s",
                ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()),
            )
