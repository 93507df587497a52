"""Image sources for shard building. Each yields (key, uint8 HWC array, label or None)."""
from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
from PIL import Image

Sample = tuple[str, np.ndarray, Optional[int]]
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


def iter_folder(root: str) -> Iterator[Sample]:
    """One sub-folder per class gives labels (sorted names -> 0..K-1); a flat folder is unlabelled."""
    if not os.path.isdir(root):
        raise SourceError(f"image folder '{root}' does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    entries: list[tuple[str, Optional[int]]] = []
    if classes:
        for label, name in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
                entries += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        entries = [(os.path.join(root, f), None) for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not entries:
        raise SourceError(f"image folder '{root}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
    for i, (path, label) in enumerate(entries):
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16", "I") else "RGB"))
        yield f"img{i:08d}", _hwc(arr), label


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
        raise SourceError(f"{kind} files not found under '{root}' ({str(e).splitlines()[0]}); nothing is downloaded") from None
    for i in range(len(ds)):
        img, target = ds[i]
        label = int(target) if kind in ("cifar10", "mnist") else None
        yield f"{kind}{i:08d}", _hwc(np.asarray(img)), label


def open_source(kind: str, path: Optional[str] = None, size: int = 16, split: str = "train") -> Iterator[Sample]:
    if kind == "digits":
        return iter_digits(size)
    if path is None:
        raise SourceError(f"source '{kind}' needs --input PATH")
    if kind == "folder":
        return iter_folder(path)
    if kind == "numpy":
        return iter_numpy(path)
    if kind in ("cifar10", "mnist", "celeba"):
        return iter_torchvision(kind, path, split)
    raise SourceError(f"unknown source '{kind}' (expected one of {', '.join(SOURCE_KINDS)})")
