"""What every entry point shares: logging set-up and turning expected errors into one-line exits."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from .config import ConfigError

EXPECTED_ERRORS: tuple = (ConfigError, FileNotFoundError, ValueError)


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)


def run_cli(main: Callable[[list[str]], int], argv=None) -> None:
    """Run `main`; a known error becomes `error: <one line>` on stderr with exit code 2."""
    from .data.shards import ShardError
    from .data.stream import DataError
    from .training.checkpoint import CheckpointError

    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except (*EXPECTED_ERRORS, DataError, ShardError, CheckpointError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.stdout.flush()
        os._exit(2) if os.environ.get("DDPM_HARD_EXIT") else sys.exit(2)
    sys.exit(code or 0)
