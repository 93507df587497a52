"""Weights & Biases sink (rank 0): the scalars, sample grids and resolved config of the TensorBoard sink, under the
same names (`TAGS`), against images seen (the `images` metric, W&B's x-axis for all of them, as TensorBoard's step),
so runs with other batch sizes line up. Files go to run_dir/wandb. The run id is chosen once and kept in
run_dir/wandb_run_id.txt: a resumed training run continues the same W&B run (resume="allow"). WANDB_MODE=offline
keeps everything on disk (`wandb sync` uploads it later). Only the metrics processor writes to it."""

from __future__ import annotations

import os
import secrets
import string

import yaml

from .tensorboard import SAMPLES_TAG, TAGS

STEP = "images"  # the x-axis of every metric: images seen, a logged value, so a resumed run's replay may go back
RUN_ID_FILE = "wandb_run_id.txt"


def run_id(run_dir: str) -> str:
    """The W&B run id of `run_dir`: the one stored there, or a new one (8 random lowercase letters and digits, as
    wandb makes them) stored now, atomically."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    with open(path + ".tmp", "w") as f:
        f.write(new + "\n")
    os.replace(path + ".tmp", path)
    return new


class WandbSink:
    def __init__(self, run_dir: str, config_yaml: str, *, name: str, project: str, entity: str = ""):
        import wandb

        os.makedirs(run_dir, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(
            project=project or None,
            entity=entity or None,
            name=name,
            id=run_id(run_dir),
            resume="allow",
            dir=run_dir,
            config=yaml.safe_load(config_yaml) or {},  # the resolved config, already redacted (dump_yaml)
        )
        self.run.define_metric(STEP)
        for tag in [*(t for tags in TAGS.values() for t in tags.values()), SAMPLES_TAG]:
            self.run.define_metric(tag, step_metric=STEP)

    def row(self, kind: str, row: dict, images: int) -> None:
        """The scalars of one metrics.jsonl row of `kind` (train, checkpoint, eval) at `images` seen."""
        values = {tag: float(row[key]) for key, tag in TAGS[kind].items() if row.get(key) is not None}
        if values:
            self.run.log({STEP: images, **values})

    def image(self, path: str, images: int) -> None:
        self.run.log({STEP: images, SAMPLES_TAG: self.wandb.Image(path)})

    def close(self) -> None:
        self.run.finish()
