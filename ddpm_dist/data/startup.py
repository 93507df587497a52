"""The start-up check of a job's shards: every shard exists and can hold the samples the manifest claims, checked
once per job and split across the ranks, in O(shards / world) requests per rank.

Rank r stats only its contiguous slice [r*S//world, (r+1)*S//world) of the S shards, concurrently (a bounded
thread pool), one request per shard (a HEAD on an object store), and writes what it found into an int64 array of
S zeros; one collective (`share`, a sum across the ranks, injected by the caller: data/ does not import parallel/)
gives every rank every shard's verdict, and every rank raises the same one-line DataError, or none, before any
step. The slices are disjoint, so the sum is each shard's owner's entry:

    0            not checked: its owner failed (that rank raises its own error, the others name the shard)
    1            checked, does not exist
    size + 2     checked, `size` bytes
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence, Union

import fsspec
import numpy as np

from . import storage
from .errors import DataError
from .manifest import MIN_SAMPLE_BYTES

log = logging.getLogger(__name__)

UNCHECKED, MISSING, PRESENT = 0, 1, 2  # a present shard is PRESENT + its size

Urls = Union[Callable[[int], str], Sequence[str]]


def slice_of(rank: int, world: int, num_shards: int) -> range:
    """The shards rank `rank` checks: a contiguous slice, sizes differ by at most one across ranks."""
    return range(rank * num_shards // world, (rank + 1) * num_shards // world)


def owner_of(shard: int, world: int, num_shards: int) -> int:
    """The rank whose slice holds `shard` (the inverse of slice_of)."""
    return int(((shard + 1) * world - 1) // num_shards)


def stat_size(url: str) -> Optional[int]:
    """The object's size in bytes, or None when it does not exist: exactly one request on S3 (a HEAD object;
    s3fs's own info() lists the prefix after a 404 to tell a directory, and may answer from its listing cache).
    A directory is not a shard: None. Failures the user can fix become a one-line StorageError."""
    with storage.translated(url):
        fs, path = fsspec.core.url_to_fs(url)
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if "s3" in protocols and hasattr(fs, "call_s3"):
            bucket, key, version = fs.split_path(path)
            if not key:
                return None
            try:
                head = fs.call_s3(
                    "head_object", fs.kwargs, Bucket=bucket, Key=key, **({"VersionId": version} if version else {})
                )
            except FileNotFoundError:
                return None
            return int(head["ContentLength"])
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
        return None if info.get("type") == "directory" else int(info["size"])


def _url_getter(urls) -> Callable[[int], str]:
    if hasattr(urls, "shard_url"):
        return urls.shard_url
    if callable(urls):
        return urls
    return urls.__getitem__


def check_shards(
    urls: Urls,
    counts: np.ndarray,
    rank: int = 0,
    world: int = 1,
    share: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    threads: int = 16,
) -> np.ndarray:
    """Every shard's real size in bytes (int64, one per shard), the same on every rank, after checking that each
    exists and holds its claimed `counts[i]` samples (at least MIN_SAMPLE_BYTES each).

    `urls` is shard i's URL as `urls(i)`, `urls[i]` or `urls.shard_url(i)` (a manifest). This rank stats only its slice
    (`slice_of`) with at most `threads` requests in flight; `share(array)` must return the elementwise sum of the int64
    arrays of all `world` ranks (one collective: ddpm_dist.parallel.collectives.sum_across_ranks), and every rank must
    call this function. With share=None this is one process: rank 0 of world 1. Raises, on every rank alike, a one-line
    DataError for the first missing shard, else for the first too-small one; a rank whose own requests failed
    (credentials, endpoint) raises its own error after the collective, so no rank is left waiting in it."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    num_shards = len(counts)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if share is None and world != 1:
        raise ValueError(f"checking shards on {world} ranks needs `share` (a sum across the ranks)")
    url_of = _url_getter(urls)
    mine = slice_of(rank, world, num_shards)
    found = np.zeros(num_shards, dtype=np.int64)
    failure: Optional[BaseException] = None
    t0 = time.perf_counter()

    def stat(i: int) -> None:
        size = stat_size(url_of(i))
        found[i] = MISSING if size is None else PRESENT + size

    if len(mine):
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(mine))), thread_name_prefix="shard-check") as pool:
            for future in [pool.submit(stat, i) for i in mine]:
                error = future.exception()  # a failed shard stays UNCHECKED; the first failure is this rank's error
                if error is not None and failure is None:
                    failure = error
    verdict = found if share is None else np.asarray(share(found), dtype=np.int64).reshape(-1)
    if verdict.shape != (num_shards,):
        raise ValueError(f"`share` returned shape {verdict.shape}, expected ({num_shards},)")
    if failure is not None:
        raise failure
    if rank == 0:
        log.info(
            "checked %d shards on %d ranks (%d here) in %.2f s", num_shards, world, len(mine), time.perf_counter() - t0
        )
    _raise_for(verdict, counts, url_of, world)
    return verdict - PRESENT


def _raise_for(verdict: np.ndarray, counts: np.ndarray, url_of: Callable[[int], str], world: int) -> None:
    """The one line every rank raises for the same verdict (nothing when every shard is fine)."""
    num_shards = len(verdict)
    unchecked = np.flatnonzero(verdict == UNCHECKED)
    if len(unchecked):
        first = int(unchecked[0])
        raise DataError(
            f"{len(unchecked)} shard(s) could not be checked, first '{storage.redact(url_of(first))}' "
            f"(rank {owner_of(first, world, num_shards)} failed to stat it; its own error says why)"
        )
    missing = np.flatnonzero(verdict == MISSING)
    if len(missing):
        url = url_of(int(missing[0]))
        # when nothing exists, say whether the bucket does (a request or two, on this failure path only)
        hint = storage.missing_hint(url) if len(missing) == num_shards else ""
        raise DataError(
            f"{len(missing)} shard(s) listed in the manifest do not exist, first '{storage.redact(url)}'{hint}"
        )
    sizes = verdict - PRESENT
    small = np.flatnonzero(counts > sizes // MIN_SAMPLE_BYTES)  # counts * MIN_SAMPLE_BYTES > sizes, no overflow
    if len(small):
        i = int(small[0])
        more = f" ({len(small)} such shards)" if len(small) > 1 else ""
        raise DataError(
            f"shard '{storage.redact(url_of(i))}' has {int(sizes[i])} bytes, too few for the "
            f"{int(counts[i])} samples the manifest claims (a sample takes at least "
            f"{MIN_SAMPLE_BYTES}){more}"
        )
