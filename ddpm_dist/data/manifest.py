"""The manifest (shard urls, counts, bytes, sha256) and the per-shard index: read from untrusted storage, so
every field is type- and range-checked before anything is planned or fetched. A fault is a ShardError with
a one-line message naming the file and what was expected."""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import reprlib
from dataclasses import dataclass, field
from typing import Optional

from . import storage

MANIFEST_NAME = "manifest.json"
FORMAT = "ddpm_dist.shards/1"
MIN_SAMPLE_BYTES = 1024  # a tar header and one data block: no sample takes fewer bytes of a shard
MAX_SAMPLE_BYTES = 64 << 20  # a tar member or index entry larger than this is refused, never read
MAX_IMAGE_SIDE = 1 << 14
MAX_LABEL = 1 << 31  # labels are non-negative decimal integers below this (below num_classes when known)
SPLITS = ("train", "validation")
_SHARD_KEYS = {"url": str, "num_samples": int, "bytes": int, "sha256": str, "index": str}
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel, _short.maxlist, _short.maxdict = 2, 4, 4


class ShardError(ValueError):
    pass


def show(value) -> str:
    """A bounded, one-line repr of untrusted data for an error message (never the whole value)."""
    return _short.repr(value)


@dataclass
class ShardInfo:
    url: str  # relative to the manifest's folder unless absolute
    num_samples: int
    bytes: int
    sha256: str
    index: str = ""  # sidecar "<url>.idx.json": where each sample's files lie in the tar (optional)


