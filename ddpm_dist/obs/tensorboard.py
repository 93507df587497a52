"""TensorBoard sink (rank 0): the scalars of the console and Prometheus, sample grids as images, the resolved
config as text. Steps are images seen, as in metrics.jsonl, so runs with other batch sizes line up.
Only the metrics processor writes to it."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# per kind of metrics.jsonl row: field -> TensorBoard tag
TAGS = {
    "train": {
        "loss": "train/loss",
        "lr": "train/lr",
        "images_per_s": "train/images_per_s",
        "step_seconds": "train/step_seconds",
        "grad_norm": "train/grad_norm",
        "data_wait_share": "data/wait_share",
        "skipped": "data/skipped_samples",
        "checkpoint_age_s": "checkpoint/age_seconds",
    },
    "checkpoint": {"duration_s": "checkpoint/duration_seconds", "stall_s": "checkpoint/stall_seconds"},
    "eval": {"frechet_distance": "eval/frechet_distance"},
}
SAMPLES_TAG = "samples/grid"
CONFIG_TAG = "config"


class TensorBoardSink:
    def __init__(self, log_dir: str, config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(log_dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir)
        # TensorBoard renders text as markdown: indenting by four spaces shows the YAML verbatim
        self.writer.add_text(CONFIG_TAG, "\n".join("    " + line for line in config_yaml.splitlines()), 0)
        self.writer.flush()

    def row(self, kind: str, row: dict, images: int) -> None:
        """The scalars of one metrics.jsonl row of `kind` (train, checkpoint, eval) at `images` seen."""
        for key, tag in TAGS[kind].items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, float(row[key]), images, walltime=row.get("time"))
        self.writer.flush()  # a log window or rarer: cheap, and a live TensorBoard sees it at once

    def image(self, path: str, images: int) -> None:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        self.writer.add_image(SAMPLES_TAG, pixels, images, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
