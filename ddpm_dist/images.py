"""Image conversions, in one place: uint8 NHWC arrays (files, shards, feature extractors) <-> float32 NCHW
tensors in [-1, 1] (what the model sees), and PNG bytes."""

from __future__ import annotations

import io
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image


def to_model_range(images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (a new tensor; the input is not modified)."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return model_range(x.permute(0, 3, 1, 2))


def model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW (any strides, any device) -> float32 NCHW in [-1, 1]. The training stream ships uint8 and the
    step converts on its device: a quarter of the bytes through worker shared memory and host-to-device copies."""
    return x.float().div_(127.5).sub_(1.0)


def to_float255(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in 0..255: the input of feature extractors and the digits classifier."""
    return torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2).contiguous()


def from_float255(x255: torch.Tensor) -> torch.Tensor:
    """float NCHW in 0..255 (an extractor's input) -> [-1, 1]."""
    return x255 / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC, rounded to nearest (values outside [-1, 1] are clipped)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def png_bytes(img: np.ndarray) -> bytes:
    """One uint8 HWC image (C = 1 or 3) as PNG."""
    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """uint8 HWC from PNG/JPEG/WebP bytes (grey images keep one channel); raises on anything undecodable.
    The header's size is checked before decoding: it must be `size` (H, W) when given, and no image over PIL's
    MAX_IMAGE_PIXELS is decoded (PIL itself only warns below twice that)."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if size is not None and (h, w) != tuple(size):
            raise ValueError(f"image is {h}x{w}, expected {size[0]}x{size[1]}")
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {h}x{w} pixels is over the decompression-bomb limit")
        im.load()
        img = np.asarray(im)
    return img[:, :, None] if img.ndim == 2 else img
