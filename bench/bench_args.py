"""The command line the model benchmarks share: which preset, batch size and step count, the module docstring as
the help text. Imported from beside the benchmark (bench/ is sys.path[0] when one runs)."""

import argparse


def model_bench_parser(doc: str, *, preset: str, batch: int, steps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=preset)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--steps", type=int, default=steps)
    return p
