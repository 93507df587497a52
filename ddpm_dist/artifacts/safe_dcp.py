"""torch.distributed.checkpoint's load without unpickling anything but its metadata classes: checkpoints come from
shared filesystems and buckets. `load_dcp` is dcp.load with a reader whose `.metadata` unpickler admits only
METADATA_GLOBALS and a planner that loads DCP's byte entries with torch.load(weights_only=True); a directory with a
COMMITTED marker is verified against the digests in it first (digests.py)."""

from __future__ import annotations

import functools
import io
import os
import pickle
import re

import torch

from .digests import MARKER, require_intact
from .errors import CheckpointError

# Every global a DCP `.metadata` pickle references: found by unpickling, with a recording Unpickler, the checkpoints
# of every backend (single, FSDP2, ZeRO-1/2/3; sync and async; fp32 and bf16). Anything else is refused unrun.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS = frozenset(
    {
        (_DCP_METADATA, n)
        for n in (
            "Metadata",
            "StorageMeta",
            "MetadataIndex",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    }  # the enum TensorProperties pickles memory_format as
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # which file and byte range holds an item
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a torch.layout pickles as _get_layout("torch.strided")
        ("pathlib", "PosixPath"),
        ("pathlib._local", "PosixPath"),
    }  # StorageMeta.checkpoint_id (Python 3.13: _local)
    | {("torch", n) for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
)  # a dtype pickles as torch.<name>
UNTRUSTED = "a checkpoint from an untrusted source?"


class _Refused(Exception):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in METADATA_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def read_dcp_metadata(file: str):
    """The Metadata of a DCP checkpoint (its `.metadata` file), unpickled admitting only METADATA_GLOBALS, and
    checked to be DCP metadata naming files inside the checkpoint; anything else is a one-line CheckpointError."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(
            f"refusing to load '{file}': it references {e}, which a DCP checkpoint never contains ({UNTRUSTED})"
        ) from None
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or garbled: whatever the unpickler raised
        raise CheckpointError(f"'{file}' is not readable DCP metadata: {type(e).__name__}: {e}") from None

    def inside(s) -> bool:  # a file name in the checkpoint directory, not a path out of it
        p = getattr(s, "relative_path", None)
        return (
            isinstance(s, _StorageInfo) and isinstance(p, str) and p == os.path.basename(p) and p not in ("", ".", "..")
        )

    entries = (TensorStorageMetadata, BytesStorageMetadata)
    if not (
        isinstance(md, Metadata)
        and isinstance(md.state_dict_metadata, dict)
        and isinstance(md.storage_data, dict)
        and all(isinstance(v, entries) for v in md.state_dict_metadata.values())
        and all(inside(s) for s in md.storage_data.values())
    ):
        raise CheckpointError(
            f"refusing to load '{file}': not DCP metadata of files in its own directory ({UNTRUSTED})"
        )
    return md


@functools.cache
def _safe_dcp() -> tuple[type, type]:
    """DCP's FileSystemReader and DefaultLoadPlanner, made safe (built on first use: DCP takes a second to import)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")  # DCP's fallback to rank-local metadata when there is no global one
            file = os.path.join(self.path, ".metadata" if rank is None else f"__{rank}.metadata")
            if getattr(self, "_checked", (None,))[0] != file:  # load_dcp reads it first: unpickle it once
                self._checked = (file, read_dcp_metadata(file))
            md = self._checked[1]
            if md.storage_meta is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class SafePlanner(DefaultLoadPlanner):
        """DCP keeps non-tensor leaves (e.g. an optimizer's param_groups) as torch.save bytes and loads them with
        weights_only=False: here with weights_only=True, and never where the state holds a tensor."""

        def __init__(self, reader: SafeReader):
            super().__init__()
            self.reader = reader

        def load_bytes(self, read_item, value):
            fqn = read_item.dest_index.fqn
            where = os.path.join(self.reader.path, self.reader.storage_data[read_item.storage_index].relative_path)
            if torch.is_tensor(self.state_dict.get(fqn)):
                raise CheckpointError(
                    f"refusing to load '{where}': it holds '{fqn}' as pickled bytes where the state "
                    f"has a tensor ({UNTRUSTED})"
                )
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - weights_only refused a global, or the bytes are garbled
                found = re.search(r"GLOBAL (\S+)", str(e))  # torch writes builtins.exec as exec
                name = found and (found.group(1) if "." in found.group(1) else "builtins." + found.group(1))
                why = f"it references {name}, which" if name else f"'{fqn}' is not data that"
                raise CheckpointError(
                    f"refusing to load '{where}': {why} a DCP checkpoint never contains ({UNTRUSTED})"
                ) from None
            clean = io.BytesIO()  # our own pickle of plain data: what DCP's load_bytes unpickles now
            torch.save(obj, clean)
            clean.seek(0)
            super().load_bytes(read_item, clean)

    return SafeReader, SafePlanner


def load_dcp(state: dict, path: str, *, verify: bool = True, **kwargs) -> None:
    """torch.distributed.checkpoint.load(state, ...) from checkpoint directory `path`, in place, unpickling nothing
    but DCP's metadata classes and plain data; an untrusted file is a one-line CheckpointError naming it, and so is
    a file that differs from its digest in the directory's marker (unless the caller verified it: verify=False)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if verify and os.path.exists(os.path.join(path, MARKER)):
        require_intact(path)

    reader_cls, planner_cls = _safe_dcp()
    reader = reader_cls(path)
    reader.read_metadata()  # refused here, before DCP would log it as a warning with a traceback and go on
    try:
        dcp.load(state, storage_reader=reader, planner=planner_cls(reader), **kwargs)
    except CheckpointException as e:  # DCP wraps every rank's error in one multi-line BaseException
        ours = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointError)]
        if ours:
            raise ours[0] from None
        raise
