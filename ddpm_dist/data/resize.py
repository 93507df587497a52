"""Images of any size -> the training shape (H, W, C): one function for `shards build --size` and the stream's
workers (`data.resize`), so a data set resized at build time and one resized while training look the same.

Modes (RESIZE_MODES):
- none         the image must already have the shape (the exact-size path: samples.decode_image);
- center_crop  scale so the image covers H x W (the short side fits), keep the centre;
- random_crop  the same scale, the crop at an offset drawn from `crop_seed` (the stream passes
               mix_seed(seed, epoch, position), so a resumed run crops the same way);
- border       scale so the whole image fits inside H x W, pad with black (img2dataset's `border`);
- stretch      scale each side to H x W, ignoring the aspect ratio.

The filter is guided-diffusion's (ADM) `center_crop_arr`, the pipeline ADM, EDM2 (its dataset_tool's
center_crop_imagenet is this code) and most diffusion baselines trained on: BOX-halve while both sides are at least
twice the target, then one BICUBIC resize. PIL's resize is antialiased (its filter support widens with the scale
factor), which is what clean-fid showed matters (torch/TF bilinear without antialias alias); the BOX halvings make large
downscales cheap and are exact 2x2 means. The BICUBIC step resizes only the crop (`resize(box=...)`, neighbours outside
the box still feed its edge taps), so a very tall or wide image never makes a large intermediate; the result equals
resize-then-crop to within 1 grey level (tests/unit/test_resize.py against ADM's code).

JPEGs are decoded at full scale: PIL's `draft` (a reduced DCT scale, 1/2 to 1/8) was measured against the
full decode on a photo (tests/unit/test_resize.py's content) and was off by 0.7-2 grey levels on average, up to 13,
keeping 16x down to 4x the target; JPEG quality 90 itself moves the result by 0.2 on average. Not worth it.

The header's size is checked before any pixel is decoded: at most MAX_IMAGE_SIDE a side and PIL's
MAX_IMAGE_PIXELS (the decompression-bomb limit) in all."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..rng import mix_seed
from .manifest import MAX_IMAGE_SIDE

RESIZE_MODES = ("none", "center_crop", "random_crop", "border", "stretch")
CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def check_image_size(h: int, w: int) -> None:
    """Refuse (ValueError) an image whose declared size is over the limits, before it is decoded."""
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise ValueError(f"image of {h}x{w} pixels: a side is outside 1..{MAX_IMAGE_SIDE}")
    if Image.MAX_IMAGE_PIXELS and h * w > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"image of {h}x{w} pixels is over the decompression-bomb limit ({Image.MAX_IMAGE_PIXELS})")


def open_image(data) -> Image.Image:
    """A lazily decoded PIL image of encoded bytes (or a path), its header's size checked."""
    im = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
    check_image_size(im.height, im.width)
    return im


def channel_mode(im: Image.Image) -> int:
    """The channel count an image is stored with by default: 1 for grey images, 3 otherwise."""
    return 1 if im.mode in ("1", "L", "P;L", "I", "F") + _SIXTEEN_BIT else 3


def _convert(im: Image.Image, channels: int) -> Image.Image:
    if im.mode in _SIXTEEN_BIT:  # PIL's I;16 -> L clips at 255; scale the 16-bit range instead
        im = Image.fromarray(((np.asarray(im).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), "L")
    mode = CHANNEL_MODES[channels]
    return im if im.mode == mode else im.convert(mode)


def fit_image(im: Image.Image, shape: tuple, mode: str, crop_seed: int = 0) -> np.ndarray:
    """uint8 HWC of exactly `shape` (H, W, C) from a PIL image (its size already checked) by `mode`."""
    H, W, C = (int(v) for v in shape)
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")
    im = _convert(im, C)
    if mode == "none":
        if im.size != (W, H):
            raise ValueError(f"image is {im.height}x{im.width}, expected {H}x{W} (resize: none)")
    elif im.size != (W, H):
        im = _resized(im, W, H, mode, crop_seed)
    out = np.asarray(im)
    return out[:, :, None] if out.ndim == 2 else out


def _resized(im: Image.Image, W: int, H: int, mode: str, crop_seed: int) -> Image.Image:
    while im.width >= 2 * W and im.height >= 2 * H:  # ADM: exact 2x2 means while at least 2x the target
        im = im.resize((im.width // 2, im.height // 2), Image.BOX)
    w, h = im.size
    if mode == "stretch":
        return im.resize((W, H), Image.BICUBIC)
    if mode == "border":
        scale = min(W / w, H / h)
        nw, nh = min(W, max(1, round(w * scale))), min(H, max(1, round(h * scale)))
        canvas = Image.new(im.mode, (W, H), 0)
        canvas.paste(im.resize((nw, nh), Image.BICUBIC), ((W - nw) // 2, (H - nh) // 2))
        return canvas
    scale = max(W / w, H / h)  # cover: ADM's image_size / min(size) for a square target
    nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
    if mode == "center_crop":
        x, y = (nw - W) // 2, (nh - H) // 2
    else:
        x, y = mix_seed(crop_seed, 0) % (nw - W + 1), mix_seed(crop_seed, 1) % (nh - H + 1)
    fx, fy = w / nw, h / nh  # the crop of the (nw, nh) image, in this image's coordinates
    return im.resize((W, H), Image.BICUBIC, box=(x * fx, y * fy, (x + W) * fx, (y + H) * fy))


def fit_array(img: np.ndarray, shape: tuple, mode: str, crop_seed: int = 0) -> np.ndarray:
    """fit_image for a uint8 HW/HWC array (npy samples, array sources)."""
    img = img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img
    check_image_size(img.shape[0], img.shape[1])
    return fit_image(Image.fromarray(np.ascontiguousarray(img)), shape, mode, crop_seed)
