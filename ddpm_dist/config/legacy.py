"""Keys that moved: config files and run directories written before a rename still load.

Each old key found (in a YAML file, a run directory's config.yaml or a `section.key=value` override) is moved to
its new place with one line on stderr naming the new key; setting both the old and the new key is an error."""

from __future__ import annotations

import os
import sys

from .sections import ConfigError

RENAMED = {  # old dotted key -> today's (issue 25: the eval section, both EMAs under ema)
    "train.ema_halflife_images": "ema.halflife_images",
    "train.ema_warmup_ratio": "ema.warmup_ratio",
    "train.eval_every_images": "eval.every_images",
    "train.eval_num_images": "eval.num_images",
    "train.eval_batch_size": "eval.batch_size",
    "train.eval_extractor": "eval.extractor",
    "train.eval_inception": "eval.inception",
    "train.eval_reference": "eval.reference",
}


def upgrade(data: dict, where: str) -> dict:
    """`data` (a parsed config mapping, changed in place) with every renamed key moved to its new section."""
    for old, new in RENAMED.items():
        old_section, old_key = old.split(".")
        new_section, new_key = new.split(".")
        section = data.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        target = data.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # the merge names the bad section
        if new_key in target:
            raise ConfigError(f"{where}: {old} and {new} are both set (the same key: keep {new})")
        target[new_key] = section.pop(old_key)
        notice(f"config: {old} is now {new}")
    return data


def notice(line: str) -> None:
    """One line on stderr, from the first process only (every rank of a job loads the same config)."""
    if (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0":
        print(line, file=sys.stderr, flush=True)
