"""glibc malloc settings for training on the CPU.

PyTorch's CPU allocator is plain malloc. By default glibc serves large blocks (activations, gradients: MBs)
with mmap and returns freed memory to the kernel, so every step faults the same pages back in, zero-filled:
on the digits model at batch 128, ~28k page faults per step, 9-17% of the step, and a step time that
depends on the order of allocations. Keeping freed blocks in the process removes that at +1% peak RSS
(bench/cpu_malloc_bench.py): what is kept is what the next step uses again. GPU memory has its own
caching allocator, so this is for CPU processes only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold on 64-bit
TRIM_THRESHOLD = 1 << 30
# Users who tuned the allocator themselves (or swapped it for jemalloc/tcmalloc) keep their settings.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "DDPM_KEEP_MALLOC")

_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; False where they do not apply (not glibc, user settings)."""
    global _applied
    if _applied:
        return True
    if any(k in os.environ for k in USER_SETTINGS) or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = ok
    log.debug(
        "glibc malloc: mmap threshold %d MiB, trim threshold %d MiB (%s)",
        MMAP_THRESHOLD >> 20,
        TRIM_THRESHOLD >> 20,
        "applied" if ok else "refused",
    )
    return ok
