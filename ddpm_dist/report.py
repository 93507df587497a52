"""python -m ddpm_dist.report --run DIR [--out report.html]: one self-contained HTML page about a run
(finished, running or preempted); open it in any browser, no server and no network needed."""

from __future__ import annotations

import argparse

from .command_line import run_cli
from .redact import redact


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_dist.report", description=__doc__)
    p.add_argument("--run", required=True, help="the run directory (run_dir of the training config)")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN/report.html)")
    return p


def main(argv: list[str]) -> int:
    from .reporting import write_report

    args = build_parser().parse_args(argv)
    path, data = write_report(args.run, args.out)
    print(f"{data.name}: {data.status_text} -> {redact(path)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