@dataclass
class Manifest:
    shards: list[ShardInfo]
    image_size: list[int]  # [H, W]
    channels: int
    num_classes: int
    image_format: str = "png"
    base: str = ""  # where the manifest was read from (not saved)
    extra: dict = field(default_factory=dict)
    validation: list[ShardInfo] = field(default_factory=list)  # held out: never in the training stream

    def split(self, name: str) -> "Manifest":
        """The same manifest with `shards` = one split's shards (train: the training stream's)."""
        if name not in SPLITS:
            raise ShardError(f"split '{name}' is not one of {', '.join(SPLITS)}")
        if name == "train":
            return self
        if not self.validation:
            raise ShardError("the manifest has no validation split (build it with `shards build --val-fraction F`)")
        return Manifest(self.validation, self.image_size, self.channels, self.num_classes, self.image_format,
                        self.base, self.extra)

    def held_out(self) -> str:
        """The split that evaluation on unseen images reads: validation when the manifest has one."""
        return "validation" if self.validation else "train"

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def shard_url(self, i: int) -> str:
        return storage.join(self.base, self.shards[i].url)

    def index_url(self, i: int) -> str:
        return storage.join(self.base, self.shards[i].index) if self.shards[i].index else ""

    def to_json(self) -> str:
        held_out = {"validation_samples": sum(s.num_samples for s in self.validation),
                    "validation": [vars(s) for s in self.validation]} if self.validation else {}
        return json.dumps({
            "format": FORMAT, "num_samples": self.num_samples, "image_size": self.image_size,
            "channels": self.channels, "num_classes": self.num_classes, "image_format": self.image_format,
            "shards": [vars(s) for s in self.shards], **held_out, **self.extra,
        }, indent=1)

    def checksum(self) -> str:
        return hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value, what: str, low: int, high: int) -> int:
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"{what}: expected an integer in [{low}, {high}], got {show(value)}")
    return value


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection while a large tree is built: JSON makes no cycles, and collections that
    scan every live object (torch's modules among them) made a 21,000-entry index take 5x longer to parse."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_json(data: bytes):
    """JSON from untrusted bytes; any fault (encoding, syntax, nesting, a 5000-digit number) is a ValueError."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _shard(entry, where: str) -> ShardInfo:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {show(entry)}")
    unknown = set(entry) - set(_SHARD_KEYS)
    if unknown or not {"url", "num_samples", "bytes", "sha256"} <= set(entry):
        raise ValueError(f"{where}: expected keys url, num_samples, bytes, sha256 (index), got {show(sorted(entry))}")
    for key, kind in _SHARD_KEYS.items():
        if key in entry and not (is_int(entry[key]) if kind is int else isinstance(entry[key], kind)):
            raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {show(entry[key])}")
    info = ShardInfo(**entry)
    if not info.url:
        raise ValueError(f"{where}.url is empty")
    _int(info.bytes, f"{where}.bytes", 0, 1 << 62)
    _int(info.num_samples, f"{where}.num_samples", 0, info.bytes // MIN_SAMPLE_BYTES)
    return info


def parse_manifest(data: bytes, base: str = "") -> Manifest:
    """A Manifest from JSON bytes, every field checked (a ValueError names the first bad one)."""
    doc = parse_json(data)
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {show(doc)}")
    missing = {"shards", "image_size", "channels"} - set(doc)
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")
    if not isinstance(doc["shards"], list) or not doc["shards"]:
        raise ValueError(f"shards: expected a non-empty list, got {show(doc['shards'])}")
    shards = [_shard(s, f"shards[{i}]") for i, s in enumerate(doc["shards"])]
    validation = doc.get("validation", [])
    if not isinstance(validation, list):
        raise ValueError(f"validation: expected a list, got {show(validation)}")
    validation = [_shard(s, f"validation[{i}]") for i, s in enumerate(validation)]
    size = doc["image_size"]
    if not isinstance(size, list) or len(size) != 2:
        raise ValueError(f"image_size: expected [height, width], got {show(size)}")
    size = [_int(v, "image_size", 1, MAX_IMAGE_SIDE) for v in size]
    channels = _int(doc["channels"], "channels", 1, 4)
    num_classes = _int(doc.get("num_classes", 0), "num_classes", 0, MAX_LABEL)
    fmt = doc.get("image_format", "png")
    if not isinstance(fmt, str):
        raise ValueError(f"image_format: expected a string, got {show(fmt)}")
    extra = {k: v for k, v in doc.items() if k not in ("format", "num_samples", "image_size", "channels", "num_classes",
                                                         "image_format", "shards", "validation", "validation_samples")}
    return Manifest(shards, size, channels, num_classes, fmt, base, extra, validation)


def load_manifest(url: str) -> Manifest:
    if not storage.exists(url):
        raise ShardError(f"manifest '{storage.redact(url)}' does not exist{storage.missing_hint(url)}")
    try:
        return parse_manifest(storage.read_bytes(url), storage.dirname(url))
    except ValueError as e:
        raise ShardError(f"manifest '{storage.redact(url)}' is not a ddpm_dist manifest ({one_line(e)})") from None


def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def index_json(index: list) -> bytes:
    """A shard's index as `shards build` writes it: a JSON list, one entry per line. JSON strings cannot hold a raw
    newline, so the lines are the entries, and a reader that needs a few samples parses only their lines."""
    return ("[\n" + ",\n".join(json.dumps(entry, separators=(",", ":")) for entry in index) + "\n]").encode()


def parse_index(data: bytes, url: str, num_samples: int, shard_bytes: int,
                span: Optional[tuple[int, int]] = None) -> list:
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
        raise ShardError(f"index '{storage.redact(url)}': expected a list of {num_samples} entries (the manifest's "
                         f"count), got {got}")
    return index


def _check_index(index: list, url: str, num_samples: int, shard_bytes: int, first: int) -> list:
    """Entries first.. of a shard's index checked; a list of num_samples with None where nothing was parsed."""
    where = f"index '{storage.redact(url)}'"
    out, total = [None] * first, 0
    for i, entry in enumerate(index, first):  # exact types (JSON makes no subclasses; bool is no int): a hot loop
        if not (type(entry) is list and len(entry) == 2 and type(entry[0]) is str and type(entry[1]) is dict
                and entry[1]):
            raise ShardError(f"{where}: entry {i} is not [key, {{ext: [offset, size]}}]: {show(entry)}")
        used = end = 0
        for ext, span in entry[1].items():
            if not (type(span) is list and len(span) == 2 and type(span[0]) is int and type(span[1]) is int
                    and span[0] >= 0 and 0 <= span[1] <= MAX_SAMPLE_BYTES):
                raise ShardError(f"{where}: entry {i} file {show(ext)}: expected [offset >= 0, size <= "
                                 f"{MAX_SAMPLE_BYTES}], got {show(span)}")
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
