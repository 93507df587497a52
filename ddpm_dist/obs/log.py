"""Logging set-up shared by every process: rank 0 at INFO, the other ranks at WARNING, the rank in each line."""

from __future__ import annotations

import logging

from ..redact import RedactingFormatter


def setup_logging(rank: int = 0) -> None:
    """Every line goes through the one redaction (URL credentials and queries, secret environment values)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(RedactingFormatter(f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S"))
