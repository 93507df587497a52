"""Digests that make a checkpoint, an EMA snapshot or an export prove itself: xxh3_128 of every file, with its size.

A checkpoint or snapshot lists its files in its COMMITTED marker, written last: the digests are part of what is
committed. DCP's files are digested as their bytes go out (`digesting_writer`: a FileSystemWriter whose streams hash
what they write, on every rank, for async saves in the background write); each rank's digests reach the
coordinator (rank 0) inside DCP's own gather of write results, which ends in `finish` there. Files written by others
(DeepSpeed's) are read back once after they were written, before the commit, each by one rank. An export keeps the
digest of every tensor and of its metadata in its own safetensors metadata (one file: nothing to commit beside it).

A marker without `files` was written before digests existed: such a checkpoint loads unverified. xxh3_128 (20 GB/s
here, sha256 1.5 GB/s: docs/BENCHMARKS.md) guards against corruption, not against someone who can rewrite the marker."""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass
from typing import Optional

import xxhash

from .errors import CheckpointError

ALGORITHM = "xxh3_128"
MARKER = "COMMITTED"
CHUNK = 8 << 20
_DIGESTS_FQN = "__ddpm_dist_file_digests__"  # the write result that carries a rank's digests, never a state key
OK, MISSING, TRUNCATED, ALTERED, UNREADABLE = range(5)


def new_hasher():
    return xxhash.xxh3_128()


def file_record(path: str) -> dict:
    """{'bytes', ALGORITHM} of a file, read once in chunks."""
    h, size, buf = new_hasher(), 0, bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return {"bytes": size, ALGORITHM: h.hexdigest()}


def check_file(directory: str, name: str, record, digest: bool = True) -> tuple[int, str]:
    """(OK, '') when `directory/name` has the recorded size (and with `digest` the recorded digest); else a code and
    what is wrong, in words, naming the file."""
    if not (isinstance(name, str) and isinstance(record, dict) and isinstance(record.get("bytes"), int)):
        return ALTERED, f"'{os.path.join(directory, str(name))}' has an unreadable record in its {MARKER}"
    path = os.path.normpath(os.path.join(directory, name))
    if os.path.isabs(name) or not path.startswith(os.path.normpath(directory) + os.sep):
        return ALTERED, f"{MARKER} of '{directory}' names '{name}', outside the directory"
    try:
        size = os.stat(path).st_size
        if size < record["bytes"]:
            return TRUNCATED, f"'{path}' is truncated ({size} of {record['bytes']} bytes)"
        if size > record["bytes"]:
            return ALTERED, f"'{path}' is altered ({size} bytes, {record['bytes']} committed)"
        if digest and file_record(path)[ALGORITHM] != record.get(ALGORITHM):
            return ALTERED, f"'{path}' is altered (its {ALGORITHM} differs from the committed one)"
    except FileNotFoundError:
        return MISSING, f"'{path}' is missing"
    except OSError as e:
        return UNREADABLE, f"'{path}' is unreadable ({type(e).__name__}: {e})"
    return OK, ""


def check_files(directory: str, files: dict, names: list) -> list[tuple[int, str]]:
    """check_file for `names` of `files`: the sizes of all first, then the digests of those whose size matched."""
    out = [check_file(directory, n, files[n], digest=False) for n in names]
    return [c if c[0] != OK else check_file(directory, n, files[n]) for n, c in zip(names, out)]


def read_marker(path: str) -> dict:
    """The COMMITTED marker of a checkpoint or snapshot directory; an unreadable one is a CheckpointError."""
    try:
        with open(os.path.join(path, MARKER), "rb") as f:
            marker = json.loads(f.read().decode())
        if not isinstance(marker, dict) or not isinstance(marker.get("files", {}), dict):
            raise ValueError("not a JSON object with a 'files' object")
        return marker
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{os.path.join(path, MARKER)}' is unreadable ({type(e).__name__}: {e})") from None


def marker_text(record: dict, files: dict) -> str:
    """A marker: `record` (step or images, time) and the record of every file of the directory."""
    return json.dumps({**record, "files": dict(sorted(files.items()))}, indent=1)


@dataclass(frozen=True)
class Verdict:
    path: str
    problem: Optional[str] = None  # one line naming the file; None when every file matches
    unverified: bool = False  # the marker has no digests (written by older code)

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_dir(path: str) -> Verdict:
    """Every file a committed checkpoint or snapshot lists in its marker, checked (check_files: sizes first)."""
    try:
        files = read_marker(path).get("files")
    except CheckpointError as e:
        return Verdict(path, str(e))
    if files is None:
        return Verdict(path, unverified=True)
    names = sorted(files)
    for code, what in check_files(path, files, names):
        if code != OK:
            return Verdict(path, what)
    return Verdict(path)


def require_intact(path: str, what: str = "checkpoint") -> Verdict:
    """verify_dir, a corrupt directory being a one-line CheckpointError."""
    verdict = verify_dir(path)
    if not verdict.ok:
        raise CheckpointError(f"corrupt {what} '{path}': {verdict.problem}")
    return verdict


# -- exports: the digest of each tensor and of the metadata, in the metadata ---------------------------------------
EXPORT_DIGESTS = "digests"  # the safetensors metadata key


