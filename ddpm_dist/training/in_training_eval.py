"""In-training evaluation: every eval.every_images, a Fréchet distance on a small n with the same
code as `python -m ddpm_dist.evaluate` (seed-addressed generation shared by all ranks, float64 feature
sums all-reduced), reported to the metrics sinks; from the same features (all-gathered) rank 0 adds KID,
precision / recall and, for class-conditional models, per-class Fréchet distances."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from ..config import Config
from ..eval.feature_metrics import FeatureBank, feature_metrics
from ..eval.job import make_extractor
from ..eval.statistics import FeatureStats, RefStats, accumulate, compute_ref_stats, frechet_distance
from ..parallel.collectives import barrier
from ..sampling import SamplingSetup, make_share, plan_batches, rank_share

log = logging.getLogger(__name__)
REF_FEATURES = 10_000  # real features kept in the cached reference (Inception: 80 MB) for KID and precision / recall


class InTrainingEval:
    def __init__(self, cfg: Config, device: torch.device, rank: int, world_size: int):
        self.cfg = cfg
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.extractor = make_extractor(
            cfg.eval.extractor, inception=cfg.eval.inception or None, data=cfg.data.source, device=device
        )
        self.ref = self._reference()

    def _reference(self) -> RefStats:
        """Reference statistics of the training data (or its validation split, eval.reference), cached in
        the run directory (rank 0 computes)."""
        split = self.cfg.eval.reference
        name = self.extractor.name + ("" if split == "train" else f"_{split}")
        path = os.path.join(self.cfg.run_dir, f"ref_stats_{name}.npz")
        if self.rank == 0 and not os.path.exists(path):
            compute_ref_stats(
                self.cfg.data.source, self.extractor, self.cfg.eval.batch_size, max_features=REF_FEATURES, split=split
            ).save(path)
        barrier()
        ref = RefStats.load(path)
        ref.check(self.extractor)
        return ref

    def __call__(self, ema_model: torch.nn.Module, images_seen: int, metrics) -> float:
        n = self.cfg.eval.num_images
        setup = SamplingSetup.for_model(ema_model, self.cfg.diffusion, self.cfg.sample, "in-training EMA")
        share = rank_share(plan_batches(n, self.cfg.eval.batch_size, set()), self.rank, self.world_size)
        t0 = time.perf_counter()
        made = 0

        def batches():
            nonlocal made
            for indices, images, labels, fresh in make_share(
                setup, share, seed=self.cfg.seed, classes=None, num_images=n
            ):
                if fresh:
                    made += len(images)
                    bank.add_images(indices, labels)
                    yield images

        c, h, w = setup.shape
        dim = self.extractor.features(np.zeros((1, h, w, c), dtype=np.uint8)).shape[1]
        bank = FeatureBank(dim)
        stats = accumulate(self.extractor, batches(), FeatureStats(dim), on_features=bank.add_features)
        stats.all_reduce(self.device)
        gen, labels = bank.gather(self.device)
        mu, sigma = stats.mean_cov()
        value = frechet_distance(mu, sigma, self.ref.mu, self.ref.sigma)
        extra = feature_metrics(gen, labels, self.ref, seed=self.cfg.seed, device=self.device) if self.rank == 0 else {}
        seconds = time.perf_counter() - t0
        metrics.sampling(images=made, images_per_s=made / max(seconds, 1e-9))
        metrics.frechet(value, self.extractor.name, images_seen, stats.n)
        metrics.feature_metrics(extra, self.extractor.name, images_seen)
        if self.rank == 0:
            kind = "FID" if self.extractor.resize_mode == "clean" else "Frechet distance (digits classifier)"
            log.info("%s at %d images: %.3f over %d samples (%.1fs)", kind, images_seen, value, stats.n, seconds)
        return value
