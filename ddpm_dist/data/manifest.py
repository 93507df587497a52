"""The manifest (shard urls, counts, bytes, sha256; the per-shard index is member_index.py): read from untrusted
storage, so every field is type- and range-checked before anything is planned or fetched. A fault is a ShardError with
a one-line message naming the file and what was expected.

A Manifest holds its shards as columns (shard_table.py): at 10^6 shards ~100 MB of arrays, no object per shard.
`write_manifest` writes a compact sidecar, `<name>.shards.npz`, then the JSON (the readable source of truth). The
sidecar records the sha256 and size of the JSON it was written with, so it provably belongs to that JSON: a load
hashes the JSON (streamed, no parse) and reads the sidecar's arrays instead of parsing 10^6 JSON objects. A sidecar
written for another version of the JSON (stale: the JSON was rewritten or edited by a tool that knows only JSON) is
ignored with a warning and the JSON is parsed: the JSON is intact and is what the sidecar would have said. A sidecar
that claims this JSON but cannot be read or has a field out of range is refused with one line (corrupt or altered:
not silently papered over); deleting it makes the JSON the one source again."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import struct
import zipfile
from typing import Optional

import fsspec
import numpy as np

from . import storage
from .shard_table import MIN_SAMPLE_BYTES, ShardInfo, ShardTable, ShardView, is_int, npz_bytes, read_npz, show

__all__ = [
    "MIN_SAMPLE_BYTES",
    "ShardInfo",
    "Manifest",
    "ShardError",
    "is_int",
    "show",
    "load_manifest",
    "write_manifest",
    "write_sidecar",
    "sidecar_url",
]
log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = "ddpm_dist.shards/1"
SIDECAR_FORMAT = "ddpm_dist.shards.columns/1"
MAX_SAMPLE_BYTES = 64 << 20  # a tar member or index entry larger than this is refused, never read
MAX_IMAGE_SIDE = 1 << 14
MAX_LABEL = 1 << 31  # labels are non-negative decimal integers below this (below num_classes when known)
SPLITS = ("train", "validation")
_NOT_EXTRA = (
    "format",
    "num_samples",
    "image_size",
    "channels",
    "num_classes",
    "image_format",
    "shards",
    "validation",
    "validation_samples",
)


class ShardError(ValueError):
    pass


class Manifest:
    """A data set's splits (training `shards`, held-out `validation`) as columns, and its image header.

    The stream reads `counts`, `sizes` (int64 arrays), `num_shards`, `num_samples`, `shard_url(i)`, `index_url(i)`;
    `shards` / `validation` are read-only sequences of ShardInfo made on access (for small callers)."""

    def __init__(
        self,
        shards,
        image_size: list,
        channels: int,
        num_classes: int,
        image_format: str = "png",
        base: str = "",
        extra: Optional[dict] = None,
        validation=(),
    ):
        self._train = shards if isinstance(shards, ShardTable) else ShardTable.from_infos(shards)
        self._val = validation if isinstance(validation, ShardTable) else ShardTable.from_infos(validation)
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes  # [H, W]
        self.image_format, self.base = image_format, base  # base: where the manifest was read from (not saved)
        self.extra = {} if extra is None else extra
        self._num_samples = int(self._train.counts.sum())

    @property
    def shards(self) -> ShardView:
        return ShardView(self._train)

    @property
    def validation(self) -> ShardView:  # held out: never in the training stream
        return ShardView(self._val)

    @property
    def counts(self) -> np.ndarray:
        return self._train.counts

    @property
    def sizes(self) -> np.ndarray:
        return self._train.sizes

    @property
    def sha256(self) -> np.ndarray:
        """(num_shards, 32) uint8 digests."""
        return self._train.sha256

    @property
    def num_shards(self) -> int:
        return len(self._train)

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def shard_url(self, i: int) -> str:
        return storage.join(self.base, self._train.url(i))

    def index_url(self, i: int) -> str:
        index = self._train.index(i)
        return storage.join(self.base, index) if index else ""

    def with_shards(self, shards=None, validation=None) -> "Manifest":
        """The same manifest with other shards (a list of ShardInfo) for either split."""
        return Manifest(
            self._train if shards is None else shards,
            self.image_size,
            self.channels,
            self.num_classes,
            self.image_format,
            self.base,
            self.extra,
            self._val if validation is None else validation,
        )

    def split(self, name: str) -> "Manifest":
        """The same manifest with `shards` = one split's shards (train: the training stream's)."""
        if name not in SPLITS:
            raise ShardError(f"split '{name}' is not one of {', '.join(SPLITS)}")
        if name == "train":
            return self
        if not len(self._val):
            raise ShardError("the manifest has no validation split (build it with `shards build --val-fraction F`)")
        return Manifest(
            self._val, self.image_size, self.channels, self.num_classes, self.image_format, self.base, self.extra
        )

    def held_out(self) -> str:
        """The split that evaluation on unseen images reads: validation when the manifest has one."""
        return "validation" if len(self._val) else "train"

    def _doc(self, shard_lists: bool) -> dict:
        held_out = (
            {
                "validation_samples": int(self._val.counts.sum()),
                **({"validation": self._val.to_entries()} if shard_lists else {}),
            }
            if len(self._val)
            else {}
        )
        return {
            "format": FORMAT,
            "num_samples": self.num_samples,
            "image_size": self.image_size,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "image_format": self.image_format,
            **({"shards": self._train.to_entries()} if shard_lists else {}),
            **held_out,
            **self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self._doc(True), indent=1)

    def checksum(self) -> str:
        return hashlib.sha256(self._train.hex_digests().encode()).hexdigest()

    def __repr__(self) -> str:
        return (
            f"Manifest({self.num_shards} shards, {self.num_samples} samples, {len(self._val)} validation shards, "
            f"{self.image_size[0]}x{self.image_size[1]}x{self.channels} {self.image_format}, base={self.base!r})"
        )


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


def _header(doc: dict, base: str, train: ShardTable, validation: ShardTable) -> Manifest:
    """A Manifest of checked shard tables and the document's checked header fields (the JSON's or the sidecar's)."""
    size = doc["image_size"]
    if not isinstance(size, list) or len(size) != 2:
        raise ValueError(f"image_size: expected [height, width], got {show(size)}")
    size = [_int(v, "image_size", 1, MAX_IMAGE_SIDE) for v in size]
    channels = _int(doc["channels"], "channels", 1, 4)
    num_classes = _int(doc.get("num_classes", 0), "num_classes", 0, MAX_LABEL)
    fmt = doc.get("image_format", "png")
    if not isinstance(fmt, str):
        raise ValueError(f"image_format: expected a string, got {show(fmt)}")
    extra = {k: v for k, v in doc.items() if k not in _NOT_EXTRA}
    return Manifest(train, size, channels, num_classes, fmt, base, extra, validation)