def tensor_digest(t) -> str:
    import torch

    return xxhash.xxh3_128_hexdigest(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _metadata_digest(metadata: dict) -> str:
    rest = {k: v for k, v in metadata.items() if k != EXPORT_DIGESTS}
    return xxhash.xxh3_128_hexdigest(json.dumps(rest, sort_keys=True).encode())


def export_digests(tensors: dict, metadata: dict) -> str:
    """The value of the export's `digests` metadata key: every tensor's bytes and the rest of the metadata."""
    return json.dumps(
        {
            "algorithm": ALGORITHM,
            "metadata": _metadata_digest(metadata),
            "tensors": {k: tensor_digest(v) for k, v in sorted(tensors.items())},
        }
    )


def check_export(path: str, metadata: dict, keys, tensors: dict) -> Optional[str]:
    """What is wrong with an export (its metadata, the names of its tensors `keys`, and `tensors`: some or all of
    them as read), in one line naming the file; None when all match the digests written with them. An export
    written before digests is not checked."""
    if EXPORT_DIGESTS not in metadata:
        return None
    try:
        recorded = json.loads(metadata[EXPORT_DIGESTS])
        if recorded.get("algorithm") != ALGORITHM or not isinstance(recorded.get("tensors"), dict):
            raise ValueError(f"not {ALGORITHM} digests")
    except (ValueError, AttributeError) as e:
        return f"'{path}' is altered (its digests are unreadable: {e})"
    if recorded.get("metadata") != _metadata_digest(metadata):
        return f"'{path}' is altered (its metadata differs from the digest written with it)"
    if unlisted := sorted(set(recorded["tensors"]) ^ set(keys)):
        return f"'{path}' is altered (tensor '{unlisted[0]}' is not the one written)"
    for name, t in sorted(tensors.items()):
        if recorded["tensors"].get(name) != tensor_digest(t):
            return f"'{path}' is altered (tensor '{name}' differs from the digest written with it)"
    return None


# -- writing: DCP streams that digest what they write ------------------------------------------------------------
class _DigestingStream(io.RawIOBase):
    """A write-only, append-only file stream that hashes every byte it passes on."""

    def __init__(self, raw):
        self.raw, self.hasher, self.size = raw, new_hasher(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self.raw.write(b)
        view = memoryview(b).cast("B")
        self.hasher.update(view[: len(view) if n is None else n])
        self.size += len(view) if n is None else n
        return n

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes
            self.raw.close()

    def record(self) -> dict:
        return {"bytes": self.size, ALGORITHM: self.hasher.hexdigest()}


@functools.cache
def _writer_class() -> type:
    """DCP's FileSystemWriter with digesting streams (built on first use: DCP takes a second to import)."""
    from contextlib import contextmanager

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.storage import WriteResult

    class DigestingFileSystem(FileSystem):
        def __init__(self):
            super().__init__()
            self.written: dict[str, dict] = {}  # file name -> record, of the files this process wrote

        @contextmanager
        def create_stream(self, path, mode):
            with super().create_stream(path, mode) as raw:
                if "w" not in mode:
                    yield raw
                    return
                stream = _DigestingStream(raw)
                yield stream
                self.written[os.path.basename(path)] = stream.record()

        def rename(self, path, new_path) -> None:  # .metadata.tmp -> .metadata
            super().rename(path, new_path)
            if (record := self.written.pop(os.path.basename(path), None)) is not None:
                self.written[os.path.basename(new_path)] = record

    class DigestingWriter(FileSystemWriter):
        def __init__(self, path: str, share: tuple[int, int], others: tuple[str, ...]):
            super().__init__(path)
            self.fs = DigestingFileSystem()
            self.share, self.others = share, others
            self.files: dict[str, dict] = {}  # on the coordinator after finish: every rank's files

        def write_data(self, plan, planner):
            future = super().write_data(plan, planner)  # FileSystemWriter has written when it returns
            mine = dict(self.fs.written)
            rank, world = self.share
            for i, name in enumerate(_files_under(str(self.path), self.others)):
                if i % world == rank:  # another writer's files (DeepSpeed's): read back, one rank each
                    mine[name] = file_record(os.path.join(str(self.path), name))
            future.value().append(WriteResult(MetadataIndex(_DIGESTS_FQN), 0, mine))
            return future

        def finish(self, metadata, results) -> None:
            files, kept = {}, []
            for rank_results in results:
                kept.append([r for r in rank_results if r.index.fqn != _DIGESTS_FQN])
                for r in rank_results:
                    if r.index.fqn == _DIGESTS_FQN:
                        files.update(r.storage_data)
            super().finish(metadata, kept)
            files.update({k: v for k, v in self.fs.written.items() if k == ".metadata"})
            self.files = files

    return DigestingWriter


def _files_under(directory: str, folders: tuple[str, ...]) -> list[str]:
    out = []
    for folder in folders:
        for root, _, names in os.walk(os.path.join(directory, folder)):
            out += [os.path.relpath(os.path.join(root, n), directory) for n in names]
    return sorted(out)


def digesting_writer(path: str, rank: int = 0, world: int = 1, others: tuple[str, ...] = ()):
    """A DCP storage writer into `path` whose `files` (on rank 0, once the save finished) has the record of every
    file every rank wrote, and of the files under the sub-folders `others` (written before the save by a component
    that keeps its own format), which rank `rank` of `world` reads back for its share."""
    return _writer_class()(path, (rank, world), tuple(others))
