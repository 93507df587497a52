"""Logging set-up shared by every process: rank 0 at INFO, the other ranks at WARNING, the rank in each line."""
from __future__ import annotations

import logging


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)
