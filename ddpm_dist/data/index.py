"""Index foreign shards once: a brace pattern (or a folder of tars, img2dataset's output among them) becomes per-shard
indexes and a manifest, so training fetches samples by byte range instead of reading and hashing every tar in every
process.

The work is split by shard: part p of n takes shards p, p+n, p+2n, ... of the pattern (strided, so a pattern whose
last shards are short or empty spreads evenly), reads each shard once as a stream (hashed, its tar headers indexed, the
image headers and labels read, nothing held whole) and writes its `<shard>.idx.json`; when its shards are done it writes
one part record (every shard's count, bytes, sha256, image sizes, labels) under `index-parts/`. `finalize` reads the
n part records and writes the manifest, shards in pattern order whatever n was, then removes the records. Who runs the
parts and when finalize runs (one process, a local spawn, torchrun, SLURM tasks after a barrier, or an array of
independent jobs and a last `--finalize`) is the entry point's business: nothing here is distributed.

Where files go: `out` (default: the shards' common folder) holds the manifest, the part records and an index per
shard, named like the shard relative to the shards' common folder. When `out` is that folder the manifest names the
shards relative to it (the data set stays relocatable); otherwise (a read-only bucket) it names them by absolute URL.

img2dataset's webdataset output (`00000.tar` with `00000_stats.json` and `00000.parquet`) is recognised by the stats
file beside a tar: its `successes` must equal the samples the tar holds (a one-line error otherwise: the tar is not
the one img2dataset finished). Its shards are hashed like any other: reading the tar headers needs every byte anyway
(they are spread through the file), so the sha256 costs no extra I/O."""

from __future__ import annotations

import io
import json
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import fsspec
import webdataset as wds
from PIL import Image

from . import storage
from .manifest import MANIFEST_NAME, Manifest, ShardError, ShardInfo, one_line, parse_json, parse_manifest, show
from .member_index import index_json
from .samples import HashingStream, Prefixed, _members, _tar_faults, check_uncompressed

PARTS_DIR = "index-parts"
IMAGE_EXTS = ("npy", "png", "jpg", "jpeg", "webp")
PART_FORMAT = "ddpm_dist.index-part/1"


@dataclass
class IndexPlan:
    """What every process of an index job agrees on: the shards (pattern order), their names and where files go."""

    pattern: str
    urls: list[str]  # absolute URLs of the shards, pattern order
    names: list[str]  # each shard relative to the shards' common folder
    out: str
    relative: bool  # the manifest names shards relative to `out` (out is their common folder)

    def manifest_url(self) -> str:
        return storage.join(self.out, MANIFEST_NAME)

    def index_name(self, i: int) -> str:
        return self.names[i] + ".idx.json"

    def shard_ref(self, i: int) -> str:
        return self.names[i] if self.relative else self.urls[i]

    def part_url(self, part: int, parts: int) -> str:
        return storage.join(self.out, f"{PARTS_DIR}/part-{part:05d}-of-{parts:05d}.json")


def _absolute(url: str) -> str:
    return os.path.abspath(storage.local_path(url)) if storage.is_local(url) else url


def expand(pattern: str) -> list[str]:
    """The shards a pattern names: a brace pattern of tar URLs, or a folder (every `*.tar` in it, sorted)."""
    import braceexpand

    urls = [_absolute(u) for u in braceexpand.braceexpand(pattern)]
    if len(urls) == 1 and not urls[0].endswith(".tar"):
        with storage.translated(urls[0]):
            fs, path = fsspec.core.url_to_fs(urls[0])
            if fs.isdir(path):
                proto = "" if storage.is_local(urls[0]) else urls[0].split("://", 1)[0] + "://"
                urls = sorted(
                    proto + p if proto and "://" not in p else p for p in fs.glob(path.rstrip("/") + "/*.tar")
                )
                if not urls:
                    raise ShardError(f"folder '{storage.redact(pattern)}' holds no .tar files")
    if len(set(urls)) != len(urls):
        raise ShardError(f"pattern '{storage.redact(pattern)}' names some shards more than once")
    return urls


