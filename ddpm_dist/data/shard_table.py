"""One split's shard list as columns: int64 `counts` and `sizes`, sha256 digests as an (n, 32) uint8 array, urls and
index urls each as one UTF-8 blob with int64 offsets (decoded per access). At 10^6 shards that is ~100 MB and no
Python object per shard; `ShardView` gives the small callers (inspect, verify, tests) ShardInfo rows on access.

Three ways in, each checking every field of untrusted input: `from_infos` (builders), `from_entries` (the JSON's list
of shard objects: one pass per column, the per-entry check only to name the first bad entry) and `from_arrays` (the
sidecar's arrays, range-checked vectorized with the same limits). A fault is a ValueError naming the field."""

from __future__ import annotations

import io
import re
import reprlib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

MIN_SAMPLE_BYTES = 1024  # a tar header and one data block: no sample takes fewer bytes of a shard
MAX_SHARD_BYTES = 1 << 62
_KEYS = {"url", "num_samples", "bytes", "sha256", "index"}
_REQUIRED = {"url", "num_samples", "bytes", "sha256"}
_HEX = re.compile(r"[0-9a-f]*")
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel, _short.maxlist, _short.maxdict = 2, 4, 4


def show(value) -> str:
    """A bounded, one-line repr of untrusted data for an error message (never the whole value)."""
    return _short.repr(value)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(eq=False)
class ShardInfo:
    url: str  # relative to the manifest's folder unless absolute
    num_samples: int
    bytes: int
    sha256: str  # 64 lowercase hex digits
    index: str = ""  # sidecar "<url>.idx.json": where each sample's files lie in the tar (optional)

    def __eq__(self, other):
        return isinstance(other, ShardInfo) and vars(self) == vars(other)


class _Row(ShardInfo):
    """A shard as a Manifest holds it: a copy, so an assignment would change nothing, and is refused instead."""

    def __init__(self, url: str, num_samples: int, bytes: int, sha256: str, index: str = ""):  # noqa: A002
        for name, value in zip(
            ("url", "num_samples", "bytes", "sha256", "index"), (url, num_samples, bytes, sha256, index)
        ):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return "ShardInfo" + super().__repr__()[len("_Row") :]

    def __setattr__(self, name, value):
        raise AttributeError(
            f"a manifest's shards are read-only (ShardInfo.{name}): make the changed ShardInfo with "
            "dataclasses.replace and a new manifest with Manifest.with_shards"
        )


def check_entry(entry, where: str) -> None:
    """One JSON shard object checked: a ValueError naming `where` and the field (the slow path: errors only)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {show(entry)}")
    if set(entry) - _KEYS or not _REQUIRED <= set(entry):
        raise ValueError(f"{where}: expected keys url, num_samples, bytes, sha256 (index), got {show(sorted(entry))}")
    for key in ("url", "num_samples", "bytes", "sha256", "index"):
        if key in entry and not (
            is_int(entry[key]) if key in ("num_samples", "bytes") else isinstance(entry[key], str)
        ):
            kind = "int" if key in ("num_samples", "bytes") else "str"
            raise ValueError(f"{where}.{key}: expected {kind}, got {show(entry[key])}")
    if not entry["url"]:
        raise ValueError(f"{where}.url is empty")
    if not 0 <= entry["bytes"] <= MAX_SHARD_BYTES:
        raise ValueError(f"{where}.bytes: expected an integer in [0, {MAX_SHARD_BYTES}], got {show(entry['bytes'])}")
    high = entry["bytes"] // MIN_SAMPLE_BYTES
    if not 0 <= entry["num_samples"] <= high:
        raise ValueError(f"{where}.num_samples: expected an integer in [0, {high}], got {show(entry['num_samples'])}")
    if len(entry["sha256"]) != 64 or not _HEX.fullmatch(entry["sha256"]):
        raise ValueError(f"{where}.sha256: expected 64 lowercase hex digits, got {show(entry['sha256'])}")


def _pack(strings: list) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 blob and n+1 offsets (surrogatepass: a JSON string may hold a lone surrogate)."""
    joined = "".join(strings)
    if joined.isascii():
        blob, lengths = joined.encode("ascii"), map(len, strings)
    else:
        encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
        blob, lengths = b"".join(encoded), map(len, encoded)
    offsets = np.zeros(len(strings) + 1, np.int64)
    np.cumsum(np.fromiter(lengths, np.int64, len(strings)), out=offsets[1:])
    return np.frombuffer(blob, np.uint8), offsets


def _digests(hexes: list) -> Optional[np.ndarray]:
    """(n, 32) uint8 digests of n strings of 64 lowercase hex digits, else None."""
    joined = "".join(hexes)
    if (hexes and set(map(len, hexes)) != {64}) or not _HEX.fullmatch(joined):
        return None
    return np.frombuffer(bytes.fromhex(joined), np.uint8).reshape(len(hexes), 32)


