"""Build, inspect and verify WebDataset shards with a manifest (url, count, bytes, sha256 per shard)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import fsspec
import numpy as np
import webdataset as wds
from tqdm import tqdm

from ..images import png_bytes
from . import storage
from .manifest import (  # noqa: F401 - re-exported: the manifest and sample parsers were split out of here
    FORMAT,
    MANIFEST_NAME,
    Manifest,
    ShardError,
    ShardInfo,
    load_manifest,
    one_line,
    parse_json,
    show,
    write_manifest,
)
from .member_index import index_json  # noqa: F401 - re-exported
from .samples import HashingStream, decode_image, decode_label, iter_tar_samples, tar_index  # noqa: F401 - re-exported
from .sources import Sample

# Training from a bare pattern reads and hashes every shard in every process before the first step: fine for a few
# dozen shards (seconds), hours of repeated I/O for a crawl. Above this many, `shards index` is required (once).
MAX_PATTERN_SHARDS = 64


def manifest_from_pattern(pattern: str) -> Manifest:
    """A manifest for a brace pattern of tar URLs (counts unknown until read: each shard is read once here).
    Patterns of more than MAX_PATTERN_SHARDS shards are refused: index them once with `shards index`."""
    import braceexpand

    urls = list(braceexpand.braceexpand(pattern))
    if len(urls) > MAX_PATTERN_SHARDS:
        raise ShardError(
            f"pattern '{storage.redact(pattern)}' names {len(urls)} shards: index it first with "
            f"`python -m ddpm_dist.shards index '{storage.redact(pattern)}' --out DIR` and train from "
            f"DIR/manifest.json (patterns of up to {MAX_PATTERN_SHARDS} shards are read as they are)"
        )
    infos, shape = [], None
    for url in urls:
        if not storage.exists(url):
            raise ShardError(f"shard '{storage.redact(url)}' does not exist{storage.missing_hint(url)}")
        with (
            storage.translated(url),
            fsspec.open(url, "rb") as f,
        ):  # one streamed pass: counted and hashed, never held whole
            hashed = HashingStream(f)
            count = 0
            for sample in iter_tar_samples(hashed, url):
                if shape is None:
                    shape = _first_shape(sample, url)
                count += 1
            hashed.drain()
        infos.append(ShardInfo(url, count, hashed.size, hashed.sha256.hexdigest()))
    if shape is None:
        raise ShardError(f"pattern '{pattern}' has no samples")
    return Manifest(infos, [shape[0], shape[1]], shape[2], 0, "png", "")


def _first_shape(sample: dict, url: str) -> tuple:
    try:
        return decode_image(sample).shape
    except Exception as e:  # noqa: BLE001 - PIL raises OSError and ValueError subclasses of its own
        raise ShardError(
            f"shard '{storage.redact(url)}': the first sample does not decode ({one_line(e)}), "
            "so the image size is unknown"
        ) from None


def encode_image(img: np.ndarray, fmt: str) -> bytes:
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, img, allow_pickle=False)
        return buf.getvalue()
    return png_bytes(img)


def _write_shard(url: str, samples: list[dict]) -> ShardInfo:
    buf = io.BytesIO()
    # A fixed integer mtime makes builds reproducible (same sha256) and avoids a PAX header per file.
    with wds.TarWriter(buf, encoder=False, mtime=0, format=tarfile.USTAR_FORMAT) as w:
        for s in samples:
            w.write(s)
    data = buf.getvalue()
    storage.write_bytes_atomic(url + ".idx.json", index_json(tar_index(data)))
    storage.write_bytes_atomic(url, data)
    return ShardInfo(url, len(samples), len(data), hashlib.sha256(data).hexdigest())


def _tar_size(member_bytes: int) -> int:
    """Bytes of a tar with these members: two zero end blocks, padded to tar's 10240-byte records."""
    return -(-(member_bytes + 1024) // 10240) * 10240


def _shuffled(items: Iterable, seed: Optional[int], buffer: int) -> Iterator:
    """Buffered shuffle: exact when the data set fits in `buffer`, bounded memory otherwise."""
    if seed is None:
        yield from items
        return
    rng = np.random.default_rng(seed)
    pool: list = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            j = int(rng.integers(len(pool)))
            pool[j], pool[-1] = pool[-1], pool[j]
            yield pool.pop()
    for j in rng.permutation(len(pool)):
        yield pool[j]


class _ShardWriter:
    """Cuts one split's records into shards of at most `samples_per_shard` records / `max_shard_bytes` bytes."""

    def __init__(self, out: str, prefix: str, samples_per_shard: int, max_shard_bytes: int):
        self.out = out
        self.prefix = prefix
        self.per_shard = samples_per_shard
        self.max_bytes = max_shard_bytes
        self.infos: list[ShardInfo] = []
        self.labels: Counter = Counter()
        self.current: list[dict] = []
        self.current_bytes = 0

    def add(self, rec: dict, label) -> None:
        size = sum(512 + -(-len(v) // 512) * 512 for k, v in rec.items() if k != "__key__")  # header + padded data
        if self.current and (
            len(self.current) >= self.per_shard
            or (self.max_bytes and _tar_size(self.current_bytes + size) > self.max_bytes)
        ):
            self.flush()
        self.current.append(rec)
        self.current_bytes += size
        self.labels[label] += 1

    def flush(self) -> None:
        if not self.current:
            return
        name = f"{self.prefix}-{len(self.infos):06d}.tar"
        info = _write_shard(storage.join(self.out, name), self.current)
        info.url, info.index = name, name + ".idx.json"
        self.infos.append(info)
        self.current, self.current_bytes = [], 0


def _histogram(labels: Counter) -> dict:
    return {} if None in labels else {str(k): v for k, v in sorted(labels.items())}


def build_shards(
    source: Iterable[Sample],
    out: str,
    *,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 0,
    image_format: str = "png",
    shuffle_seed: Optional[int] = 0,
    shuffle_buffer: int = 200_000,
    overwrite: bool = False,
    total: Optional[int] = None,
    progress: bool = True,
    val_fraction: float = 0.0,
) -> Manifest:
    """Write shards and then the manifest (atomically, last) under `out`. Shuffling at build time (the
    default) makes each shard an i.i.d. slice, which the stream's shard-level shuffling relies on. With
    `val_fraction` F, every sample k of the shuffled order with floor((k+1)F) > floor(kF) goes to the validation
    shards ("<prefix>-val-NNNNNN.tar"): exactly F of them, spread evenly, never in the training stream."""
    if image_format not in ("png", "npy"):
        raise ShardError(f"image format '{image_format}' is not png or npy")
    if not 0.0 <= val_fraction < 1.0:
        raise ShardError(f"--val-fraction {val_fraction} is not in [0, 1)")
    manifest_url = storage.join(out, MANIFEST_NAME)
    if storage.list_prefix(out) and not overwrite:
        raise ShardError(f"output '{storage.redact(out)}' is not empty (pass --overwrite to replace its shards)")
    shape = None
    train = _ShardWriter(out, prefix, samples_per_shard, max_shard_bytes)
    held_out = _ShardWriter(out, f"{prefix}-val", samples_per_shard, max_shard_bytes)

    def encoded():  # encode before buffering: PNG bytes are what the shuffle buffer holds
        nonlocal shape
        for key, img, label in source:
            if shape is None:
                shape = img.shape
            if img.shape != shape:
                raise ShardError(
                    f"image {key} has shape {img.shape}, expected {shape} like the first one (images of "
                    "several sizes: pass --size N --resize center_crop to resize each to N x N)"
                )
            rec = {"__key__": key, image_format: encode_image(img, image_format)}
            if label is not None:
                rec["cls"] = str(label).encode()
            yield rec, label

    for k, (rec, label) in enumerate(
        tqdm(
            _shuffled(encoded(), shuffle_seed, shuffle_buffer),
            total=total,
            desc="building shards",
            unit="img",
            disable=not progress,
        )
    ):
        (held_out if int((k + 1) * val_fraction) > int(k * val_fraction) else train).add(rec, label)
    train.flush()
    held_out.flush()
    if not train.infos:  # sample 0 always trains (F < 1), so no images at all
        raise ShardError("the source has no images")
    labels = train.labels + held_out.labels
    if None in labels and len(labels) > 1:
        raise ShardError("some images have labels and some do not")
    num_classes = 0 if None in labels else max(labels) + 1
    extra = {"label_histogram": _histogram(train.labels)}
    if held_out.infos:
        extra["validation_label_histogram"] = _histogram(held_out.labels)
    manifest = Manifest(
        train.infos, [shape[0], shape[1]], shape[2], num_classes, image_format, out, extra, held_out.infos
    )
    write_manifest(manifest, manifest_url)  # the columns sidecar, then the JSON (each atomic)
    return manifest


@dataclass
class VerifyReport:
    faults: list[str]
    samples: int

    @property
    def ok(self) -> bool:
        return not self.faults


def verify(manifest_url: str, progress: bool = True) -> VerifyReport:
    """Re-read every shard: existence, sha256, sample count, that every sample decodes to the manifest's shape."""
    whole = load_manifest(manifest_url)
    faults, seen = [], 0
    want = (whole.image_size[0], whole.image_size[1], whole.channels)
    every = [
        (m, i)
        for m in (whole, whole.split("validation") if whole.validation else None)
        if m
        for i in range(len(m.shards))
    ]
    for m, i in tqdm(every, desc="verifying", unit="shard", disable=not progress):
        info = m.shards[i]
        url = m.shard_url(i)
        if not storage.exists(url):
            faults.append(f"{info.url}: missing")
            continue
        data = storage.read_bytes(url)
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            faults.append(f"{info.url}: sha256 mismatch (manifest {info.sha256[:12]}..., file {digest[:12]}...)")
        count = 0
        try:
            for sample in iter_tar_samples(data, url):
                count += 1
                try:
                    decode_image(sample, want)
                    decode_label(sample, m.num_classes)
                except Exception as e:  # noqa: BLE001 - any decode failure is a fault to report
                    faults.append(
                        f"{info.url}: sample {show(sample['__key__'])} does not decode "
                        f"({type(e).__name__}: {one_line(e)})"
                    )
        except ShardError as e:
            faults.append(f"{info.url}: unreadable tar after {count} samples ({one_line(e)})")
        if count != info.num_samples:
            faults.append(f"{info.url}: {count} samples, manifest says {info.num_samples}")
        if info.index:
            idx_url = m.index_url(i)
            if not storage.exists(idx_url):
                faults.append(f"{info.index}: missing")
            else:
                try:
                    if parse_json(storage.read_bytes(idx_url)) != tar_index(data, url):
                        faults.append(f"{info.index}: does not match the tar")
                except ValueError as e:  # ShardError included
                    faults.append(f"{info.index}: unreadable ({one_line(e)})")
        seen += count
    return VerifyReport(faults, seen)


def read_all(manifest_url: str, limit: Optional[int] = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """All (or the first `limit`) images and labels of one split in manifest order: for inspection, tests and
    references ("held-out": the validation split when the manifest has one, else the training images)."""
    m = load_manifest(manifest_url)
    m = m.split(m.held_out() if split == "held-out" else split)
    want = (m.image_size[0], m.image_size[1], m.channels)
    images, labels = [], []
    for i in range(len(m.shards)):
        for sample in iter_tar_samples(storage.read_bytes(m.shard_url(i)), m.shard_url(i)):
            images.append(decode_image(sample, want))
            labels.append(decode_label(sample, m.num_classes))
            if limit and len(images) >= limit:
                return np.stack(images), np.array(labels)
    return np.stack(images), np.array(labels)
