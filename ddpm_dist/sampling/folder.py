"""A folder (or fsspec URL) of samples: NNNNNN.png named by image index, written atomically, and
sampling.json saying what made them. `evaluate` reads the same folders."""

from __future__ import annotations

import json
import os

import numpy as np

from ..data import storage
from ..images import decode_image, png_bytes
from ..redact import to_json

PROVENANCE = "sampling.json"


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def existing_indices(out: str) -> set[int]:
    done = set()
    for path in storage.list_prefix(out):
        name = os.path.basename(path)
        if name.endswith(".png") and name[:-4].isdigit():
            done.add(int(name[:-4]))
    return done


def sample_indices(folder: str) -> list[int]:
    """The indices present, sorted; an error when there are none."""
    indices = sorted(existing_indices(folder))
    if not indices:
        raise FileNotFoundError(f"no NNNNNN.png images in '{storage.redact(folder)}'")
    return indices


def write_image(out: str, index: int, img: np.ndarray) -> None:
    storage.write_bytes_atomic(storage.join(out, png_name(index)), png_bytes(img))


def read_image(folder: str, index: int) -> np.ndarray:
    return decode_image(storage.read_bytes(storage.join(folder, png_name(index))))


def remove_debris(out: str) -> None:
    """Temporary files of an interrupted atomic write (local folders only; object stores publish whole objects)."""
    path = storage.local_path(out)
    if storage.is_local(out) and os.path.isdir(path):
        for name in os.listdir(path):
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(path, name))


def write_provenance(out: str, info: dict) -> None:
    storage.write_bytes_atomic(storage.join(out, PROVENANCE), to_json(info).encode())


def read_provenance(folder: str) -> dict:
    url = storage.join(folder, PROVENANCE)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}
