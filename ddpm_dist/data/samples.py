"""Samples out of untrusted tars: members, the per-shard index of a tar, and decoding a sample's image and
label. Plain uncompressed tars only; a member larger than MAX_SAMPLE_BYTES, a sparse member or a compressed
tar ends the read with a one-line ShardError, an image is checked against the expected shape before it is
decoded."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import re
import tarfile
from typing import Iterator, Optional

import numpy as np
import webdataset as wds

from ..images import decode_image as decode_bytes
from . import storage
from .manifest import MAX_LABEL, MAX_SAMPLE_BYTES, ShardError, one_line, show
from .resize import RESIZE_MODES, fit_array, fit_image, open_image  # noqa: F401 - RESIZE_MODES re-exported

_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
MAX_HEADER_BYTES = 16 << 10  # a pax header or long name: real ones are a few hundred bytes
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped like webdataset does


class _TarInfo(tarfile.TarInfo):
    """tarfile's member header, sparse members refused (a few KB of sparse map inflate to any size), and so
    are extended headers (pax, GNU long names) over MAX_HEADER_BYTES (tarfile parses them whole)."""

    def _proc_member(self, tarfile_):
        if self.type in _EXTENDED and self.size > MAX_HEADER_BYTES:
            raise tarfile_error(f"an extended header of {self.size} bytes")
        return super()._proc_member(tarfile_)

    def _proc_sparse(self, tarfile_):
        raise tarfile_error("a sparse member")

    def _proc_gnusparse_00(self, *args):
        raise tarfile_error("a sparse member")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def tarfile_error(what: str) -> tarfile.ReadError:
    return tarfile.ReadError(f"{what} (not supported)")


def check_uncompressed(head: bytes, url: str = "") -> None:
    """A compressed tar is refused up front: shards are plain tars (byte ranges address them)."""
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise ShardError(f"shard '{storage.redact(url)}' is {kind}-compressed: shards must be uncompressed tars")


def _members(stream, url: str, read: bool = True) -> Iterator[tuple[tarfile.TarInfo, Optional[bytes]]]:
    """(member, data of a regular file or None) in tar order, sizes checked before anything is read or skipped.
    Without `read`, data is skipped (None)."""
    tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_TarInfo)
    for member in tar:
        if member.size > MAX_SAMPLE_BYTES:  # checked before the stream reads or skips that many bytes
            raise ShardError(
                f"shard '{storage.redact(url)}': member {show(member.name)} claims {member.size} bytes, "
                f"more than the {MAX_SAMPLE_BYTES} a sample file may have"
            )
        regular = member.type in (tarfile.REGTYPE, tarfile.AREGTYPE)
        yield member, tar.extractfile(member).read() if regular and read else None
        tar.members = []  # stream mode: keep no member list


def _files(stream, url: str) -> Iterator[dict]:
    for member, data in _members(stream, url):
        if data is not None and not _META.match(member.name):
            yield {"fname": member.name, "data": data, "__url__": url}


def iter_tar_samples(data, url: str = "") -> Iterator[dict]:
    """Samples of one tar (its bytes, or a binary stream read front to back), grouped by key as webdataset
    does. A damaged tar ends in a ShardError after the samples before the damage."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    head = stream.read(6)
    check_uncompressed(head, url)
    with _tar_faults(url):
        yield from wds.tariterators.group_by_keys(_files(Prefixed(head, stream), url))


@contextlib.contextmanager
def _tar_faults(url: str):
    """What tarfile and webdataset raise on a damaged tar, as one ShardError line."""
    try:
        yield
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, ValueError, IndexError, OverflowError) as e:
        raise ShardError(f"shard '{storage.redact(url)}' is not a readable tar ({one_line(e)})") from None


class Prefixed:
    """A read-only stream with bytes already read put back in front."""

    def __init__(self, head: bytes, rest):
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.rest.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.rest.read(n - len(out)) if n > len(out) else b"")


class HashingStream:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:  # the tar reader stops at the end marker: hash the padding after it too
        while self.read(1 << 20):
            pass


def tar_index(data: bytes, url: str = "") -> list:
    """[[key, {ext: [offset, size]}], ...] in tar order, read with the standard tarfile module. It lets the
    stream slice samples out of a shard instead of re-parsing every tar header (half the read time)."""
    index, by_key = [], {}
    check_uncompressed(bytes(data[:6]), url)
    with _tar_faults(url):
        for member, _ in _members(io.BytesIO(data), url, read=False):
            key, ext = wds.tariterators.base_plus_ext(member.name)
            if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or key is None:
                continue
            if key not in by_key:
                by_key[key] = {}
                index.append([key, by_key[key]])
            by_key[key][ext] = [member.offset_data, member.size]
    return index


_NPY_HEADERS: dict[bytes, tuple] = {}  # header bytes -> (dims, data offset): the images of a data set share one


