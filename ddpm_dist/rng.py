"""Deterministic seed derivation shared by the data stream, the trainer and the sampler."""

from __future__ import annotations

_M = 0xFFFFFFFFFFFFFFFF


def mix_seed(*parts: int) -> int:
    """splitmix64 over a tuple of ints -> a 63-bit seed; platform- and version-independent."""
    h = 0x9E3779B97F4A7C15
    for x in parts:
        h = (h ^ (int(x) & _M)) * 0xBF58476D1CE4E5B9 & _M
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & _M
        h ^= h >> 29
    return h & ((1 << 63) - 1)