def _common_folder(urls: list[str]) -> str:
    local = [storage.is_local(u) for u in urls]
    if all(local):
        return os.path.commonpath([os.path.dirname(u) for u in urls])
    if any(local):
        raise ShardError("the pattern mixes local paths and URLs")
    protos = {u.split("://", 1)[0] for u in urls}
    if len(protos) != 1:
        raise ShardError(f"the pattern mixes protocols ({', '.join(sorted(protos))})")
    proto = protos.pop()
    return f"{proto}://" + posixpath.commonpath([posixpath.dirname(u.split("://", 1)[1]) for u in urls])


def plan_index(pattern: str, out: Optional[str] = None) -> IndexPlan:
    urls = expand(pattern)
    common = _common_folder(urls)
    names = [os.path.relpath(u, common) if storage.is_local(u) else u[len(common) :].lstrip("/") for u in urls]
    out = _absolute(out) if out else common
    same = (
        (os.path.normpath(out) == os.path.normpath(common))
        if storage.is_local(out)
        else out.rstrip("/") == common.rstrip("/")
    )
    return IndexPlan(pattern, urls, names, out, same)


def _image_shape(ext: str, data: bytes) -> tuple[int, int, int]:
    """(H, W, C) from an image file's header, nothing decoded."""
    if ext == "npy":
        import numpy as np

        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        dims = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)[0]
        return (dims[0], dims[1], dims[2] if len(dims) == 3 else 1)
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        return (h, w, len(im.getbands()))


def scan_shard(url: str) -> tuple[dict, list]:
    """One streamed pass over a shard: (its record, its index). The index is what `tar_index` makes of the tar's
    bytes (the same entries, so `shards verify` accepts it); the record holds count, bytes, sha256, the image
    format, a histogram of image shapes ("HxWxC") and of labels (None when a sample has no `cls`)."""
    index, by_key, shapes, labels, fmt = [], {}, Counter(), Counter(), ""
    with storage.translated(url), fsspec.open(url, "rb") as f:
        hashed = HashingStream(f)
        head = hashed.read(6)
        check_uncompressed(head, url)
        with _tar_faults(url):
            for member, data in _members(Prefixed(head, hashed), url):
                key, ext = wds.tariterators.base_plus_ext(member.name)
                if data is None or key is None:
                    continue
                if key not in by_key:
                    by_key[key] = {}
                    index.append([key, by_key[key]])
                by_key[key][ext] = [member.offset_data, member.size]
                if ext in IMAGE_EXTS and not any(e in IMAGE_EXTS for e in list(by_key[key])[:-1]):
                    fmt = fmt or ext
                    try:
                        shapes["x".join(map(str, _image_shape(ext, data)))] += 1
                    except Exception as e:  # noqa: BLE001 - PIL and numpy raise many types for a bad header
                        raise ShardError(
                            f"shard '{storage.redact(url)}': sample {show(key)}'s {ext} has no readable "
                            f"image header ({one_line(e)})"
                        ) from None
                elif ext == "cls":
                    text = data[:32].strip()
                    labels[int(text) if text.isdigit() and len(data) <= 32 else "bad"] += 1
        hashed.drain()
    unlabelled = len(index) - sum(labels.values())
    if unlabelled:
        labels[None] += unlabelled
    record = {
        "num_samples": len(index),
        "bytes": hashed.size,
        "sha256": hashed.sha256.hexdigest(),
        "image_format": fmt,
        "shapes": dict(shapes),
        "labels": {str(k): v for k, v in labels.items()},
    }
    return record, index


