"""Fréchet distance of generated images: FID with clean-fid's Inception, or a Fréchet distance in the
digits classifier's features. Every rank extracts the features of its own images into float64 sums, one
all-reduce, rank 0 scores and writes the result JSON. Images come from a sample folder or are generated in
memory (no PNG round trip); the reference from saved statistics or a shard set. KID, precision / recall and
per-class Fréchet distances come from the same feature pass: each rank also keeps its features, which are
all-gathered (features, never images) for rank 0 (feature_metrics.py)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ..artifacts import load_trained, run_data_source
from ..data import storage
from ..images import to_float255
from ..obs.log import setup_logging
from ..parallel.collectives import all_reduce_sum_
from ..parallel.env import init_distributed, read_env, shutdown
from ..redact import to_json
from ..sampling import folder
from ..sampling.plan import plan_batches, rank_share
from ..sampling.setup import make_share, prepare
from .feature_metrics import KID_SUBSET_SIZE, KID_SUBSETS, PR_MAX_ROWS, FeatureBank, feature_metrics
from .inception import inception_extractor
from .statistics import Extractor, FeatureStats, RefStats, accumulate, frechet_distance, reference_stats

METRICS = {"fid": "FID", "frechet": "Frechet distance (digits classifier features, not FID)"}
IN_MEMORY_DEFAULT = 1000
REF_FEATURES_FROM_DATA = 50_000  # real features kept when the reference is computed from --data on the fly


def make_extractor(
    kind: str,
    *,
    inception: Optional[str] = None,
    data: Optional[str] = None,
    device: torch.device = torch.device("cpu"),
    allow_unverified: bool = False,
) -> Extractor:
    """'inception' (clean-fid's network from a local, verified file) or 'digits' (a classifier trained on `data`)."""
    if kind == "inception":
        return inception_extractor(inception, device, allow_unverified)
    if not data:
        raise ValueError(
            "the digits extractor needs --data (a labelled shard manifest) to train or load the classifier"
        )
    from .digits_classifier import digits_extractor

    return digits_extractor(data, device)[0]


@dataclass
class FrechetJob:
    metric: str  # fid | frechet
    samples: Optional[str] = None  # a folder/URL of NNNNNN.png (from ddpm_dist.sample), or:
    source: Optional[str] = None  # a run directory or export to generate from in memory
    ref: Optional[str] = None  # reference statistics .npz, or:
    data: Optional[str] = None  # a shard manifest (default for frechet: the run's training data)
    num_images: Optional[int] = None  # in memory; default IN_MEMORY_DEFAULT
    batch_size: int = 64
    seed: int = 0
    classes: Optional[str] = None
    sampler: dict = field(default_factory=dict)  # SamplerOptions fields overriding the run's
    inception: Optional[str] = None
    allow_unverified_inception: bool = False
    out: Optional[str] = None
    feature_metrics: bool = True  # KID, precision / recall, per-class FD (gathers the features)
    kid_subsets: int = KID_SUBSETS
    kid_subset_size: int = KID_SUBSET_SIZE
    pr_max_rows: int = PR_MAX_ROWS
    save_stats: Optional[str] = None  # also save the generated side as a reference-statistics .npz

    def result_path(self) -> str:
        if self.out:
            return self.out
        where = self.samples or (self.source if os.path.isdir(self.source) else os.path.dirname(self.source))
        return storage.join(where, f"{self.metric}.json")


def _training_data(job: FrechetJob, provenance: dict) -> Optional[str]:
    """--data, else the training data of the run that made the images."""
    made_by = provenance.get("source", "").split(" ")[0]
    return job.data or run_data_source(job.source) or run_data_source(made_by if os.path.isdir(made_by) else None)


def frechet_worker(job: FrechetJob) -> None:
    """Every rank: features of its own images into float64 sums; all-reduce; rank 0 scores and writes."""
    env = read_env()
    setup_logging(env.rank)
    env = init_distributed(env)
    try:
        _score(job, env)
    finally:
        shutdown()


def _score(job: FrechetJob, env) -> None:
    rank, world, device = env.rank, env.world_size, env.device
    provenance = folder.read_provenance(job.samples) if job.samples else {}
    data = _training_data(job, provenance)
    extractor = make_extractor(
        "inception" if job.metric == "fid" else "digits",
        inception=job.inception,
        data=data,
        allow_unverified=job.allow_unverified_inception,
        device=device,
    )
    classifier = None
    if job.metric == "frechet":
        from .digits_classifier import digits_extractor

        classifier = digits_extractor(data, device)[1]
    t0 = time.perf_counter()
    hits = torch.zeros(2, dtype=torch.float64)  # correct, labelled: the class accuracy of conditional samples

    bank = None

    def observe(images: np.ndarray, indices, labels) -> np.ndarray:
        if bank is not None:
            bank.add_images(indices, labels)
        if classifier is not None and labels is not None:
            with torch.no_grad():
                pred = classifier(to_float255(images).to(device)).argmax(1).cpu()
            hits.add_(
                torch.tensor([float((pred == torch.tensor(labels)).sum()), float(len(labels))], dtype=torch.float64)
            )
        return images

    if job.samples:
        indices = folder.sample_indices(job.samples)
        mine, labels = indices[rank::world], provenance.get("labels")
        n_total, probe = len(indices), folder.read_image(job.samples, indices[0])
        batches = (
            observe(
                np.stack([folder.read_image(job.samples, k) for k in idx]),
                idx,
                [labels[k] for k in idx] if labels else None,
            )
            for idx in (mine[i : i + job.batch_size] for i in range(0, len(mine), job.batch_size))
        )
    else:
        setup = prepare(load_trained(job.source), device, job.sampler)
        provenance = {"source": setup.source, **setup.options.to_dict(), "seed": job.seed, "classes": job.classes}
        n_total = job.num_images or IN_MEMORY_DEFAULT
        share = rank_share(plan_batches(n_total, job.batch_size, set()), rank, world)
        probe = np.zeros((setup.shape[1], setup.shape[2], setup.shape[0]), dtype=np.uint8)
        batches = (
            observe(imgs, idx, lab)
            for idx, imgs, lab, fresh in make_share(
                setup, share, seed=job.seed, classes=job.classes, num_images=n_total
            )
            if fresh
        )  # repeats count once
    bar = tqdm(total=n_total, desc="features", unit="img", disable=rank != 0)
    dim = extractor.features(probe[None]).shape[1]  # ranks without images still join the all-reduce
    bank = FeatureBank(dim) if job.feature_metrics or job.save_stats else None
    stats = accumulate(
        extractor,
        batches,
        FeatureStats(dim),
        on_batch=lambda n: bar.update(n * world),
        on_features=bank.add_features if bank else None,
    )
    bar.close()
    stats.all_reduce(device)
    correct, labelled = all_reduce_sum_(hits.to(device)).tolist()
    gen, gen_labels = bank.gather(device) if bank else (None, None)
    if rank != 0:
        return
    ref = reference_stats(
        extractor,
        ref=job.ref,
        data=data,
        batch_size=job.batch_size,
        max_features=REF_FEATURES_FROM_DATA if job.feature_metrics else 0,
    )
    mu, sigma = stats.mean_cov()
    if job.save_stats:
        source = provenance.get("source") or storage.redact(job.samples)
        RefStats.of(stats, extractor, f"generated: {source}", gen.astype(np.float32)).save(job.save_stats)
    extra = (
        feature_metrics(
            gen,
            gen_labels,
            ref,
            seed=job.seed,
            kid_subsets=job.kid_subsets,
            kid_subset_size=job.kid_subset_size,
            pr_max_rows=job.pr_max_rows,
            device=device,
        )
        if job.feature_metrics
        else {}
    )
    result = {
        "metric": METRICS[job.metric],
        "value": frechet_distance(mu, sigma, ref.mu, ref.sigma),
        "n": stats.n,
        "ref_n": ref.n,
        "extractor": extractor.name,
        "extractor_checksum": extractor.checksum,
        "resize_mode": extractor.resize_mode,
        "class_accuracy": correct / labelled if labelled else None,
        **extra,
        "seconds": time.perf_counter() - t0,
        **{k: provenance.get(k) for k in ("source", "sampler", "steps", "eta", "guidance", "seed", "classes")},
    }
    storage.write_bytes_atomic(job.result_path(), to_json(result, indent=1).encode())


def read_result(job: FrechetJob) -> dict:
    return json.loads(storage.read_bytes(job.result_path()))
