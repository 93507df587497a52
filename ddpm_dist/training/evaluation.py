"""In-training evaluation: every train.eval_every_images, a Fréchet distance on a small n with the same
code as `python -m ddpm_dist.evaluate` (seed-addressed generation shared by all ranks, float64 feature
sums all-reduced), reported to the metrics sinks."""
from __future__ import annotations

import logging
import os
import time

import torch

from ..eval.fid import FeatureStats, RefStats, accumulate, frechet_distance
from ..eval.generate import SamplingSetup, generate_share, plan_batches, rank_share

log = logging.getLogger(__name__)


class InTrainingEval:
    def __init__(self, cfg, model_cfg, schedule, device, rank: int, world_size: int):
        self.cfg, self.model_cfg, self.schedule, self.device = cfg, model_cfg, schedule, device
        self.rank, self.world_size = rank, world_size
        if cfg.train.eval_extractor == "inception":
            from ..eval.fid import inception_extractor
            self.extractor = inception_extractor(cfg.train.eval_inception or None, device)
        else:
            from ..eval.digits_classifier import digits_extractor
            self.extractor = digits_extractor(cfg.data.source, device)[0]
        self.ref = self._reference()

    def _reference(self) -> RefStats:
        """Reference statistics of the training data, cached in the run directory (rank 0 computes)."""
        from ..parallel.env import barrier

        path = os.path.join(self.cfg.run_dir, f"ref_stats_{self.extractor.name}.npz")
        if self.rank == 0 and not os.path.exists(path):
            from ..evaluate import compute_ref_stats
            compute_ref_stats(self.cfg.data.source, self.extractor, 64).save(path)
        barrier()
        ref = RefStats.load(path)
        ref.check(self.extractor)
        return ref

    def __call__(self, ema_model: torch.nn.Module, images_seen: int, metrics) -> float:
        s, n = self.cfg.sample, self.cfg.train.eval_num_images
        setup = SamplingSetup(ema_model, self.schedule, {
            "sampler": s.sampler, "steps": s.steps, "eta": s.eta, "spacing": s.spacing, "var_type": s.var_type,
            "guidance": s.guidance if self.model_cfg.num_classes else 1.0, "clip_x0": s.clip_x0,
            "prediction": self.cfg.diffusion.prediction},
            (self.model_cfg.in_channels, self.model_cfg.image_size, self.model_cfg.image_size),
            self.model_cfg.num_classes, "in-training EMA")
        share = rank_share(plan_batches(n, s.batch_size, set()), self.rank, self.world_size)
        t0 = time.perf_counter()
        made = 0

        def batches():
            nonlocal made
            for _, images, _, fresh in generate_share(setup, share, seed=s.seed, classes=None, num_images=n):
                if fresh:
                    made += len(images)
                    yield images

        c, h, w = setup.shape
        dim = self.extractor.features(torch.zeros((1, h, w, c), dtype=torch.uint8).numpy()).shape[1]
        stats = accumulate(self.extractor, batches(), FeatureStats(dim)).all_reduce(self.device)
        mu, sigma = stats.mean_cov()
        value = frechet_distance(mu, sigma, self.ref.mu, self.ref.sigma)
        seconds = time.perf_counter() - t0
        metrics.sampling(images=made, images_per_s=made / max(seconds, 1e-9))
        metrics.frechet(value, self.extractor.name, images_seen, stats.n)
        if self.rank == 0:
            kind = "FID" if self.extractor.resize_mode == "clean" else "Frechet distance (digits classifier)"
            log.info("%s at %d images: %.3f over %d samples (%.1fs)", kind, images_seen, value, stats.n, seconds)
        return value
