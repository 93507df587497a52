"""The per-shard index: where each sample's files sit in its tar ([[key, {ext: [offset, size]}], ...]). Read from
untrusted storage like the manifest, so every entry is type- and range-checked against the manifest's count and the
shard's real size before a byte range is requested; a fault is a ShardError naming the file."""

from __future__ import annotations

import json
from typing import Optional

from . import storage
from .manifest import MAX_SAMPLE_BYTES, ShardError, gc_paused, one_line, parse_json
from .shard_table import show


def index_json(index: list) -> bytes:
    """A shard's index as `shards build` writes it: a JSON list, one entry per line. JSON strings cannot hold a raw
    newline, so the lines are the entries, and a reader that needs a few samples parses only their lines."""
    return ("[\n" + ",\n".join(json.dumps(entry, separators=(",", ":")) for entry in index) + "\n]").encode()


def parse_index(
    data: bytes, url: str, num_samples: int, shard_bytes: int, span: Optional[tuple[int, int]] = None
) -> list:
    """A shard's index ([[key, {ext: [offset, size]}], ...], one entry per sample) checked against the
    manifest's count and the shard's real size: sizes at most MAX_SAMPLE_BYTES, files that do not overlap
    (together no more than the shard). An entry past the end of a truncated shard becomes [key, None]: that
    sample is unreadable (skipped and counted), the request never leaves the object.

    With `span` (lo, hi) and an index written one entry per line (index_json), only entries lo..hi-1 are parsed
    and checked, the others are None: a worker whose run holds the last 8 samples of a 21,000-sample shard
    parsed all of it (60 ms) for them. Any other layout is parsed whole."""
    with gc_paused():
        lines = _entry_lines(data, num_samples) if span is not None else None
        if lines is None:
            return _check_index(_parse_whole(data, url, num_samples), url, num_samples, shard_bytes, 0)
        lo, hi = max(0, span[0]), min(num_samples, span[1])
        part = _load(b"[" + b"\n".join(lines[lo:hi]).rstrip(b",") + b"]", url)
        if not isinstance(part, list) or len(part) != hi - lo:
            raise ShardError(f"index '{storage.redact(url)}': lines {lo + 1}-{hi} do not hold {hi - lo} entries")
        return _check_index(part, url, num_samples, shard_bytes, lo)


def _entry_lines(data: bytes, num_samples: int) -> Optional[list[bytes]]:
    """The entry lines of an index written by index_json (lines[i] is entry i), else None."""
    if not data.startswith(b"[\n") or data.count(b"\n") != num_samples + 1:
        return None
    lines = data.split(b"\n")
    return lines[1:-1] if lines[-1] == b"]" else None


def _load(data: bytes, url: str):
    try:
        return parse_json(data)
    except ValueError as e:
        raise ShardError(f"index '{storage.redact(url)}' is not JSON ({one_line(e)})") from None


def _parse_whole(data: bytes, url: str, num_samples: int) -> list:
    index = _load(data, url)
    if not isinstance(index, list) or len(index) != num_samples:
        got = f"{len(index)} entries" if isinstance(index, list) else show(index)
        raise ShardError(
            f"index '{storage.redact(url)}': expected a list of {num_samples} entries (the manifest's count), got {got}"
        )
    return index


def _check_index(index: list, url: str, num_samples: int, shard_bytes: int, first: int) -> list:
    """Entries first.. of a shard's index checked; a list of num_samples with None where nothing was parsed."""
    where = f"index '{storage.redact(url)}'"
    out, total = [None] * first, 0
    for i, entry in enumerate(index, first):  # exact types (JSON makes no subclasses; bool is no int): a hot loop
        if not (
            type(entry) is list and len(entry) == 2 and type(entry[0]) is str and type(entry[1]) is dict and entry[1]
        ):
            raise ShardError(f"{where}: entry {i} is not [key, {{ext: [offset, size]}}]: {show(entry)}")
        used = end = 0
        for ext, span in entry[1].items():
            if not (
                type(span) is list
                and len(span) == 2
                and type(span[0]) is int
                and type(span[1]) is int
                and span[0] >= 0
                and 0 <= span[1] <= MAX_SAMPLE_BYTES
            ):
                raise ShardError(
                    f"{where}: entry {i} file {show(ext)}: expected [offset >= 0, size <= "
                    f"{MAX_SAMPLE_BYTES}], got {show(span)}"
                )
            used += span[1]
            end = max(end, span[0] + span[1])
        if end <= shard_bytes:
            total += used
            out.append(entry)
        else:
            out.append([entry[0], None])
    out += [None] * (num_samples - len(out))
    if total > shard_bytes:
        raise ShardError(f"{where}: its files overlap ({total} bytes listed in a {shard_bytes}-byte shard)")
    return out