def img2dataset_stats(url: str) -> Optional[dict]:
    """The `<shard>_stats.json` img2dataset writes beside each tar it finished, or None (not img2dataset's)."""
    stats_url = url[: -len(".tar")] + "_stats.json" if url.endswith(".tar") else ""
    if not stats_url or not storage.exists(stats_url):
        return None
    try:
        stats = parse_json(storage.read_bytes(stats_url))
        successes = stats["successes"]
        if not isinstance(successes, int) or isinstance(successes, bool) or successes < 0:
            raise ValueError(f"successes: expected a count, got {show(successes)}")
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(f"img2dataset stats '{storage.redact(stats_url)}' are unreadable ({one_line(e)})") from None
    return {
        "successes": successes,
        "count": stats.get("count"),
        "failed_to_download": stats.get("failed_to_download"),
        "failed_to_resize": stats.get("failed_to_resize"),
    }


def index_part(plan: IndexPlan, part: int, parts: int, progress=None) -> list[dict]:
    """Index shards part, part+parts, ... of the plan; write their indexes, then this part's record (last)."""
    if not 0 <= part < parts:
        raise ShardError(f"part {part} is not in [0, {parts})")
    records = []
    for i in range(part, len(plan.urls), parts):
        url = plan.urls[i]
        if not storage.exists(url):
            raise ShardError(f"shard '{storage.redact(url)}' does not exist{storage.missing_hint(url)}")
        record, index = scan_shard(url)
        stats = img2dataset_stats(url)
        if stats is not None:
            if stats["successes"] != record["num_samples"]:
                raise ShardError(
                    f"shard '{storage.redact(url)}' holds {record['num_samples']} samples but its "
                    f"img2dataset stats say {stats['successes']} succeeded: it is not the tar img2dataset "
                    "finished (re-run img2dataset for it)"
                )
            record["img2dataset"] = stats
        if record["num_samples"]:
            storage.write_bytes_atomic(storage.join(plan.out, plan.index_name(i)), index_json(index))
        records.append({"shard": i, **record})
        if progress is not None:
            progress(1)
    doc = {
        "format": PART_FORMAT,
        "pattern": plan.pattern,
        "part": part,
        "parts": parts,
        "shards": len(plan.urls),
        "records": records,
    }
    storage.write_bytes_atomic(plan.part_url(part, parts), json.dumps(doc, separators=(",", ":")).encode())
    return records


def _part_counts(plan: IndexPlan) -> list[int]:
    """The part counts (n of 'part-p-of-n') found under out/index-parts/."""
    found = set()
    for path in storage.list_prefix(storage.join(plan.out, PARTS_DIR)):
        name = posixpath.basename(path)
        if name.startswith("part-") and name.endswith(".json") and "-of-" in name:
            tail = name[: -len(".json")].rsplit("-of-", 1)[1]
            if tail.isdigit():
                found.add(int(tail))
    return sorted(found)