def _missing(doc, required: set) -> None:
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {show(doc)}")
    missing = required - set(doc)
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")


def parse_manifest(data: bytes, base: str = "") -> Manifest:
    """A Manifest from JSON bytes, every field checked (a ValueError names the first bad one)."""
    with gc_paused():  # 10^6 shard objects: no collection passes over them while they are built and read
        doc = parse_json(data)
        _missing(doc, {"shards", "image_size", "channels"})
        if not isinstance(doc["shards"], list) or not doc["shards"]:
            raise ValueError(f"shards: expected a non-empty list, got {show(doc['shards'])}")
        shards = ShardTable.from_entries(doc.pop("shards"), "shards")
        validation = doc.pop("validation", [])
        if not isinstance(validation, list):
            raise ValueError(f"validation: expected a list, got {show(validation)}")
        validation = ShardTable.from_entries(validation, "validation")
        return _header(doc, base, shards, validation)


def sidecar_url(manifest_url: str) -> str:
    """Where a manifest's sidecar lies: `manifest.json` -> `manifest.shards.npz`."""
    return (manifest_url[:-5] if manifest_url.endswith(".json") else manifest_url) + ".shards.npz"


def _sidecar_bytes(manifest: Manifest, json_bytes: bytes) -> bytes:
    header = {"sidecar": SIDECAR_FORMAT, "manifest": manifest._doc(False)}
    return npz_bytes(
        {
            "header": np.frombuffer(json.dumps(header).encode(), np.uint8),
            "json_sha256": np.frombuffer(hashlib.sha256(json_bytes).digest(), np.uint8),
            "json_bytes": np.array([len(json_bytes)], np.int64),
            **manifest._train.to_arrays(""),
            **manifest._val.to_arrays("validation_"),
        }
    )


