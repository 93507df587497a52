"""The Inception path end to end: a TorchScript file in the format of clean-fid's inception-2015-12-05.pt
(the real FID Inception-v3 architecture at full width, random weights: tests/support/inception_net.py), driven through
`python -m ddpm_dist.evaluate ref-stats` and `evaluate fid --world-size 2` on a few dozen digits upsampled by
the clean resize to 299x299; every number is compared with clean-fid's own pipeline on the same PNGs with the
same network (cleanfid.fid.get_folder_features, mode "clean", InceptionV3W loading the file).

Cost: the Fréchet distance at d=2048 is clean-fid's scipy sqrtm, ~10-25 s on one loaded core, so the samples
all ask for class 0 (one per-class distance besides the FID) and the test checks the distances with the
low-rank identity below instead of more sqrtm calls.

Tolerances: both sides run the same float32 network on the same float32 inputs with one thread (clean-fid: this
process, batches of 8 in file order; ddpm_dist: 1-thread subprocesses, 2 ranks with interleaved images) and the
features come out bit-identical (statistics equal to 1e-14, KID to 3e-13); 1e-6 is asked. With two threads
here, oneDNN's float32 convolutions round differently: features 4e-7, covariances 9e-7, KID 7e-7 relative were
measured then, too close to 1e-6 to test, hence one thread. The FID is within 1e-4 of the exact value (measured
1.5e-5): clean-fid's sqrtm of the singular product of two rank-31 covariances is that accurate."""

import json
import subprocess
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_dist.eval.feature_metrics import precision_recall
from ddpm_dist.eval.inception import INCEPTION_FILE
from tests.support.common import DIGITS, PYTHON, ROOT
from tests.support.inception_net import save_inception_torchscript
from tests.support.train_helpers import child_env

N = 32  # images on each side


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The network file; a 32-image labelled shard set with the same images as PNGs (the reference); 32 other
    digits as a sample folder whose sampling.json says each was asked to be a 0 (the "generated" images)."""
    from ddpm_dist.data import build_shards, read_all
    from ddpm_dist.sampling import folder

    root = tmp_path_factory.mktemp("inception_e2e")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, but it is the file's format
        save_inception_torchscript(str(root / INCEPTION_FILE))
    images, labels = read_all(DIGITS, limit=2 * N)
    (root / "real_png").mkdir()
    for i in range(N):
        Image.fromarray(images[i][..., 0]).save(root / "real_png" / f"{i:06d}.png")
    build_shards(
        ((f"d{i:04d}", images[i], int(labels[i])) for i in range(N)),
        str(root / "shards"),
        samples_per_shard=16,
        shuffle_seed=None,
        progress=False,
    )
    for i in range(N):
        folder.write_image(str(root / "samples"), i, images[N + i])
    folder.write_provenance(str(root / "samples"), {"labels": [0] * N, "seed": 0})
    return root, labels[:N]


def low_rank_frechet(a, b):
    """||mu_a - mu_b||^2 + tr S_a + tr S_b - 2 tr sqrt(S_a S_b) for n << d: with A, B the centred feature rows,
    tr sqrt(S_a S_b) is the nuclear norm of A B^T / sqrt((n_a - 1)(n_b - 1)) (the eigenvalues of S_a S_b are the
    squared singular values of that small matrix); exact, with no sqrtm of a singular 2048x2048 product."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    cross = np.linalg.svd(ca @ cb.T / np.sqrt((len(a) - 1) * (len(b) - 1)), compute_uv=False).sum()
    trace = (ca * ca).sum() / (len(a) - 1) + (cb * cb).sum() / (len(b) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + trace - 2 * cross)


def evaluate(root, *args):
    """Starts `python -m ddpm_dist.evaluate ARGS`; the function returned waits for it to succeed and gives its
    stdout (clean-fid's side runs in this process meanwhile: one thread each, on the two cores)."""
    env = child_env(HOME=str(root), DDPM_INCEPTION_PIN=str(root / "pin.sha256"))  # nothing pinned in the user's home
    out, err = (open(root / f"evaluate-{args[0]}.{name}", "w+") for name in ("out", "err"))
    cmd = [
        PYTHON,
        "-m",
        "ddpm_dist.evaluate",
        *map(str, args),
        "--inception",
        str(root / INCEPTION_FILE),
        "--allow-unverified-inception",
    ]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)

    def wait() -> str:
        try:
            code = p.wait(timeout=300)
        finally:
            p.kill()  # a no-op once it has ended
        with out, err:
            out.seek(0)
            err.seek(0)
            assert code == 0, err.read()[-3000:]
            return out.read()

    return wait


