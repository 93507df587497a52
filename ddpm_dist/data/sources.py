"""Image sources for shard building. Each yields (key, uint8 HWC array, label or None). With a size, every
image is fitted to it by data/resize.py (the function the training stream's `data.resize` uses)."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional, Union

import numpy as np
from PIL import Image

from ..rng import mix_seed
from .resize import RESIZE_MODES, channel_mode, fit_array, fit_image, open_image

Sample = tuple[str, np.ndarray, Optional[int]]
Size = Union[int, tuple[int, int], None]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SOURCE_KINDS = ("digits", "folder", "numpy", "cifar10", "mnist", "celeba")


class SourceError(ValueError):
    pass


def _hwc(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.dtype != np.uint8:
        raise SourceError(f"expected uint8 images, got {img.dtype}")
    return img


def digits_images(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (values 0..16) as uint8 size x size x 1, bicubic-upsampled."""
    from sklearn.datasets import load_digits

    data = load_digits()
    small = np.clip(np.round(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    if size == 8:
        return small[..., None], data.target.astype(np.int64)
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in small])
    return big[..., None], data.target.astype(np.int64)


def iter_digits(size: int = 16) -> Iterator[Sample]:
    images, labels = digits_images(size)
    for i, (im, y) in enumerate(zip(images, labels)):
        yield f"digits{i:06d}", im, int(y)


def parse_size(text: str) -> tuple[int, int]:
    """`N` or `HxW` -> (H, W), sides in 1..16384."""
    parts = str(text).lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and 1 <= int(p) <= 1 << 14 for p in parts):
        raise SourceError(f"size '{text}': expected N or HxW (sides 1..16384)")
    return int(parts[0]), int(parts[-1])


def _fit_seed(seed: int, i: int) -> int:
    return mix_seed(seed, i)  # random_crop at build time: a crop per image, fixed by --shuffle-seed


def iter_folder(
    root: str, size: Optional[tuple[int, int]] = None, resize: str = "center_crop", seed: int = 0
) -> Iterator[Sample]:
    """One sub-folder per class gives labels (sorted names -> 0..K-1); a flat folder is unlabelled. Without
    `size` images keep their size (grey ones one channel); with (H, W) each is fitted by `resize` to H x W x C,
    C (1 or 3) from the first image."""
    if not os.path.isdir(root):
        raise SourceError(f"image folder '{root}' does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    entries: list[tuple[str, Optional[int]]] = []
    if classes:
        for label, name in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
                entries += [
                    (os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)
                ]
    else:
        entries = [
            (os.path.join(root, f), None) for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    if not entries:
        raise SourceError(f"image folder '{root}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
    channels = None
    for i, (path, label) in enumerate(entries):
        try:
            with open_image(path) as im:  # the header's size checked before decoding
                channels = channels or channel_mode(im)
                shape = (im.height, im.width, channel_mode(im)) if size is None else (size[0], size[1], channels)
                arr = fit_image(im, shape, "none" if size is None else resize, _fit_seed(seed, i))
        except (OSError, ValueError) as e:  # PIL: UnidentifiedImageError, truncated files, the size limits
            raise SourceError(
                f"image '{path}' does not decode ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
        yield f"img{i:08d}", arr, label


def iter_numpy(path: str) -> Iterator[Sample]:
    """.npz with `images`/`x` (uint8 NHWC or NHW) and optional `labels`/`y`, or a bare .npy of images."""
    if not os.path.exists(path):
        raise SourceError(f"array file '{path}' does not exist")
    labels = None
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in ("images", "x", "arr_0") if k in z), None)
            if key is None:
                raise SourceError(f"'{path}': expected an array named images, x or arr_0 (found {', '.join(z.files)})")
            images = z[key]
            lk = next((k for k in ("labels", "y") if k in z), None)
            labels = z[lk] if lk else None
    else:
        images = np.load(path, allow_pickle=False)
    if images.ndim not in (3, 4):
        raise SourceError(f"'{path}': expected NHWC or NHW images, got shape {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise SourceError(f"'{path}': {len(images)} images but {len(labels)} labels")
    for i in range(len(images)):
        yield f"arr{i:08d}", _hwc(images[i]), None if labels is None else int(labels[i])


def iter_torchvision(kind: str, root: str, split: str = "train") -> Iterator[Sample]:
    """CIFAR-10, MNIST or CelebA from files already under `root` (nothing is downloaded)."""
    import torchvision.datasets as tvd

    try:
        if kind == "cifar10":
            ds = tvd.CIFAR10(root, train=split == "train", download=False)
        elif kind == "mnist":
            ds = tvd.MNIST(root, train=split == "train", download=False)
        elif kind == "celeba":
            ds = tvd.CelebA(root, split=split, target_type=[], download=False)
        else:
            raise SourceError(f"unknown torchvision source '{kind}'")
    except RuntimeError as e:
        raise SourceError(
            f"{kind} files not found under '{root}' ({str(e).splitlines()[0]}); nothing is downloaded"
        ) from None
    for i in range(len(ds)):
        img, target = ds[i]
        label = int(target) if kind in ("cifar10", "mnist") else None
        yield f"{kind}{i:08d}", _hwc(np.asarray(img)), label


def fitted(
    samples: Iterable[Sample], size: tuple[int, int], resize: str = "center_crop", seed: int = 0
) -> Iterator[Sample]:
    """Each array fitted to size x C by `resize` (C from the first image)."""
    channels = None
    for i, (key, img, label) in enumerate(samples):
        channels = channels or img.shape[2]
        try:
            out = fit_array(img, (size[0], size[1], channels), resize, _fit_seed(seed, i))
        except ValueError as e:
            raise SourceError(f"image {key}: {str(e).splitlines()[0]}") from None
        yield key, out, label


def open_source(
    kind: str,
    path: Optional[str] = None,
    size: Size = None,
    split: str = "train",
    resize: Optional[str] = None,
    seed: int = 0,
) -> Iterator[Sample]:
    """The images of a source. `size` (N or (H, W)): digits upsample their 8x8 images to N x N (default 16);
    every other source fits each image to it by `resize` (default center_crop; none: each must already have
    it). Without a size images keep theirs, and must all share one to be built into shards."""
    if resize is not None and resize not in RESIZE_MODES:
        raise SourceError(f"--resize '{resize}' is not one of {', '.join(RESIZE_MODES)}")
    hw = None if size is None else (size, size) if isinstance(size, int) else tuple(size)
    if kind == "digits":
        if resize is not None or (hw and hw[0] != hw[1]):
            raise SourceError("source digits: --size N upsamples its 8x8 images to N x N (no HxW, no --resize)")
        return iter_digits(16 if hw is None else hw[0])
    if path is None:
        raise SourceError(f"source '{kind}' needs --input PATH")
    if hw is None and resize is not None:
        raise SourceError(f"--resize {resize} needs --size N (or HxW): the size to resize every image to")
    mode = resize or "center_crop"
    if kind == "folder":
        return iter_folder(path, hw, mode, seed)
    if kind == "numpy":
        samples = iter_numpy(path)
    elif kind in ("cifar10", "mnist", "celeba"):
        samples = iter_torchvision(kind, path, split)
    else:
        raise SourceError(f"unknown source '{kind}' (expected one of {', '.join(SOURCE_KINDS)})")
    return samples if hw is None else fitted(samples, hw, mode, seed)
