"""What the fuzz tests share: a small genuine data set, tar builders for odd members, and the checks every
example ends in (success, or the documented error class with one bounded line, in bounded time and memory)."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import tarfile
import time
import tracemalloc

import numpy as np
from hypothesis import HealthCheck, settings

from ddpm_dist.data import DataError, Layout, TrainStream, build_shards
from ddpm_dist.data.sources import iter_numpy

MAX_MESSAGE = 500
MAX_PEAK = 48 << 20  # Python-visible bytes (numpy included) any one example may allocate
MAX_SECONDS = 3.0  # one example, wall clock (they take milliseconds; the margin is for a loaded CI machine)
SHAPE = (8, 8, 3)
NUM_CLASSES = 5


def fuzz(n: int):
    """Derandomized, no example database, no deadline (time is checked by `bounded`)."""
    return settings(
        max_examples=n, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and len(msg) < MAX_MESSAGE, (type(e).__name__, msg[:1000])
    return msg


@contextlib.contextmanager
def within(seconds: float):
    """A TimeoutError if the block runs longer (a hang becomes a failure, not a stuck CI job)."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def bounded(peak: int = MAX_PEAK, seconds: float = MAX_SECONDS):
    """The block finishes in `seconds` and its Python allocations (numpy's too) peak below `peak` bytes."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with within(seconds):
            yield
    finally:
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert top < peak, f"allocated {top} bytes"
    assert time.perf_counter() - t0 < seconds


def expect(fn, errors: tuple):
    """fn()'s result, or None when it raised one of `errors` with a one-line message. Anything else fails."""
    try:
        return fn()
    except errors as e:
        one_line(e)
        return None


def build_dataset(out: str, fmt: str = "png", n: int = 12, per_shard: int = 6):
    rng = np.random.default_rng(0)
    path = f"{out}.npz"
    np.savez(path, images=rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), labels=np.arange(n) % NUM_CLASSES)
    return build_shards(
        iter_numpy(path),
        out,
        samples_per_shard=per_shard,
        image_format=fmt,
        progress=False,
        shuffle_seed=None,
        overwrite=True,
    )


def read_stream(manifest, batches: int = 3, batch: int = 2) -> list:
    """Up to `batches` batches of a TrainStream over `manifest` (checked: shapes, labels in range)."""
    stream = TrainStream(
        manifest, rank=0, layout=Layout(1, batch, 0), seed=0, max_skip_fraction=1.0, buffer_bytes=1 << 20
    )
    out = []
    for b in stream:
        assert tuple(b["image"].shape) == (batch, manifest.channels, *manifest.image_size)
        assert ((b["label"] == -1) | ((b["label"] >= 0) & (b["label"] < max(manifest.num_classes, 1)))).all()
        out.append(b)
        if len(out) == batches:
            break
    return out


def stream_or_error(manifest, batches: int = 3) -> list | None:
    return expect(lambda: read_stream(manifest, batches), (DataError,))


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]], fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def header(name: str, size: int, type_=tarfile.REGTYPE, fmt=tarfile.GNU_FORMAT) -> bytes:
    """One raw header block, whatever its claimed size (GNU base-256 numbers above 8 GB)."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, type_
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def fix_checksum(block: bytearray) -> bytearray:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])
    return block


def gnu_sparse(name: str, realsize: int, stored: bytes) -> bytes:
    """A GNU sparse member ('S'): `stored` bytes placed at the end of a `realsize`-byte file of zeros."""
    block = bytearray(header(name, len(stored)))
    block[156:157] = tarfile.GNUTYPE_SPARSE
    block[386:398] = b"%011o\0" % (realsize - len(stored))
    block[398:410] = b"%011o\0" % len(stored)
    block[483:495] = b"%011o\0" % realsize
    padded = stored + b"\0" * (-len(stored) % 512)
    return bytes(fix_checksum(block)) + padded + b"\0" * 1024


def write_json(path, doc) -> None:
    with open(path, "w") as f:
        json.dump(doc, f)
