"""Async checkpoint saves: torch.distributed.checkpoint.async_save with one stager for the whole run.

The stager keeps its staging copy and refills it in place at the next save (torch's StateDictStager caches a buffer
per source storage), where a stager per save paid the page faults of a fresh allocation every time. It stages in a
thread of its own while the next step's forward and backward run; the step waits for it before the optimizer
changes the weights (the loop's run_step calls wait_for_staging; torchtitan's zero-overhead mode does the same).
Pinned on a GPU, for the device-to-host copy. bench/checkpoint_bench.py measures each part."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Optional

import torch.distributed.checkpoint as dcp


class AsyncSaver:
    def __init__(self, pinned: bool = False, staging_thread: bool = True):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.stager = DefaultStager(StagingOptions(pinned, False, staging_thread, pinned))
        self.staging: Optional[Future] = None

    def start(self, tensors: dict, writer, group) -> Future:
        """Stage `tensors` (in the stager's thread, or here) and write them in the background; the write's future."""
        response = dcp.async_save(tensors, storage_writer=writer, process_group=group, async_stager=self.stager)
        staged_apart = hasattr(response, "staging_completion")  # the stager stages in its own thread
        self.staging = response.staging_completion if staged_apart else None
        return response.upload_completion if staged_apart else response

    def wait_for_staging(self, errors: tuple) -> float:
        """Block until the staging copy is complete; the seconds blocked. A failed staging is not raised here: the
        write fails with it and the manager's poll() reports it."""
        if self.staging is None:
            return 0.0
        t0 = time.perf_counter()
        try:
            self.staging.result()
        except errors:  # noqa: BLE001
            pass
        self.staging = None
        return time.perf_counter() - t0