def cleanfid_features(folder, root):
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    net = InceptionV3W(str(root), download=False, resize_inside=False).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the evaluate subprocesses (OMP_NUM_THREADS=1): the same convolution arithmetic
    try:
        return get_folder_features(
            str(folder), net, num_workers=0, batch_size=8, device=torch.device("cpu"), mode="clean", verbose=False
        ).astype(np.float64)
    finally:
        torch.set_num_threads(threads)


def assert_stats_equal(mu, sigma, feats, rtol=1e-6):
    """mu and sigma against np.mean / np.cov of clean-fid's features, relative to each array's scale."""
    ref_mu, ref_sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert np.abs(mu - ref_mu).max() <= rtol * np.abs(ref_mu).max(), np.abs(mu - ref_mu).max() / np.abs(ref_mu).max()
    err = np.abs(sigma - ref_sigma).max() / np.abs(ref_sigma).max()
    assert err <= rtol, err


def test_ref_stats_and_fid_in_two_processes_equal_cleanfid(setup):
    root, real_labels = setup
    ref_stats = evaluate(
        root,
        "ref-stats",
        "--data",
        root / "shards" / "manifest.json",
        "--out",
        root / "ref.npz",
        "--features",
        N,
        "--batch-size",
        8,
    )
    real = cleanfid_features(root / "real_png", root)
    out = ref_stats()
    assert f"reference statistics of {N} train images, features of {N}, 10 per-class statistics" in out
    fid = evaluate(
        root,
        "fid",
        "--samples",
        root / "samples",
        "--ref",
        root / "ref.npz",
        "--world-size",
        2,
        "--batch-size",
        8,
        "--save-stats",
        root / "gen.npz",
        "--out",
        root / "fid.json",
    )
    gen = cleanfid_features(root / "samples", root)
    out = fid()
    assert out.startswith("FID: ") and "KID" in out
    assert real.shape == gen.shape == (N, 2048) and real.std() > 0.01

    with np.load(root / "ref.npz", allow_pickle=False) as z, np.load(root / "gen.npz", allow_pickle=False) as g:
        assert int(z["n"]) == int(g["n"]) == N and z["resize_mode"] == "clean"
        assert_stats_equal(z["mu"], z["sigma"], real)
        assert_stats_equal(g["mu"], g["sigma"], gen)
        assert np.abs(z["features"] - real).max() <= 1e-6 * np.abs(real).max()
        assert np.abs(g["features"] - gen).max() <= 1e-6 * np.abs(gen).max()  # gathered from 2 ranks, index order
        class_mu, class_sigma, class_n = z["class_mu"], z["class_sigma"], z["class_n"]
    assert list(class_n) == [int((real_labels == c).sum()) for c in range(10)]

    result = json.loads((root / "fid.json").read_text())
    assert result["n"] == N and result["ref_n"] == N and result["metric"] == "FID"
    from cleanfid.fid import kernel_distance

    assert result["value"] == pytest.approx(low_rank_frechet(real, gen), rel=1e-4)
    np.random.seed(result["kid_seed"])
    expected_kid = kernel_distance(real, gen)  # clean-fid: kernel_distance(reference, generated)
    assert result["kid"] == pytest.approx(expected_kid, rel=1e-6, abs=1e-12)
    assert (result["precision"], result["recall"]) == precision_recall(real, gen)
    zeros = real[real_labels == 0]
    assert_stats_equal(class_mu[0], class_sigma[0], zeros)
    assert list(result["class_frechet"]) == ["0"]  # the only class asked for
    assert result["class_frechet"]["0"] == pytest.approx(low_rank_frechet(zeros, gen), rel=1e-4)
