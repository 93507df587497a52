"""Metrics that need the features themselves, not only their sums: KID, improved precision / recall, and a
Fréchet distance per class. Each rank keeps its images' features with their global index and class
(FeatureBank); the features (never the images) are all-gathered and put back in index order, so rank 0 sees
the same matrix whatever the world size, and computes.

KID is clean-fid's `kernel_distance` (Binkowski et al. 2018): the unbiased MMD^2 with the kernel
k(x, y) = (x.y / d + 1)^3, averaged over `num_subsets` subsets of min(n_real, n_gen, max_subset_size) rows,
drawn as clean-fid draws them (generated rows first, then real, without replacement, from a RandomState):
with the same seed the value is clean-fid's. Precision / recall are Kynkäänniemi et al. 2019: a feature set's
manifold is the union of balls around its features, each with the radius of its k-th nearest neighbour
(itself excluded); precision is the share of generated features inside the real manifold, recall the share
of real features inside the generated one."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..parallel.collectives import all_gather_rows
from .statistics import frechet_distance

KID_SUBSETS, KID_SUBSET_SIZE, PR_K = 100, 1000, 3  # clean-fid's defaults; k = 3 as in the paper
PR_MAX_ROWS = 10_000  # precision / recall cost O(n^2 d): a seeded sample of at most this many rows per side


class FeatureBank:
    """This rank's features in the order they were made, with the global index and class of each image."""

    def __init__(self, dim: int):
        self.dim = dim
        self.features: list[torch.Tensor] = []
        self.meta: list[torch.Tensor] = []  # rows of (image index, class or -1)

    def add_images(self, indices, labels=None) -> None:
        """Called by the image producer, in the order the features will come."""
        labels = [-1] * len(indices) if labels is None else labels
        self.meta.append(
            torch.tensor(np.stack([np.asarray(indices), np.asarray(labels)], 1).reshape(-1, 2), dtype=torch.int64)
        )

    def add_features(self, features: torch.Tensor) -> None:
        """The network's output as it is (float32 for every extractor here: gathered without loss)."""
        self.features.append(features.detach().cpu())

    def gather(self, device: torch.device) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """All ranks' features (float64) sorted by image index, and their classes (None when unlabelled).
        A collective: every rank calls it."""
        feats = torch.cat(self.features) if self.features else torch.zeros((0, self.dim))
        meta = torch.cat(self.meta) if self.meta else torch.zeros((0, 2), dtype=torch.int64)
        if len(feats) != len(meta):
            raise RuntimeError(f"{len(feats)} features for {len(meta)} images")
        feats, meta = all_gather_rows(feats, device), all_gather_rows(meta, device)
        order = torch.argsort(meta[:, 0], stable=True)
        labels = meta[order, 1].numpy()
        return feats[order].double().numpy(), (None if (labels < 0).any() or not len(labels) else labels)


def kernel_distance(
    real: np.ndarray,
    gen: np.ndarray,
    num_subsets: int = KID_SUBSETS,
    max_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
) -> float:
    """KID, clean-fid's `kernel_distance(real, gen)` after `np.random.seed(seed)`, in float64 on `device`."""
    rs = np.random.RandomState(seed)
    d = real.shape[1]
    m = min(len(real), len(gen), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 features on each side, have {len(real)} real and {len(gen)} generated")
    r, g = (torch.as_tensor(np.asarray(a, dtype=np.float64), device=device) for a in (real, gen))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(num_subsets):
        x = g[torch.from_numpy(rs.choice(len(gen), m, replace=False)).to(device)]
        y = r[torch.from_numpy(rs.choice(len(real), m, replace=False)).to(device)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        total += (a.sum() - a.diagonal().sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / num_subsets / m)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min_(0)


def knn_radii(feats: torch.Tensor, k: int = PR_K, chunk: int = 1024) -> torch.Tensor:
    """Squared distance of every feature to its k-th nearest neighbour in the set, itself excluded."""
    if len(feats) <= k:
        raise ValueError(f"a k={k} nearest-neighbour manifold needs more than {k} features, have {len(feats)}")
    return torch.cat(
        [
            _squared_distances(feats[i : i + chunk], feats).kthvalue(k + 1, dim=1).values
            for i in range(0, len(feats), chunk)
        ]
    )


def coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """The share of `points` inside some ball (a manifold feature and its squared radius)."""
    inside = [
        (_squared_distances(points[i : i + chunk], manifold) <= radii[None, :]).any(1)
        for i in range(0, len(points), chunk)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: np.ndarray, gen: np.ndarray, k: int = PR_K, device: torch.device = torch.device("cpu")
) -> tuple[float, float]:
    r, g = (torch.as_tensor(np.asarray(a, dtype=np.float64), device=device) for a in (real, gen))
    return coverage(g, r, knn_radii(r, k)), coverage(r, g, knn_radii(g, k))


def sample_rows(feats: np.ndarray, max_rows: int, seed: int = 0) -> np.ndarray:
    """At most `max_rows` rows, a seeded uniform sample kept in order (all of them when there are fewer)."""
    if not max_rows or len(feats) <= max_rows:
        return feats
    return feats[np.sort(np.random.default_rng(seed).choice(len(feats), max_rows, replace=False))]


def class_frechet_distances(
    gen: np.ndarray, labels: np.ndarray, class_mu: np.ndarray, class_sigma: np.ndarray, class_n: np.ndarray
) -> dict[int, float]:
    """Generated features of class c against the reference statistics of class c, for every class with at
    least two images on both sides."""
    out = {}
    for c in range(len(class_n)):
        mine = gen[labels == c]
        if len(mine) >= 2 and class_n[c] >= 2:
            out[c] = frechet_distance(mine.mean(0), np.cov(mine, rowvar=False), class_mu[c], class_sigma[c])
    return out


def feature_metrics(
    gen: np.ndarray,
    labels: Optional[np.ndarray],
    ref,
    *,
    seed: int = 0,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    pr_max_rows: int = PR_MAX_ROWS,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """KID, precision, recall and per-class Fréchet distances of generated features against a RefStats (None
    where the reference lacks what a metric needs: features, or per-class statistics for labelled samples)."""
    out: dict = {"kid": None, "precision": None, "recall": None, "class_frechet": None, "notes": []}
    if ref.features is not None and len(ref.features) >= 2 and len(gen) >= 2:
        out["kid"] = kernel_distance(ref.features, gen, kid_subsets, kid_subset_size, seed, device)
        out.update(
            kid_subsets=kid_subsets, kid_subset_size=min(len(ref.features), len(gen), kid_subset_size), kid_seed=seed
        )
        real_pr, gen_pr = sample_rows(ref.features, pr_max_rows, seed), sample_rows(gen, pr_max_rows, seed)
        if min(len(real_pr), len(gen_pr)) > PR_K:
            out["precision"], out["recall"] = precision_recall(real_pr, gen_pr, PR_K, device)
            out.update(pr_k=PR_K, pr_real_n=len(real_pr), pr_gen_n=len(gen_pr))
    else:
        out["notes"].append("no KID / precision / recall: the reference holds no features (ref-stats --features N)")
    if labels is not None:
        if ref.class_n is not None:
            out["class_frechet"] = {
                str(c): v
                for c, v in class_frechet_distances(gen, labels, ref.class_mu, ref.class_sigma, ref.class_n).items()
            }
        else:
            out["notes"].append("no per-class Frechet distance: the reference holds no per-class statistics")
    return out