def _read_part(plan: IndexPlan, part: int, parts: int) -> list[dict]:
    url = plan.part_url(part, parts)
    if not storage.exists(url):
        raise ShardError(
            f"part record '{storage.redact(url)}' is missing: part {part} of {parts} has not finished "
            "(run it, then finalize again)"
        )
    try:
        doc = parse_json(storage.read_bytes(url))
        if not isinstance(doc, dict) or doc.get("format") != PART_FORMAT:
            raise ValueError(f"expected a {PART_FORMAT} object")
        if doc.get("shards") != len(plan.urls) or doc.get("part") != part or doc.get("parts") != parts:
            raise ValueError(
                f"it is part {show(doc.get('part'))} of {show(doc.get('parts'))} of a pattern of "
                f"{show(doc.get('shards'))} shards, not part {part} of {parts} of {len(plan.urls)}"
            )
        records = doc["records"]
        want = list(range(part, len(plan.urls), parts))
        if not isinstance(records, list) or [r.get("shard") if isinstance(r, dict) else None for r in records] != want:
            raise ValueError(f"expected records of shards {show(want)}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"part record '{storage.redact(url)}' does not belong to this index ({one_line(e)})") from None
    return records


def finalize(plan: IndexPlan, parts: Optional[int] = None, keep_parts: bool = False) -> Manifest:
    """Merge the part records into the manifest (pattern order), write it, remove the records. `parts`: how many
    parts the job had (default: the one count found under index-parts/)."""
    if parts is None:
        found = _part_counts(plan)
        if len(found) != 1:
            raise ShardError(
                f"'{storage.redact(storage.join(plan.out, PARTS_DIR))}' holds "
                f"{'no part records' if not found else 'part records of ' + str(len(found)) + ' jobs'}: "
                "index the pattern (or pass the job's part count)"
            )
        parts = found[0]
    records: list[Optional[dict]] = [None] * len(plan.urls)
    for p in range(parts):
        for r in _read_part(plan, p, parts):
            records[r["shard"]] = r
    manifest = merge(plan, records)
    write_manifest(manifest, plan.manifest_url())
    if not keep_parts:
        for p in range(parts):
            with storage.translated(plan.out):
                fs, path = fsspec.core.url_to_fs(plan.part_url(p, parts))
                fs.rm(path)
        folder = storage.join(plan.out, PARTS_DIR)
        if storage.is_local(folder) and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
    return manifest


def merge(plan: IndexPlan, records: list[dict]) -> Manifest:
    """The manifest of a plan's records: the most common image shape, labels when every sample has one."""
    shapes, labels, fmts, infos, stats = Counter(), Counter(), Counter(), [], []
    for i, r in enumerate(records):
        for k, v in r["shapes"].items():
            shapes[k] += v
        for k, v in r["labels"].items():
            labels[k] += v
        if r["image_format"]:
            fmts[r["image_format"]] += r["num_samples"]
        if "img2dataset" in r:
            stats.append(r["img2dataset"])
        if r["num_samples"]:  # img2dataset leaves empty tars where every download failed: nothing to list
            infos.append(ShardInfo(plan.shard_ref(i), r["num_samples"], r["bytes"], r["sha256"], plan.index_name(i)))
    if not infos:
        raise ShardError(f"pattern '{storage.redact(plan.pattern)}' has no samples")
    if not shapes:
        raise ShardError(f"pattern '{storage.redact(plan.pattern)}' has no images (expected {', '.join(IMAGE_EXTS)})")
    shape = [int(x) for x in shapes.most_common(1)[0][0].split("x")]
    extra: dict = {"indexed_from": storage.redact(plan.pattern)}
    if len(shapes) > 1:
        extra["image_shapes"] = dict(shapes.most_common())
    num_classes = 0
    if "bad" in labels:
        raise ShardError(f"pattern '{storage.redact(plan.pattern)}': {labels['bad']} `cls` labels are not integers")
    if labels and "None" not in labels:
        num_classes = max(int(k) for k in labels) + 1
        extra["label_histogram"] = {k: labels[k] for k in sorted(labels, key=int)}
    if stats:
        extra["img2dataset"] = {
            "shards": len(stats),
            **{
                k: sum(s[k] or 0 for s in stats)
                for k in ("successes", "count", "failed_to_download", "failed_to_resize")
            },
        }
    manifest = Manifest(infos, shape[:2], shape[2], num_classes, fmts.most_common(1)[0][0], plan.out, extra)
    try:  # what training will read back: checked by the same parser now, not at the first step
        parse_manifest(manifest.to_json().encode())
    except ValueError as e:
        raise ShardError(f"the manifest of '{storage.redact(plan.pattern)}' would not load ({one_line(e)})") from None
    return manifest


def write_manifest(manifest: Manifest, url: str) -> None:
    """manifest.write_manifest when the manifest module has it (it also writes a compact sidecar), else the JSON."""
    from . import manifest as manifest_module

    writer = getattr(manifest_module, "write_manifest", None)
    if writer is not None:
        writer(manifest, url)
    else:
        storage.write_bytes_atomic(url, manifest.to_json().encode())
