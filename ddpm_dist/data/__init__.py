"""Shards (build / inspect / verify) and the resumable training stream."""

from .plan import EpochPlan, Layout
from .shard_sets import Manifest, ShardError, build_shards, load_manifest, read_all, verify
from .storage import StorageError
from .stream import DataError, TrainStream, open_manifest

__all__ = [
    "DataError",
    "EpochPlan",
    "Layout",
    "Manifest",
    "ShardError",
    "StorageError",
    "TrainStream",
    "build_shards",
    "load_manifest",
    "open_manifest",
    "read_all",
    "verify",
]
