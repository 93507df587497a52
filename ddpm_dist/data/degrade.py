"""Degradations made on the fly from training images: the low-resolution condition of super-resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lowres(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Antialiased downsampling by an integer factor (images in [-1, 1], NCHW)."""
    return F.interpolate(x, scale_factor=1 / factor, mode="area")


def upsample_condition(low: torch.Tensor, size: int) -> torch.Tensor:
    """The SR3 condition: the low-resolution image bicubic-upsampled back to full size."""
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def lowres_condition(x: torch.Tensor, factor: int) -> torch.Tensor:
    return upsample_condition(lowres(x, factor), x.shape[-1])
