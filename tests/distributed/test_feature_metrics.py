"""KID against clean-fid's kernel_distance, precision / recall against a brute-force loop, the feature gather
across 2 gloo ranks, and `evaluate ref-stats` + `frechet` end to end in 1 and 2 processes (same result)."""

import json
import math

import numpy as np
import pytest
import torch

from ddpm_dist.eval.feature_metrics import FeatureBank, class_frechet_distances, kernel_distance, precision_recall
from ddpm_dist.eval.statistics import accumulate
from tests.support.common import DIGITS
from tests.support.dist_workers import spawn
from tests.support.train_helpers import run_module
from tests.unit.test_fid import small_extractor


@pytest.fixture(scope="module")
def features():
    """Features of two sets of images (the second shifted in brightness) from the small test extractor."""
    rng = np.random.default_rng(0)
    out = []
    for shift, n in ((0, 70), (30, 50)):
        images = np.clip(rng.normal(120 + shift, 50, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
        kept = []
        accumulate(small_extractor(), [images[:40], images[40:]], on_features=kept.append)
        out.append(torch.cat(kept).double().numpy())
    return out


@pytest.mark.parametrize("subsets,size", [(100, 1000), (7, 30), (1, 10_000)])
def test_kid_equals_cleanfid_kernel_distance(features, subsets, size):
    """(100, 1000): clean-fid's defaults (subsets of min(70, 50) rows); (7, 30): smaller subsets;
    (1, 10_000): one subset of 50 generated rows against a permutation of 50 of the 70 real ones."""
    from cleanfid.fid import kernel_distance as cleanfid_kid

    real, gen = features
    for seed in (0, 123):
        np.random.seed(seed)
        expected = cleanfid_kid(real, gen, num_subsets=subsets, max_subset_size=size)
        ours = kernel_distance(real, gen, subsets, size, seed=seed)
        assert abs(ours - expected) <= 1e-6 * max(abs(expected), 1e-12), (ours, expected)
    assert kernel_distance(real, gen) > 10 * abs(kernel_distance(real[:35], real[35:]))  # shifted set: farther


def brute_force_pr(real, gen, k=3):
    """Kynkäänniemi et al. 2019 as plain loops: a ball around each feature out to its k-th nearest neighbour."""

    def radii(points):
        return [sorted(math.dist(p, q) for q in points)[k] for p in points]  # [0] is the point itself

    def share_inside(points, manifold, r):
        return sum(any(math.dist(p, m) <= rm for m, rm in zip(manifold, r)) for p in points) / len(points)

    real, gen = real.tolist(), gen.tolist()
    return share_inside(gen, real, radii(real)), share_inside(real, gen, radii(gen))


def test_precision_recall_on_sets_with_known_answers():
    rng = np.random.default_rng(1)
    blob = rng.normal(0, 1, (80, 8))
    assert precision_recall(blob, blob) == (1.0, 1.0)  # identical sets
    far = rng.normal(50, 1, (60, 8))
    assert precision_recall(blob, far) == (0.0, 0.0)  # two separated blobs
    assert brute_force_pr(blob, far) == (0.0, 0.0)
    subset = blob[::3]  # every generated feature is a real one: precision 1, recall partial
    p, r = precision_recall(blob, subset)
    assert p == 1.0 and 0 < r < 1 and (p, r) == brute_force_pr(blob, subset)
    narrow = rng.normal(0, 0.3, (70, 8))  # mode collapse: precise, poor recall
    p, r = precision_recall(blob, narrow)
    assert p > 0.9 and r < 0.5 and (p, r) == brute_force_pr(blob, narrow)
    for _ in range(3):  # overlapping blobs of other sizes and spreads: the loop's answer exactly
        real, gen = (
            rng.normal(0, 1, (int(rng.integers(40, 90)), 5)),
            rng.normal(0.7, 1.3, (int(rng.integers(40, 90)), 5)),
        )
        assert precision_recall(real, gen) == brute_force_pr(real, gen)


def test_class_frechet_distances_pick_the_classes_present():
    rng = np.random.default_rng(2)
    feats, labels = rng.normal(0, 1, (30, 4)), np.array([0] * 10 + [1] * 19 + [2])
    mu, sigma = (
        np.stack([feats[labels == c].mean(0) for c in (0, 1)] + [np.zeros(4)]),
        np.stack([np.cov(feats[labels == c], rowvar=False) for c in (0, 1)] + [np.eye(4)]),
    )
    out = class_frechet_distances(feats, labels, mu, sigma, np.array([10, 19, 1]))
    assert set(out) == {0, 1} and all(abs(v) < 1e-6 for v in out.values())  # class 2: a single image


def gather_worker(rank, world, feats, out):
    """Interleaved images per rank, batches of 3, rank 1 one image short: the gather restores index order."""
    mine = list(range(len(feats)))[rank::world]
    bank = FeatureBank(feats.shape[1])
    for i in range(0, len(mine), 3):
        idx = mine[i : i + 3]
        bank.add_images(idx, [j % 4 for j in idx])
        bank.add_features(torch.from_numpy(feats[idx]))
    gathered, labels = bank.gather(torch.device("cpu"))
    np.savez(f"{out}.{rank}.npz", feats=gathered, labels=labels)


def test_feature_gather_across_two_ranks_equals_one_process(tmp_path):
    feats = np.random.default_rng(3).normal(0, 1, (11, 6)).astype(np.float32)
    spawn(gather_worker, 2, feats, str(tmp_path / "g"))
    for rank in (0, 1):
        z = np.load(tmp_path / f"g.{rank}.npz")
        assert np.array_equal(z["feats"], feats.astype(np.float64)) and list(z["labels"]) == [j % 4 for j in range(11)]


@pytest.fixture(scope="module")
def labelled_samples(tmp_path_factory):
    """48 digits written as a sample folder whose sampling.json names each image's class."""
    from ddpm_dist.data import read_all
    from ddpm_dist.sampling import folder

    out = tmp_path_factory.mktemp("digit_samples")
    images, labels = read_all(DIGITS, limit=348)
    for i in range(48):
        folder.write_image(str(out), i, images[300 + i])
    folder.write_provenance(str(out), {"labels": [int(y) for y in labels[300:348]], "seed": 0})
    return out


def evaluate(*args):
    r = run_module("ddpm_dist.evaluate", *args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_ref_stats_and_frechet_end_to_end_in_one_and_two_processes(labelled_samples, tmp_path):
    """ref-stats keeps 500 real features and per-class statistics; frechet with 1 and 2 processes gives the same
    FD, KID, precision, recall and per-class FD (the features are gathered and put back in index order)."""
    ref = tmp_path / "ref.npz"
    out = evaluate("ref-stats", "--extractor", "digits", "--data", DIGITS, "--features", 500, "--out", ref)
    assert "features of 500, 10 per-class statistics" in out
    with np.load(ref, allow_pickle=False) as z:
        assert z["features"].shape == (500, 128) and z["class_sigma"].shape == (10, 128, 128)
        assert z["class_n"].sum() == int(z["n"]) == 1618  # the training split
    results = []
    for world in (1, 2):
        res = tmp_path / f"frechet{world}.json"
        out = evaluate(
            "frechet",
            "--samples",
            labelled_samples,
            "--ref",
            ref,
            "--data",
            DIGITS,
            "--world-size",
            world,
            "--batch-size",
            10,
            "--out",
            res,
        )
        assert "KID" in out and "precision" in out
        results.append(json.loads(res.read_text()))
    one, two = results
    assert one["n"] == two["n"] == 48 and one["kid_subset_size"] == 48 and one["pr_real_n"] == 500
    for key in ("value", "kid"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert (one["precision"], one["recall"]) == (two["precision"], two["recall"])
    assert 0 < one["precision"] <= 1 and 0 < one["recall"] <= 1  # real digits: inside the real manifold
    assert set(one["class_frechet"]) == set(two["class_frechet"]) and len(one["class_frechet"]) >= 8
    for c, v in one["class_frechet"].items():
        assert two["class_frechet"][c] == pytest.approx(v, rel=1e-6, abs=1e-9)
    assert one["class_accuracy"] > 0.8


def test_frechet_without_reference_features_says_why(labelled_samples, tmp_path):
    ref = tmp_path / "ref.npz"
    evaluate("ref-stats", "--extractor", "digits", "--data", DIGITS, "--no-per-class", "--out", ref)
    res = tmp_path / "r.json"
    out = evaluate("frechet", "--samples", labelled_samples, "--ref", ref, "--data", DIGITS, "--out", res)
    r = json.loads(res.read_text())
    assert r["kid"] is None and r["precision"] is None and r["class_frechet"] is None and r["value"] > 0
    assert "ref-stats --features N" in out and "no per-class" in out


def test_feature_metrics_reach_prometheus_and_metrics_jsonl(tmp_path):
    import urllib.request

    from ddpm_dist.config import MetricsConfig
    from ddpm_dist.obs.metrics import Metrics
    from tests.support.common import free_port

    port = free_port()
    cfg = MetricsConfig(prometheus=True, prometheus_port=port, prometheus_addr="127.0.0.1", job="j")
    with Metrics(cfg, rank=0, local_rank=0, world_size=1, run="r", run_dir=str(tmp_path)) as metrics:
        metrics.feature_metrics({}, "digits-classifier", 64)  # another rank: nothing published
        metrics.feature_metrics(
            {"kid": 0.0125, "precision": 0.75, "recall": 0.5, "class_frechet": {"3": 1.5}}, "digits-classifier", 64
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    labels = 'extractor="digits-classifier",job="j",rank="0",run="r"'
    for line in (
        f"ddpm_eval_kid{{{labels}}} 0.0125",
        f"ddpm_eval_precision{{{labels}}} 0.75",
        f"ddpm_eval_recall{{{labels}}} 0.5",
        f'ddpm_eval_class_frechet_distance{{class="3",{labels}}} 1.5',
    ):
        assert line in text, line
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["kid"], r["class_frechet"]) for r in rows] == [("eval_features", 0.0125, {"3": 1.5})]
