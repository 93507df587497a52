"""What the entry points share: the sampler options as command-line flags (built from SamplerOptions, so
each is declared once) and turning expected errors into one-line exits. Entry points only; no library
module imports this."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
import typing
from typing import Callable

from .artifacts import CheckpointError
from .config import ConfigError
from .data import DataError, ShardError, StorageError
from .diffusion import SamplerOptions
from .parallel.faults import PeerLost
from .redact import redact

EXPECTED_ERRORS: tuple = (
    ConfigError,
    FileNotFoundError,
    ValueError,
    DataError,
    ShardError,
    StorageError,
    CheckpointError,
    PeerLost,
)


def add_model_source(parser: argparse.ArgumentParser, what: str = "") -> argparse._MutuallyExclusiveGroup:
    """--run | --export | --diffusers, one of them required (`what`: how the command uses it, for the help); the
    group is returned for a command that takes other sources too (evaluate's --samples). `model_source` reads it."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help=f"{what}a run directory (its newest committed checkpoint)")
    src.add_argument("--export", help=f"{what}an export.safetensors written at the end of training")
    src.add_argument("--diffusers", help=f"{what}a diffusers pipeline or UNet2DModel folder (safetensors weights)")
    return src


def model_source(args: argparse.Namespace) -> str:
    return args.run or args.export or args.diffusers


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --eta, --spacing, --var-type, --guidance, --clip/--no-clip; unset = the run's setting."""
    hints = typing.get_type_hints(SamplerOptions)
    group = parser.add_argument_group("sampler (default: the run's sample section)")
    for f in dataclasses.fields(SamplerOptions):
        kind = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is typing.Union else hints[f.name]
        if kind is bool:
            group.add_argument(
                "--clip" if f.name == "clip_x0" else "--" + f.name.replace("_", "-"),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f.metadata["help"],
            )
        else:
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=kind,
                default=None,
                choices=f.metadata.get("choices"),
                help=f.metadata["help"],
            )


def sampler_overrides(args: argparse.Namespace) -> dict:
    """The sampler flags that were given, as SamplerOptions fields."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SamplerOptions)
        if getattr(args, f.name, None) is not None
    }


def is_rank0() -> bool:
    """Under torchrun/SLURM every rank runs the entry point: only rank 0 reports."""
    from .parallel.env import read_env

    return read_env().rank == 0


def run_cli(main: Callable[[list[str]], int], argv=None) -> None:
    """Run `main`; a known error becomes `error: <one line>` on stderr with exit code 2. Whatever reaches the
    terminal is redacted, an unexpected traceback too (exit code 1, as Python's own)."""
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except EXPECTED_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {redact(msg)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # A process group with a lost peer cannot be torn down politely: leave without waiting on it.
        os._exit(2) if os.environ.get("DDPM_HARD_EXIT") or isinstance(e, PeerLost) else sys.exit(2)
    except Exception:  # noqa: BLE001 - printed like Python would, minus the secrets
        print(redact(traceback.format_exc()), file=sys.stderr, end="", flush=True)
        sys.exit(1)
    sys.exit(code or 0)