def write_manifest(manifest: Manifest, url: str) -> None:
    """The sidecar, then the JSON (each atomic): a reader never sees a JSON whose sidecar is not yet written."""
    data = manifest.to_json().encode()
    storage.write_bytes_atomic(sidecar_url(url), _sidecar_bytes(manifest, data))
    storage.write_bytes_atomic(url, data)


def write_sidecar(url: str) -> Manifest:
    """A sidecar for a manifest JSON that has none (or a stale one), from the JSON as it is (left untouched)."""
    data = storage.read_bytes(url)
    try:
        manifest = parse_manifest(data, storage.dirname(url))
    except ValueError as e:
        raise ShardError(f"manifest '{storage.redact(url)}' is not a ddpm_dist manifest ({one_line(e)})") from None
    storage.write_bytes_atomic(sidecar_url(url), _sidecar_bytes(manifest, data))
    return manifest


def _sha256_of(url: str) -> bytes:
    h = hashlib.sha256()
    with storage.translated(url), fsspec.open(url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


_UNREADABLE = (
    ValueError,
    zipfile.BadZipFile,
    EOFError,
    RuntimeError,
    NotImplementedError,
    struct.error,
    OverflowError,
    KeyError,
)


def _from_sidecar(url: str, side: str) -> Optional[Manifest]:
    """The manifest from its sidecar; None (with a warning) when the sidecar was written for another JSON."""
    where = f"manifest sidecar '{storage.redact(side)}'"
    try:
        with storage.translated(side), fsspec.open(side, "rb") as f:
            arrays = read_npz(f)
        digest, size = arrays.get("json_sha256"), arrays.get("json_bytes")
        if not (
            digest is not None
            and digest.dtype == np.uint8
            and digest.shape == (32,)
            and size is not None
            and size.dtype == np.dtype("<i8")
            and size.shape == (1,)
        ):
            raise ValueError("json_sha256 / json_bytes: expected 32 uint8 and 1 int64 (the JSON it was written with)")
    except _UNREADABLE as e:
        raise ShardError(f"{where} is unreadable ({one_line(e)}); delete it to read the JSON alone") from None
    if storage.size(url) != int(size[0]) or _sha256_of(url) != digest.tobytes():
        log.warning(
            "%s was written for another version of '%s': reading the JSON instead (rewrite the sidecar with "
            "ddpm_dist.data.manifest.write_sidecar)",
            where,
            storage.redact(url),
        )
        return None
    try:
        header = arrays.get("header")
        if header is None or header.dtype != np.uint8 or header.ndim != 1:
            raise ValueError("header: expected a uint8 array of JSON")
        head = parse_json(header.tobytes())
        if not isinstance(head, dict) or head.get("sidecar") != SIDECAR_FORMAT:
            raise ValueError(f"header: expected {{'sidecar': '{SIDECAR_FORMAT}', 'manifest': ...}}, got {show(head)}")
        doc = head.get("manifest")
        _missing(doc, {"image_size", "channels"})
        train = ShardTable.from_arrays(arrays, "", 1)
        validation = ShardTable.from_arrays(arrays, "validation_", 0)
        return _header(doc, storage.dirname(url), train, validation)
    except ValueError as e:
        raise ShardError(
            f"{where} is not a ddpm_dist shard table ({one_line(e)}); delete it to read the JSON alone"
        ) from None


def load_manifest(url: str) -> Manifest:
    """The manifest at `url`: from its sidecar when it has one written with this very JSON, else from the JSON."""
    if not storage.exists(url):
        raise ShardError(f"manifest '{storage.redact(url)}' does not exist{storage.missing_hint(url)}")
    side = sidecar_url(url)
    if "?" not in url and storage.exists(side):  # a presigned URL signs the JSON alone: no sidecar can be derived
        manifest = _from_sidecar(url, side)
        if manifest is not None:
            return manifest
    try:
        return parse_manifest(storage.read_bytes(url), storage.dirname(url))
    except ValueError as e:
        raise ShardError(f"manifest '{storage.redact(url)}' is not a ddpm_dist manifest ({one_line(e)})") from None


def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."
