"""Feature statistics and Fréchet distances against clean-fid's own pipeline, with a small extractor built here."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_dist.eval.statistics import (
    Extractor,
    FeatureStats,
    RefStats,
    StatsMismatch,
    accumulate,
    frechet_distance,
    module_checksum,
)
from tests.support.common import DIGITS, ROOT
from tests.support.feature_nets import stand_in_extractor
from tests.support.train_helpers import run_module


def small_extractor():
    """A random conv net of 64 features (16 channels pooled to 2x2), scaled by 10."""
    return stand_in_extractor("small-test-net", channels=(8, 16), pool=2, scale=10)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("imgs")
    for name, shift in (("a", 0), ("b", 40)):
        (root / name).mkdir()
        for i in range(60):
            img = np.clip(rng.normal(120 + shift, 50, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:06d}.png")
    return root


def test_clean_resize_is_cleanfids_bit_for_bit():
    """Our clean resize (channels clipped straight into the batch, a repeated grey channel resized once) against
    clean-fid's build_resizer("clean"), image by image; and FeatureStats' buffered sums against numpy."""
    from cleanfid.resize import build_resizer

    from ddpm_dist.eval.statistics import clean_resize

    rng = np.random.default_rng(3)
    theirs = build_resizer("clean")
    for shape in ((16, 16), (32, 32), (28, 40), (299, 299), (512, 300)):
        rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        grey = np.repeat(rng.integers(0, 256, (*shape, 1), dtype=np.uint8), 3, axis=-1)
        ours = clean_resize(np.stack([rgb, grey])).numpy()
        assert np.array_equal(ours[0], theirs(rgb).transpose(2, 0, 1)), shape
        assert np.array_equal(ours[1], theirs(grey).transpose(2, 0, 1)), shape
    feats = torch.from_numpy(rng.normal(0.5, 1.0, (2500, 64)))
    stats = FeatureStats(64)
    for i in range(0, 2500, 48):  # crosses FeatureStats.FLUSH_ROWS twice, with a remainder
        stats.add(feats[i : i + 48])
    mu, cov = stats.mean_cov()
    assert stats.n == 2500 and np.allclose(mu, feats.numpy().mean(0), atol=1e-12)
    assert np.allclose(cov, np.cov(feats.numpy(), rowvar=False), atol=1e-10)


def cleanfid_stats(folder, net):
    from cleanfid import fid

    feats = fid.get_folder_features(
        str(folder), model=net, num_workers=0, batch_size=16, device=torch.device("cpu"), mode="clean", verbose=False
    )
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def read(folder, indices):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png")).convert("RGB")) for i in indices])


def test_frechet_distance_equals_cleanfid(folders):
    from cleanfid.fid import frechet_distance as cf_fd

    ext = small_extractor()
    stats = {}
    for name in ("a", "b"):
        s = accumulate(ext, [read(folders / name, range(60))])
        stats[name] = s.mean_cov()
    ours = frechet_distance(*stats["a"], *stats["b"])
    ref = cf_fd(*cleanfid_stats(folders / "a", ext.net), *cleanfid_stats(folders / "b", ext.net))
    assert ours > 0.1 and abs(ours - ref) <= 1e-4 * abs(ref), (ours, ref)


def test_mismatched_reference_statistics_are_refused(folders, tmp_path):
    ext = small_extractor()
    mu, cov = accumulate(ext, [read(folders / "a", range(20))]).mean_cov()
    ref = RefStats(mu, cov, 20, ext.name, ext.checksum, "clean", "data")
    path = ref.save(str(tmp_path / "ref.npz"))
    RefStats.load(path).check(ext)  # same extractor: fine
    other = small_extractor()
    with torch.no_grad():
        other.net.body[0].weight.add_(0.01)
    other.checksum = module_checksum(other.net)
    with pytest.raises(StatsMismatch, match="would not be comparable"):
        RefStats.load(path).check(other)
    legacy = Extractor(ext.name, ext.net, ext.checksum, "none")
    with pytest.raises(StatsMismatch, match="resize"):
        RefStats.load(path).check(legacy)


def test_fid_without_inception_file_says_where_to_put_it(tmp_path, folders):
    env = {**os.environ, "PYTHONPATH": ROOT, "DDPM_INCEPTION": str(tmp_path / "nowhere.pt"), "HOME": str(tmp_path)}
    r = run_module(
        "ddpm_dist.evaluate", "fid", "--samples", folders / "a", "--data", DIGITS, env=env, cwd=tmp_path, timeout=120
    )
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("error: Inception weights 'inception-2015-12-05.pt' not found") and "--inception PATH" in line
    )


def test_an_inception_file_other_than_the_pinned_one_is_refused(tmp_path, monkeypatch):
    """No primary source publishes the file's checksum: the first verified use pins it; a different file is
    refused before it is loaded (TorchScript carries code), with one line, unless explicitly allowed."""
    from ddpm_dist.eval.inception import UnverifiedWeights, file_checksum, verify_inception

    pin = tmp_path / "pin.sha256"
    monkeypatch.setenv("DDPM_INCEPTION_PIN", str(pin))
    first, other = tmp_path / "first.pt", tmp_path / "inception-2015-12-05.pt"
    first.write_bytes(b"the file used first")
    other.write_bytes(b"a planted file")
    verify_inception(str(first), file_checksum(str(first)))
    assert pin.read_text().strip() == file_checksum(str(first))
    verify_inception(str(first), file_checksum(str(first)))  # the same file again: fine
    with pytest.raises(UnverifiedWeights, match="not the checksum pinned in"):
        verify_inception(str(other), file_checksum(str(other)))
    verify_inception(str(other), file_checksum(str(other)), allow_unverified=True)  # allowed: warned, not pinned
    assert pin.read_text().strip() == file_checksum(str(first))

    env = {**os.environ, "PYTHONPATH": ROOT, "HOME": str(tmp_path), "DDPM_INCEPTION_PIN": str(pin)}
    args = ["--data", DIGITS, "--out", tmp_path / "ref.npz", "--inception", other]
    r = run_module("ddpm_dist.evaluate", "ref-stats", *args, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: Inception file '{other}' has sha256 ") and "--allow-unverified-inception" in line
    assert not (tmp_path / "ref.npz").exists()
