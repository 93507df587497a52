"""Feature statistics summed across 2 gloo ranks (float64 sums all-reduced) equal clean-fid's over all the images."""

import numpy as np
import torch

from ddpm_dist.eval.statistics import FeatureStats, accumulate
from tests.support.dist_workers import spawn
from tests.unit.test_fid import cleanfid_stats, folders, read, small_extractor  # noqa: F401 - folders: the fixture


def stats_worker(rank, world, folder, out):
    ext = small_extractor()
    mine = list(range(60))[rank::world]
    stats = accumulate(ext, (read(folder, mine[i : i + 7]) for i in range(0, len(mine), 7)), FeatureStats(64))
    stats.all_reduce(torch.device("cpu"))
    if rank == 0:
        mu, cov = stats.mean_cov()
        np.savez(out, mu=mu, cov=cov, n=stats.n)


def test_distributed_statistics_equal_cleanfid(folders, tmp_path):  # noqa: F811 - the fixture
    out = tmp_path / "stats.npz"
    spawn(stats_worker, 2, str(folders / "a"), str(out))
    ours = np.load(out)
    mu, cov = cleanfid_stats(folders / "a", small_extractor().net)
    assert int(ours["n"]) == 60
    assert np.allclose(ours["mu"], mu, rtol=1e-6, atol=1e-9 * np.abs(mu).max())
    assert np.allclose(ours["cov"], cov, rtol=1e-6, atol=1e-6 * np.abs(cov).max())
