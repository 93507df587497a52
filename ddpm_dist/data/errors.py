"""The data package's fatal error, in a module of its own so that every data module can raise it without a cycle
(stream.py re-exports it)."""


class DataError(RuntimeError):
    """Fatal data problem (missing shard, too many corrupt samples)."""
