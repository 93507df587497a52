"""What a sampling run makes, beside the sampler options: plain generation, inpainting or super-resolution.
A task supplies, per image index, the labels, the model's extra inputs and a wrapper of the sampler's
step, so every task runs through the same seed-addressed, distributed, resumable generation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..data.degrade import lowres, upsample_condition
from ..images import decode_image, to_model_range, to_uint8
from .inpaint import RePaintStep, make_mask
from .plan import labels_for

TASKS = ("generate", "inpaint", "sr")


@dataclass
class TaskSpec:
    """A task as the command line names it; build_task turns it into a Task for a given model."""

    kind: str = "generate"
    image: Optional[str] = None  # an image file, or a shard manifest (then image_index picks a sample)
    image_index: int = 0
    mask: str = "lower-half"
    resample: int = 1
    sr_factor: int = 2
    image_split: str = "held-out"  # of a shard manifest: its validation split when it has one


class Generate:
    """From noise only."""

    kind = "generate"

    def labels(self, indices: list[int], classes: Optional[str], num_classes: int, seed: int):
        return labels_for(indices, classes, num_classes, seed)

    def model_kwargs(self, indices: list[int], device) -> dict:
        return {}

    def step_wrapper(self, indices: list[int], device):
        return None


def _sources(indices: list[int], count: int) -> list[int]:
    """Which of a task's `count` source images each index uses."""
    return [i % count for i in indices]


@dataclass
class Inpaint(Generate):
    """Complete `images` (uint8 NHWC; image i % len for index i) outside `keep` (H x W, 1 = known)."""

    images: np.ndarray
    keep: np.ndarray
    image_labels: list[int] = field(default_factory=list)  # -1: unknown (the null class is used)
    resample: int = 1
    kind, picture = "inpaint", "inpaint.png"

    def labels(self, indices, classes, num_classes, seed):
        if classes is not None or not num_classes or not self.image_labels:
            return labels_for(indices, classes, num_classes, seed)
        return [
            self.image_labels[k] if self.image_labels[k] >= 0 else num_classes
            for k in _sources(indices, len(self.images))
        ]

    def step_wrapper(self, indices, device):
        known = to_model_range(self.images[_sources(indices, len(self.images))]).to(device)
        keep = torch.from_numpy(self.keep)[None, None].to(device)
        return lambda step: RePaintStep(step, known, keep, self.resample)

    def rows(self, samples: dict[int, np.ndarray]) -> list[np.ndarray]:
        """Per source image: original, masked, its completions."""
        out = []
        for k, img in enumerate(self.images[:8]):
            mine = [s for i, s in sorted(samples.items()) if i % len(self.images) == k]
            out.append(np.stack([img, (img * self.keep[..., None]).astype(np.uint8), *mine]))
        return out

    def measure(self, samples: dict[int, np.ndarray]) -> dict:
        known = self.keep.astype(bool)
        known_err = max(
            float(np.abs(s.astype(int) - self.images[i % len(self.images)].astype(int))[known].max(initial=0))
            for i, s in samples.items()
        )
        return {
            "summary": f"inpainting: original | masked | {len(samples)} completions",
            "known_region_max_error": known_err,
        }


@dataclass
class SuperResolution(Generate):
    """Upsample `images` (uint8 NHWC originals, image i % len for index i) from their `factor`-times
    downsampled versions, with a model trained with train.sr_factor (SR3-style condition channels)."""

    images: np.ndarray
    factor: int
    kind, picture = "sr", "superres.png"

    def model_kwargs(self, indices, device):
        return {"cond": self.condition(to_model_range(self.images[_sources(indices, len(self.images))]).to(device))}

    def condition(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_condition(lowres(x, self.factor), x.shape[-1])

    def rows(self, samples: dict[int, np.ndarray]) -> list[np.ndarray]:
        """Per source image: low-res (nearest), bicubic, its samples, the original."""
        out = []
        for k, img in enumerate(self.images[:8]):
            x = to_model_range(img[None])
            nearest = torch.nn.functional.interpolate(lowres(x, self.factor), size=img.shape[0], mode="nearest")
            mine = [s for i, s in sorted(samples.items()) if i % len(self.images) == k]
            out.append(np.concatenate([to_uint8(nearest), to_uint8(self.condition(x)), np.stack(mine), img[None]]))
        return out

    def measure(self, samples: dict[int, np.ndarray]) -> dict:
        """PSNR (dB, on uint8) of the samples and of bicubic upsampling against the originals."""

        def psnr(a, b):
            mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
            return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))

        ours = [psnr(s, self.images[i % len(self.images)]) for i, s in samples.items()]
        bicubic = [psnr(to_uint8(self.condition(to_model_range(img[None])))[0], img) for img in self.images]
        summary = (
            f"super-resolution x{self.factor}: low-res | bicubic | samples | original (PSNR samples "
            f"{np.mean(ours):.2f} dB, bicubic {np.mean(bicubic):.2f} dB)"
        )
        return {"summary": summary, "psnr": float(np.mean(ours)), "bicubic_psnr": float(np.mean(bicubic))}


def load_image(path: str, index: int, size: int, channels: int, split: str = "held-out") -> tuple[np.ndarray, int]:
    """uint8 HWC from an image file, or sample `index` of a shard manifest's split (with its label; -1 for a file)."""
    from PIL import Image

    from ..data import read_all

    if path.endswith(".json"):
        images, labels = read_all(path, limit=index + 1, split=split)
        if index >= len(images):
            raise ValueError(f"--image-index {index}: the {split} images of '{path}' are {len(images)}")
        return images[index], int(labels[index])
    if not os.path.exists(path):
        raise FileNotFoundError(f"image '{path}' does not exist")
    with open(path, "rb") as f:
        img = decode_image(f.read())
    im = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
    arr = np.asarray(im)
    return (arr[..., None] if arr.ndim == 2 else arr), -1


def build_task(spec: TaskSpec, model_config, seed: int = 0):
    """The Task for a model (its image size and channels; super-resolution needs condition channels)."""
    if spec.kind == "generate":
        return Generate()
    if spec.kind not in TASKS:
        raise ValueError(f"--task '{spec.kind}' is not one of {', '.join(TASKS)}")
    if not spec.image:
        raise ValueError(f"--task {spec.kind} needs --image (a file, or a shard manifest with --image-index)")
    size, channels = model_config.image_size, model_config.in_channels
    img, label = load_image(spec.image, spec.image_index, size, channels, spec.image_split)
    if spec.kind == "inpaint":
        return Inpaint(img[None], make_mask(spec.mask, size, seed), [label], spec.resample)
    if not model_config.cond_channels:
        raise ValueError(
            "this model has no conditioning channels: train it with train.sr_factor and model.cond_channels"
        )
    return SuperResolution(img[None], spec.sr_factor)