def _frozen(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.flags.writeable = False


class ShardTable:
    """The columns of one split (see the module docstring). Immutable: its arrays are read-only."""

    def __init__(
        self,
        counts: np.ndarray,
        sizes: np.ndarray,
        sha256: np.ndarray,
        urls: np.ndarray,
        url_offsets: np.ndarray,
        indexes: np.ndarray,
        index_offsets: np.ndarray,
    ):
        self.counts, self.sizes, self.sha256 = counts, sizes, sha256  # int64 (n,), int64 (n,), uint8 (n, 32)
        self.urls = urls
        self.url_offsets = url_offsets
        self.indexes = indexes
        self.index_offsets = index_offsets
        _frozen(counts, sizes, sha256, urls, url_offsets, indexes, index_offsets)  # uint8 blobs, int64 (n+1,) offsets

    def __len__(self) -> int:
        return len(self.counts)

    def url(self, i: int) -> str:
        return str(self.urls[self.url_offsets[i] : self.url_offsets[i + 1]], "utf-8", "surrogatepass")

    def index(self, i: int) -> str:
        return str(self.indexes[self.index_offsets[i] : self.index_offsets[i + 1]], "utf-8", "surrogatepass")

    def row(self, i: int) -> ShardInfo:
        return _Row(self.url(i), int(self.counts[i]), int(self.sizes[i]), self.sha256[i].tobytes().hex(), self.index(i))

    def hex_digests(self) -> str:
        """Every shard's sha256 in order, concatenated (what Manifest.checksum hashes)."""
        return self.sha256.tobytes().hex()

    @classmethod
    def from_columns(cls, urls: list, counts: list, sizes: list, hexes: list, indexes: list) -> "ShardTable":
        digests = _digests(hexes)
        if digests is None:
            raise ValueError("sha256: expected 64 lowercase hex digits per shard")
        return cls(
            np.array(counts, np.int64).reshape(-1),
            np.array(sizes, np.int64).reshape(-1),
            digests,
            *_pack(urls),
            *_pack(indexes),
        )

    @classmethod
    def from_infos(cls, infos) -> "ShardTable":
        infos = list(infos)
        return cls.from_columns(
            [s.url for s in infos],
            [s.num_samples for s in infos],
            [s.bytes for s in infos],
            [s.sha256 for s in infos],
            [s.index for s in infos],
        )

    @classmethod
    def from_entries(cls, entries: list, where: str) -> "ShardTable":
        """From the JSON's shard objects: a few C-speed passes per column; any fault re-checks entry by entry so the
        error names the first bad one exactly."""
        ok = all(type(e) is dict and e.keys() <= _KEYS and _REQUIRED <= e.keys() for e in entries)
        if ok:
            urls, counts = [e["url"] for e in entries], [e["num_samples"] for e in entries]
            sizes, hexes = [e["bytes"] for e in entries], [e["sha256"] for e in entries]
            indexes = [e.get("index", "") for e in entries]
            ok = (
                all(type(u) is str and u for u in urls)
                and all(type(v) is int for v in counts)
                and all(type(v) is int for v in sizes)
                and all(type(h) is str for h in hexes)
                and all(type(x) is str for x in indexes)
                and (
                    not entries
                    or (
                        min(sizes) >= 0
                        and max(sizes) <= MAX_SHARD_BYTES
                        and min(counts) >= 0
                        and max(counts) <= MAX_SHARD_BYTES
                    )
                )
            )
        if ok:
            table_counts, table_sizes = np.array(counts, np.int64), np.array(sizes, np.int64)
            digests = _digests(hexes)
            if digests is not None and not (table_counts > table_sizes // MIN_SAMPLE_BYTES).any():
                return cls(table_counts, table_sizes, digests, *_pack(urls), *_pack(indexes))
        for i, entry in enumerate(entries):
            check_entry(entry, f"{where}[{i}]")
        raise ValueError(f"{where}: an entry is not a shard")  # unreachable: check_entry holds every rule above

    def to_entries(self) -> list[dict]:
        return [vars(self.row(i)) for i in range(len(self))]

    def to_arrays(self, prefix: str) -> dict:
        return {
            f"{prefix}counts": self.counts,
            f"{prefix}sizes": self.sizes,
            f"{prefix}sha256": self.sha256,
            f"{prefix}urls": self.urls,
            f"{prefix}url_offsets": self.url_offsets,
            f"{prefix}indexes": self.indexes,
            f"{prefix}index_offsets": self.index_offsets,
        }

    @classmethod
    def from_arrays(cls, arrays: dict, prefix: str, min_shards: int) -> "ShardTable":
        """From a sidecar's arrays, every field range-checked vectorized: a ValueError names the array and element."""

        def get(name, dtype, shape):
            a = arrays.get(prefix + name)
            if (
                a is None
                or a.dtype != np.dtype(dtype)
                or a.ndim != len(shape)
                or any(want is not None and got != want for got, want in zip(a.shape, shape))
            ):
                got = "nothing" if a is None else f"{a.dtype.str} {a.shape}"
                raise ValueError(
                    f"{prefix}{name}: expected a {np.dtype(dtype).str} array of shape "
                    f"{tuple('n' if w is None else w for w in shape)}, got {got}"
                )
            return a

        counts = get("counts", "<i8", (None,))
        n = len(counts)
        if n < min_shards:
            raise ValueError(f"{prefix}counts: expected at least {min_shards} shard(s), got {n}")
        sizes, sha256 = get("sizes", "<i8", (n,)), get("sha256", "u1", (n, 32))
        _first_bad(prefix + "sizes", sizes, (sizes < 0) | (sizes > MAX_SHARD_BYTES), f"in [0, {MAX_SHARD_BYTES}]")
        _first_bad(
            prefix + "counts",
            counts,
            (counts < 0) | (counts > sizes // MIN_SAMPLE_BYTES),
            f"in [0, {prefix}sizes // {MIN_SAMPLE_BYTES}]",
        )
        urls = _blob(get("urls", "u1", (None,)), get("url_offsets", "<i8", (n + 1,)), prefix + "url", empty=False)
        indexes = _blob(
            get("indexes", "u1", (None,)), get("index_offsets", "<i8", (n + 1,)), prefix + "index", empty=True
        )
        return cls(
            counts, sizes, sha256, urls, arrays[prefix + "url_offsets"], indexes, arrays[prefix + "index_offsets"]
        )


def _first_bad(name: str, values: np.ndarray, bad: np.ndarray, expected: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{i}]: expected an integer {expected}, got {int(values[i])}")


def _blob(blob: np.ndarray, offsets: np.ndarray, name: str, empty: bool) -> np.ndarray:
    """A blob of UTF-8 strings checked against its offsets: 0 first, the blob's length last, non-decreasing (strictly
    when strings may not be empty), each boundary at the start of a character, the whole valid UTF-8."""
    lengths = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != len(blob):
        raise ValueError(
            f"{name}_offsets: expected 0 first and {len(blob)} (the blob's length) last, got "
            f"{int(offsets[0])} and {int(offsets[-1])}"
        )
    _first_bad(f"{name}_offsets", lengths, lengths < (0 if empty else 1), f"length {'>= 0' if empty else '>= 1'}")
    inside = offsets[offsets < len(blob)]
    _first_bad(f"{name}_offsets", inside, (blob[inside] & 0xC0) == 0x80, "at the start of a UTF-8 character")
    if len(blob) and blob.max() >= 0x80:  # ASCII needs no decoding
        try:
            str(blob, "utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}s: not UTF-8 at byte {e.start}") from None
    return blob


class ShardView(Sequence):
    """A table's shards as a read-only sequence of ShardInfo rows, made on access."""

    def __init__(self, table: ShardTable):
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._table.row(j) for j in range(*i.indices(len(self._table)))]
        n = len(self._table)
        if not -n <= i < n:
            raise IndexError(f"shard {i} of {n}")
        return self._table.row(i % n)

    def __repr__(self) -> str:
        return f"<{len(self)} shards>"


def npz_bytes(arrays: dict) -> bytes:
    """Arrays as an uncompressed .npz (np.load reads it), reproducible: fixed member times, no pickled objects."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, a in arrays.items():
            with z.open(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def read_npz(f, max_members: int = 64) -> dict:
    """An uncompressed .npz from an untrusted seekable file: data only (object dtypes refused, nothing unpickled),
    each member's size checked against its header's shape before it is read, CRC-checked as it is read."""
    out = {}
    with zipfile.ZipFile(f) as z:
        members = z.infolist()
        if len(members) > max_members:
            raise ValueError(f"{len(members)} members, expected at most {max_members}")
        for info in members:
            name = info.filename
            if not name.endswith(".npy") or info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
                raise ValueError(f"member {show(name)}: expected an uncompressed, unencrypted .npy")
            with z.open(info) as m:
                major, _ = np.lib.format.read_magic(m)
                if major not in (1, 2):
                    raise ValueError(f"member {show(name)}: npy format version {major}")
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(m)
                count = int(np.prod(shape, dtype=object))
                if dtype.hasobject or count * dtype.itemsize != info.file_size - m.tell():
                    raise ValueError(
                        f"member {show(name)}: {dtype.str} {shape} does not fit its "
                        f"{info.file_size - m.tell()} bytes (or holds objects)"
                    )
                data = m.read()
            out[name[:-4]] = np.frombuffer(data, dtype, count).reshape(shape, order="F" if fortran else "C")
    return out
