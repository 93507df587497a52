"""Raw samples of one shard, block by block, holding only one block's bytes.

A block is a sorted run of sample positions in one shard (the plan's unit of shuffling, sized so its bytes
fit data.shard_buffer_mb). With the shard's index the wanted samples are fetched by byte range, one request
per contiguous run of samples (tar headers and small holes are read through rather than split on); a foreign
tar without an index is streamed front to back once per visit, keeping only the wanted samples.

A sample's files are views into its request's buffer, not copies: a block's bytes are resident once, and go
when the block's last sample is decoded."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import fsspec
import numpy as np

from . import storage
from .samples import check_uncompressed, iter_tar_samples

log = logging.getLogger(__name__)
MERGE_GAP = 64 * 1024  # read through holes this small (and no larger than the sample after them) in one request
# Requests stay under glibc's 32 MiB mmap ceiling: a buffer that size is reused from the heap, while a larger one is
# mapped and page-faulted in anew each time (1.9 vs 12 GB/s measured for 60 vs 30 MB reads from the page cache).
MAX_REQUEST_BYTES = 16 << 20


def sample_span(files: dict) -> tuple[int, int]:
    """[start, end) of a sample's file data in the tar, from its index entry {ext: [offset, size]}."""
    return min(off for off, _ in files.values()), max(off + size for off, size in files.values())


def byte_runs(
    index: list, positions: Iterable[int], max_gap: int = MERGE_GAP, max_bytes: int = MAX_REQUEST_BYTES
) -> list[tuple[int, int, list[int]]]:
    """(start, end, positions) per request: sorted positions merged while the hole between them is small (at most
    max_gap, and at most the next sample's own span or 4 KB: what is read through never outweighs what is
    wanted) and the request stays within max_bytes. Positions whose entry is None (past the end of a truncated
    shard, see member_index.parse_index) are left out."""
    runs: list[tuple[int, int, list[int]]] = []
    for p in sorted(positions):
        if index[p][1] is None:
            continue
        start, end = sample_span(index[p][1])
        if runs and start - runs[-1][1] <= min(max_gap, max(end - start, 4096)) and end - runs[-1][0] <= max_bytes:
            runs[-1][2].append(p)
            runs[-1] = (runs[-1][0], max(end, runs[-1][1]), runs[-1][2])
        else:
            runs.append((start, end, [p]))
    return runs


def _indexed_blocks(url: str, index: list, blocks: list[np.ndarray]) -> Iterator[dict[int, dict]]:
    for block in blocks:
        out: dict[int, dict] = {}
        for start, end, members in byte_runs(index, block.tolist()):
            try:
                data = memoryview(storage.read_range(url, start, end))
            except (FileNotFoundError, storage.StorageError):
                raise
            except Exception as e:  # noqa: BLE001 - e.g. a range past a truncated object: those samples are corrupt
                log.warning("shard %s: bytes %d-%d unreadable: %s", storage.redact(url), start, end, e)
                continue
            for p in members:
                key, files = index[p]
                sample = {"__key__": key}
                for ext, (off, size) in files.items():
                    sample[ext] = data[off - start : off - start + size]
                out[p] = sample
        data = None
        yield out


def _streamed_blocks(url: str, blocks: list[np.ndarray]) -> Iterator[dict[int, dict]]:
    """One pass over the tar; a truncated or unreadable tar ends the pass (what is missing counts as corrupt)."""
    with storage.translated(url), fsspec.open(url, "rb") as f:
        check_uncompressed(f.read(6), url)  # a compressed shard is refused, not counted as corrupt samples
        f.seek(0)
        samples = enumerate(iter_tar_samples(f, url))
        done = False
        for block in blocks:
            wanted, out = set(block.tolist()), {}
            last = max(wanted)
            while not done:
                try:
                    i, sample = next(samples)
                except StopIteration:
                    done = True
                    break
                except Exception as e:  # noqa: BLE001 - a damaged tar
                    log.warning("shard %s unreadable after some samples: %s", storage.redact(url), e)
                    done = True
                    break
                if i in wanted:
                    out[i] = sample
                if i >= last:
                    break
            yield out


def read_blocks(url: str, index: list | None, blocks: list[np.ndarray]) -> Iterator[dict[int, dict]]:
    """For each block (ascending, disjoint sorted position arrays), {position: raw sample} of the samples that
    could be read; missing positions are unreadable samples."""
    if index is not None:
        return _indexed_blocks(url, index, blocks)
    return _streamed_blocks(url, blocks)
