"""One metrics processor, several sinks: console (a log line every N steps), metrics.jsonl (rank 0),
Prometheus (every rank, optional), TensorBoard and Weights & Biases (rank 0, optional). Training and sampling report
raw facts; this module aggregates and is the only writer of every sink."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

from ..config import MetricsConfig
from ..goodput import Ledger
from ..redact import to_json

log = logging.getLogger(__name__)


class Metrics:
    def __init__(
        self,
        cfg: MetricsConfig,
        *,
        rank: int,
        local_rank: int,
        world_size: int,
        run: str,
        run_dir: Optional[str] = None,
        log_every: int = 50,
        config_yaml: str = "",
    ):
        """Sinks from `cfg` (the config's metrics section); metrics.jsonl, TensorBoard events and W&B files in
        run_dir (rank 0) when given; `config_yaml` (the resolved config) is shown in TensorBoard and W&B."""
        self.rank, self.world_size, self.log_every = rank, world_size, log_every
        self.boards: list = []  # TensorBoard, W&B: the same scalars and images, against images seen
        if cfg.tensorboard and run_dir and rank == 0:
            from .tensorboard import TensorBoardSink  # the config check made sure the package is there

            self.boards.append(TensorBoardSink(os.path.join(run_dir, "tensorboard"), config_yaml))
        if cfg.wandb and run_dir and rank == 0:
            from .wandb_sink import WandbSink

            self.boards.append(
                WandbSink(run_dir, config_yaml, name=run, project=cfg.wandb_project, entity=cfg.wandb_entity)
            )
        self.last_checkpoint_time: Optional[float] = None  # unix time of the newest committed checkpoint
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl") if (run_dir and cfg.jsonl and rank == 0) else None
        self.prom = None
        self.sd_file = None
        if cfg.prometheus:
            from .prometheus import PrometheusSink, host_address, write_sd_target

            job = cfg.job or os.environ.get("SLURM_JOB_ID", "local")
            port, addr = cfg.prometheus_port + local_rank, cfg.prometheus_addr or host_address()
            self.prom = PrometheusSink(addr=addr, port=port, rank=rank, job=job, run=run)
            self.prom.world_size.set(world_size)
            self.prom.update_process()
            if cfg.sd_dir:
                self.sd_file = write_sd_target(cfg.sd_dir, addr=addr, port=port, rank=rank, job=job, run=run)
        self._window = self._new_window()
        self._last_skipped = 0
        # Goodput (ddpm_dist/goodput.py), a job-level account on rank 0: the run's earlier processes from
        # metrics.jsonl, then this one's rows. `process`: this process's totals since its "start" row, in every
        # train row and in the "end" row close() writes, so that a resume can account for it.
        self.process = dict(steps=0, step_s=0.0, data_wait_s=0.0, startup_s=0.0)
        self._started: Optional[float] = None  # time of this process's "start" row
        self._last_step: Optional[int] = None
        self.ledger = Ledger() if rank == 0 and run_dir else None
        if self.ledger is not None and self.jsonl_path and os.path.isfile(self.jsonl_path):
            with open(self.jsonl_path, "rb") as f:
                for line in f:
                    try:
                        self.ledger.add(json.loads(line))
                    except ValueError:  # a line cut short by a killed process
                        pass

    @staticmethod
    def _new_window() -> dict:
        return dict(loss=0.0, n=0, images=0, t0=time.perf_counter(), wait=0.0, step_seconds=0.0)

    def __enter__(self) -> "Metrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, row: dict) -> None:
        if self.jsonl_path:
            with open(self.jsonl_path, "a") as f:
                f.write(to_json(row) + "\n")
        if self.ledger is not None:
            self.ledger.add(row)
            if self.prom and row.get("event") in ("start", "train", "checkpoint"):
                self.prom.publish_goodput(self.ledger.summary(now=row.get("time")))

    def train_step(
        self,
        *,
        step: int,
        images: int,
        loss,
        lr: float,
        grad_norm,
        step_seconds: float,
        data_wait: float,
        ema_seconds: float,
        rank_images: int,
        skipped_total: int,
        epoch: int,
        loss_mean_fn=None,
    ) -> Optional[dict]:
        """Record one step. `loss` and `grad_norm` may be device tensors: they are read (a host sync) only
        every log_every steps, when the window's row is returned (and logged)."""
        w = self._window
        w["loss"] = w["loss"] + loss
        w["n"] += 1
        w["images"] += rank_images
        w["wait"] += data_wait
        w["step_seconds"] += step_seconds
        proc = self.process
        if not proc["steps"] and self._started is not None:  # start-up: the "start" row to this step's beginning
            proc["startup_s"] = max(0.0, time.time() - step_seconds - self._started)
        proc["steps"] += 1
        proc["step_s"] += max(0.0, step_seconds - data_wait)  # step time without its data wait
        proc["data_wait_s"] += data_wait
        self._last_step = step
        if self.prom:
            p = self.prom
            p.images.inc(rank_images)
            p.steps.inc()
            p.step_seconds.observe(step_seconds)
            p.data_wait.inc(data_wait)
            p.ema_seconds.inc(ema_seconds)
            if skipped_total > self._last_skipped:
                p.skipped.inc(skipped_total - self._last_skipped)
        self._last_skipped = skipped_total
        if step % self.log_every:
            return None
        elapsed = time.perf_counter() - w["t0"]
        mean_loss = float(w["loss"]) / max(w["n"], 1)
        if loss_mean_fn is not None:  # collective: every rank reaches this at the same step
            mean_loss = loss_mean_fn(mean_loss)
        grad_norm = float(grad_norm)
        ips = w["images"] / max(elapsed, 1e-9)
        row = {
            "event": "train",
            "step": step,
            "images": images,
            "epoch": epoch,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": ips * self.world_size,
            "data_wait_share": w["wait"] / max(elapsed, 1e-9),
            "step_seconds": w["step_seconds"] / max(w["n"], 1),
            "skipped": skipped_total,
            "time": time.time(),
            "process": dict(proc),
        }
        if self.last_checkpoint_time is not None:
            row["checkpoint_age_s"] = row["time"] - self.last_checkpoint_time
        if self.prom:
            self.prom.images_per_second.set(ips)
            self.prom.loss.set(mean_loss)
            self.prom.lr.set(lr)
            self.prom.grad_norm.set(grad_norm)
            self.prom.update_process()
        if self.rank == 0:
            log.info(
                "step %d  images %d  loss %.4f  lr %.2e  grad %.3f  %.0f img/s  data wait %.0f%%",
                step,
                images,
                mean_loss,
                lr,
                grad_norm,
                row["images_per_s"],
                100 * row["data_wait_share"],
            )
            self.write(row)
            for board in self.boards:
                board.row("train", row, images)
        self._window = self._new_window()
        return row

    def checkpoint(self, *, duration: float, stall: float, success_time: float, images: int) -> None:
        if self.prom:
            self.prom.ckpt_seconds.set(duration)
            self.prom.ckpt_stall.set(stall)
            if success_time:
                self.prom.ckpt_success.set(success_time)
        if success_time:
            self.last_checkpoint_time = success_time
        row = {"event": "checkpoint", "images": images, "duration_s": duration, "stall_s": stall, "time": time.time()}
        self.write(row)
        for board in self.boards:
            board.row("checkpoint", row, images)

    def state_bytes(self, per_rank: list[dict[str, int]]) -> None:
        """Bytes of model state on every rank (params, optimizer, EMA): a gauge per rank, one row in metrics.jsonl."""
        if self.prom:
            for kind, value in per_rank[self.rank].items():
                self.prom.state_bytes.labels(**self.prom.labels, kind=kind).set(value)
        self.write({"event": "state_bytes", "per_rank": per_rank, "time": time.time()})

    def sampling(self, *, images: int, images_per_s: float) -> None:
        if self.prom:
            self.prom.sample_images.inc(images)
            self.prom.sample_ips.set(images_per_s)

    def frechet(self, value: float, extractor: str, images: int, n: int) -> None:
        if self.prom:
            self.prom.frechet.labels(**self.prom.labels, extractor=extractor).set(value)
        row = {
            "event": "eval",
            "frechet_distance": value,
            "extractor": extractor,
            "images": images,
            "n": n,
            "time": time.time(),
        }
        self.write(row)
        for board in self.boards:
            board.row("eval", row, images)

    def feature_metrics(self, values: dict, extractor: str, images: int) -> None:
        """KID, precision / recall and per-class Fréchet distances (eval/feature_metrics.py). Rank 0 computes them;
        the other ranks pass an empty dict and publish nothing."""
        if not values:
            return
        if self.prom:
            p = self.prom
            for key, gauge in (("kid", p.kid), ("precision", p.precision), ("recall", p.recall)):
                if values.get(key) is not None:
                    gauge.labels(**p.labels, extractor=extractor).set(values[key])
            for c, v in (values.get("class_frechet") or {}).items():
                p.class_frechet.labels(**p.labels, extractor=extractor, **{"class": str(c)}).set(v)
        row = {
            "event": "eval_features",
            "images": images,
            "extractor": extractor,
            **{k: values.get(k) for k in ("kid", "precision", "recall", "class_frechet")},
            "time": time.time(),
        }
        self.write(row)

    def samples(self, *, images: int, diversity: float, path: str) -> None:
        """A sample grid was written (rank 0): a row, and the picture in TensorBoard and W&B."""
        self.event("samples", images=images, diversity=diversity, path=path)
        for board in self.boards:
            board.image(path, images)

    def event(self, kind: str, **fields) -> None:
        row = {"event": kind, **fields, "time": time.time()}
        if kind == "start":
            self._started = row["time"]
        self.write(row)

    def close(self) -> None:
        """Write the "end" row of a process that started training, stop the exporter, withdraw the discovery file,
        close TensorBoard and W&B (idempotent)."""
        if self._started is not None:
            self._started = None
            self.event("end", step=self._last_step, process=dict(self.process))
        if self.prom:
            self.prom.close()
            self.prom = None
        if self.sd_file and os.path.exists(self.sd_file):
            os.unlink(self.sd_file)
        self.sd_file = None
        boards, self.boards = self.boards, []
        for board in boards:
            board.close()