def _npy_header(raw: bytes) -> tuple[tuple, int]:
    """(dims, data offset) of uint8 C-order .npy bytes, checked; numpy's header parser (a literal_eval, half a
    sample's decode time) runs once per distinct header."""
    head = bytes(raw[: 10 + int.from_bytes(raw[8:10], "little")]) if bytes(raw[6:8]) == b"\x01\x00" else None
    if head is not None and head in _NPY_HEADERS:
        return _NPY_HEADERS[head]
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"npy version {version} is not supported")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    dims, fortran, dtype = read(f)
    if dtype != np.uint8 or fortran or len(dims) not in (2, 3):
        raise ValueError(f"npy holds {dtype} {dims} (fortran order: {fortran}), expected uint8 HWC")
    parsed = (tuple(dims), f.tell())
    if head is not None and len(head) == parsed[1] and len(_NPY_HEADERS) < 64:
        _NPY_HEADERS[head] = parsed
    return parsed


def _npy(raw: bytes, shape: Optional[tuple]) -> np.ndarray:
    """uint8 HWC/HW from .npy bytes, the header checked before anything is allocated (never np.load: it
    allocates what the header claims)."""
    dims, offset = _npy_header(raw)
    if shape is not None and dims not in (tuple(shape), tuple(shape[:2])):
        raise ValueError(f"npy shape {dims} is not the expected {tuple(shape)}")
    if math.prod(dims) != len(raw) - offset:
        raise ValueError(f"npy shape {dims} does not match its {len(raw) - offset} data bytes")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims).copy()


def decode_image(sample: dict, shape: Optional[tuple] = None) -> np.ndarray:
    """uint8 HWC from a sample's png/jpg/npy bytes; a ShardError (one line) for anything undecodable. With
    `shape` (H, W, C) an image of another size is refused from its header, before it is decoded."""
    key = next((k for k in ("npy", "png", "jpg", "jpeg", "webp") if k in sample), None)
    if key is None:
        raise ShardError(f"sample {show(sample.get('__key__'))} has no image (keys: {show(sorted(sample))})")
    try:
        if key == "npy":
            img = _npy(sample["npy"], shape)  # bytes or a view into a block's buffer
        else:
            img = decode_bytes(sample[key], None if shape is None else tuple(shape[:2]))
    except Exception as e:  # noqa: BLE001 - PIL and numpy's header parser raise many types (OSError, SyntaxError, ...)
        raise ShardError(
            f"sample {show(sample.get('__key__'))}: {key} does not decode ({type(e).__name__}: {one_line(e)})"
        ) from None
    if img.ndim == 2:
        img = img[:, :, None]
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ShardError(f"sample {show(sample.get('__key__'))}: expected uint8 HWC, got {img.dtype} {img.shape}")
    return img


def decode_for_training(sample: dict, shape: tuple, resize: str, crop_seed: int) -> np.ndarray:
    """uint8 HWC of exactly `shape` (H, W, C) from a sample's png/jpg/webp/npy bytes, resized by `resize` (one of
    RESIZE_MODES; resize.py says how). `none` is the exact-size path (decode_image: another size is refused from
    the header). Otherwise any size is taken: the header's size is checked against MAX_IMAGE_SIDE and the
    decompression-bomb limit before a pixel is decoded, the image converted to C channels (L, LA, RGB, RGBA) and
    fitted; `random_crop` crops where `crop_seed` says. A ShardError (one line) for anything undecodable."""
    shape = tuple(int(v) for v in shape)
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize {resize!r} is not one of {', '.join(RESIZE_MODES)}")
    if resize == "none":
        img = decode_image(sample, shape)
        if img.shape != shape:
            raise ShardError(f"sample {show(sample.get('__key__'))}: image {img.shape} is not the expected {shape}")
        return img
    key = next((k for k in ("npy", "png", "jpg", "jpeg", "webp") if k in sample), None)
    if key is None:
        raise ShardError(f"sample {show(sample.get('__key__'))} has no image (keys: {show(sorted(sample))})")
    try:
        if key == "npy":
            return fit_array(_npy(sample["npy"], None), shape, resize, crop_seed)
        with open_image(sample[key]) as im:
            return fit_image(im, shape, resize, crop_seed)
    except Exception as e:  # noqa: BLE001 - PIL and numpy's header parser raise many types (OSError, SyntaxError, ...)
        raise ShardError(
            f"sample {show(sample.get('__key__'))}: {key} does not decode ({type(e).__name__}: {one_line(e)})"
        ) from None


def decode_label(sample: dict, num_classes: int = 0) -> int:
    """The `cls` label: a decimal integer in [0, num_classes) (below MAX_LABEL when the count is unknown);
    -1 when the sample has none."""
    if "cls" not in sample:
        return -1
    text = bytes(sample["cls"])[:32].strip()
    limit = num_classes or MAX_LABEL
    if not (text.isdigit() and len(sample["cls"]) <= 32 and int(text) < limit):
        raise ShardError(
            f"sample {show(sample.get('__key__'))}: label {show(bytes(sample['cls'])[:40])} is not an "
            f"integer in [0, {limit})"
        )
    return int(text)
