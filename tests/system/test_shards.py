"""Shard building from every source, atomic output, inspect/verify, and S3 through a real S3 API server."""

import os
import struct

import numpy as np
import pytest
from PIL import Image

from ddpm_dist.data import ShardError, build_shards, read_all, verify
from ddpm_dist.data.sources import digits_images, iter_digits, iter_folder, iter_numpy, iter_torchvision
from tests.support.common import DIGITS, ROOT
from tests.support.s3_server import s3_endpoint  # noqa: F401 - fixture
from tests.support.train_helpers import digits_args, run_module


def roundtrip(source, out, **kw):
    m = build_shards(source, out, samples_per_shard=64, progress=False, shuffle_seed=None, **kw)
    images, labels = read_all(f"{out}/manifest.json")
    return m, images, labels


def test_digits_round_trip_and_committed_shards_match_a_rebuild(tmp_path):
    images, labels = digits_images(16)
    _, got, got_labels = roundtrip(iter_digits(16), str(tmp_path / "d"))
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
    # The committed shards are exactly what the builder makes (same bytes, same sha256).
    rebuilt = build_shards(
        iter_digits(16), str(tmp_path / "r"), prefix="digits", samples_per_shard=256, progress=False, val_fraction=0.1
    )
    from ddpm_dist.data import load_manifest

    committed = load_manifest(DIGITS)
    assert [s.sha256 for s in rebuilt.shards] == [s.sha256 for s in committed.shards]
    assert [s.sha256 for s in rebuilt.validation] == [s.sha256 for s in committed.validation]


def test_validation_split_is_held_out_of_training(tmp_path):
    """--val-fraction: exactly floor(N F) images in their own shards, disjoint from the training split, together
    every image once; the training stream never yields one; verify reads both; read_all picks by split."""
    from ddpm_dist.data import Layout, TrainStream, load_manifest
    from ddpm_dist.data.samples import iter_tar_samples
    from ddpm_dist.data.storage import read_bytes

    m = build_shards(iter_digits(16), str(tmp_path / "v"), samples_per_shard=100, progress=False, val_fraction=0.25)
    url = str(tmp_path / "v" / "manifest.json")
    loaded = load_manifest(url)
    assert loaded.to_json() == m.to_json()

    def split_keys(name):
        view = loaded.split(name)
        return [
            s["__key__"]
            for i in range(len(view.shards))
            for s in iter_tar_samples(read_bytes(view.shard_url(i)), view.shard_url(i))
        ]

    train, val = split_keys("train"), split_keys("validation")
    assert len(val) == int(1797 * 0.25) == 449 and len(train) == 1797 - 449
    assert not set(train) & set(val) and len(set(train + val)) == 1797
    hist = m.extra["validation_label_histogram"]
    assert sum(hist.values()) == 449 and min(hist.values()) >= 30  # spread over the classes, not one class
    stream = iter(TrainStream(loaded, rank=0, layout=Layout(1, 64, 0), seed=1))
    streamed = {k for _ in range(2 * (1348 // 64)) for k in next(stream)["key"]}  # two epochs
    assert len(streamed) > 1300 and not streamed & set(val)
    assert verify(url, progress=False).samples == 1797
    assert len(read_all(url, split="validation")[0]) == 449 == len(read_all(url, split="held-out")[0])
    assert len(read_all(url)[0]) == 1348 and len(read_all(DIGITS, split="held-out")[0]) == 179
    no_val = build_shards(iter_digits(16), str(tmp_path / "n"), progress=False)
    assert no_val.held_out() == "train" and "validation" not in no_val.to_json()
    with pytest.raises(ShardError, match="no validation split .*--val-fraction"):
        read_all(str(tmp_path / "n" / "manifest.json"), split="validation")
    with pytest.raises(ShardError, match=r"--val-fraction 1.0 is not in \[0, 1\)"):
        build_shards(iter_digits(16), str(tmp_path / "x"), progress=False, val_fraction=1.0)


def test_folder_with_classes_and_flat(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    for i, img in enumerate(imgs):
        d = tmp_path / "src" / ("cat" if i < 4 else "dog")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
        (tmp_path / "flat").mkdir(exist_ok=True)
        Image.fromarray(img).save(tmp_path / "flat" / f"{i:03d}.png")
    m, got, labels = roundtrip(iter_folder(str(tmp_path / "src")), str(tmp_path / "o1"))
    assert np.array_equal(got, imgs) and labels.tolist() == [0] * 4 + [1] * 6 and m.num_classes == 2
    m, got, labels = roundtrip(iter_folder(str(tmp_path / "flat")), str(tmp_path / "o2"))
    assert np.array_equal(got, imgs) and (labels == -1).all() and m.num_classes == 0


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_numpy_arrays(tmp_path, fmt):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (70, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=imgs, labels=np.arange(70) % 7)
    _, got, labels = roundtrip(iter_numpy(str(tmp_path / "a.npz")), str(tmp_path / "o"), image_format=fmt)
    assert np.array_equal(got, imgs) and labels.tolist() == (np.arange(70) % 7).tolist()
    np.save(tmp_path / "b.npy", imgs[:, :, :, 0])
    _, got, labels = roundtrip(iter_numpy(str(tmp_path / "b.npy")), str(tmp_path / "o2"))
    assert np.array_equal(got[..., 0], imgs[..., 0]) and (labels == -1).all()


def test_torchvision_mnist_from_local_files(tmp_path):
    """MNIST's own idx files under ROOT/MNIST/raw (torchvision reads them; nothing is downloaded)."""
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, 5, 28, 28) + imgs.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 5) + labels.tobytes())
    _, got, got_labels = roundtrip(iter_torchvision("mnist", str(tmp_path)), str(tmp_path / "o"))
    assert np.array_equal(got[..., 0], imgs) and got_labels.tolist() == labels.tolist()


def test_torchvision_missing_files_is_a_clear_error(tmp_path):
    from ddpm_dist.data.sources import SourceError

    with pytest.raises(SourceError, match="cifar10 files not found"):
        next(iter_torchvision("cifar10", str(tmp_path)))


def test_cut_by_bytes_and_refuse_non_empty_output(tmp_path):
    m = build_shards(
        iter_digits(16), str(tmp_path / "o"), samples_per_shard=10_000, max_shard_bytes=100_000, progress=False
    )
    assert len(m.shards) > 3 and all(s.bytes <= 100_000 for s in m.shards)
    assert sum(s.num_samples for s in m.shards) == 1797
    with pytest.raises(ShardError, match="not empty"):
        build_shards(iter_digits(16), str(tmp_path / "o"), progress=False)
    build_shards(iter_digits(16), str(tmp_path / "o"), progress=False, overwrite=True)


def test_verify_reports_checksum_and_decode_faults(tmp_path):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(os.path.dirname(DIGITS), d)
    assert verify(str(d / "manifest.json"), progress=False).ok
    data = bytearray((d / "digits-000002.tar").read_bytes())
    i = data.index(b"IDAT") + 8  # inside the first PNG's compressed data
    data[i : i + 4] = b"\xff\xff\xff\xff"
    (d / "digits-000002.tar").write_bytes(bytes(data))
    report = verify(str(d / "manifest.json"), progress=False)
    assert not report.ok
    assert any("digits-000002.tar: sha256 mismatch" in f for f in report.faults)
    assert any("does not decode" in f for f in report.faults)
    r = run_module("ddpm_dist.shards", "verify", d / "manifest.json", timeout=None, env=os.environ)
    assert r.returncode == 1 and "FAULT" in r.stdout


def test_inspect_cli(tmp_path):
    preview = tmp_path / "p.png"
    r = run_module("ddpm_dist.shards", "inspect", DIGITS, "--preview", preview, timeout=None, env=os.environ)
    assert r.returncode == 0 and "samples    1618" in r.stdout and "0:160" in r.stdout
    assert "validation 179 in 1 shards (held out)" in r.stdout
    assert Image.open(tmp_path / "p.png").size[0] > 100


def test_brace_pattern_source():
    from ddpm_dist.data import open_manifest

    m = open_manifest(os.path.join(os.path.dirname(DIGITS), "digits-{000000..000006}.tar"))
    assert m.num_samples == 1618 and m.image_size == [16, 16]


@pytest.mark.system
def test_s3_build_verify_and_stream(tmp_path, s3_endpoint):  # noqa: F811
    from ddpm_dist.data import Layout, TrainStream, load_manifest

    url = "s3://ddpm/digits"
    build_shards(iter_digits(16), url, prefix="digits", samples_per_shard=256, progress=False, val_fraction=0.1)
    assert verify(f"{url}/manifest.json", progress=False).ok
    remote = TrainStream(load_manifest(f"{url}/manifest.json"), rank=0, layout=Layout(1, 32, 2), seed=3)
    local = TrainStream(load_manifest(DIGITS), rank=0, layout=Layout(1, 32, 2), seed=3)
    a, b = iter(remote), iter(local)
    for _ in range(30):
        x, y = next(a), next(b)
        assert x["key"] == y["key"] and (x["image"] == y["image"]).all()
    # the CLI too, and training reads s3:// directly
    env = {**os.environ, "PYTHONPATH": ROOT, "AWS_SECRET_ACCESS_KEY": "ddpm-secret-value-42"}
    r = run_module("ddpm_dist.shards", "verify", f"{url}/manifest.json", timeout=None, env=env)
    assert r.returncode == 0, r.stderr
    source = f"data.source={url}/manifest.json"
    small = "train.total_images=320 train.sample_every_images=0 sample.steps=2 data.num_workers=2".split()
    r = run_module("ddpm_dist.train", *digits_args(tmp_path / "run", source, *small), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ddpm-secret-value-42" not in r.stderr + r.stdout  # no credential in logs


def test_redact_removes_credentials_and_queries():
    from ddpm_dist.data.storage import redact

    assert redact("https://user:pw@host/data/m.json?X-Amz-Signature=abc") == "https://host/data/m.json"
    assert redact("s3://bucket/key") == "s3://bucket/key"


def test_memory_url_and_webdataset_opener():
    """Shards on memory:// (any fsspec protocol); webdataset.WebDataset reads them through the registered opener."""
    import webdataset as wds

    from ddpm_dist.data.storage import register_webdataset_opener

    m = build_shards(
        iter_digits(16), "memory://ddpm-test/digits", samples_per_shard=500, progress=False, overwrite=True
    )
    assert verify("memory://ddpm-test/digits/manifest.json", progress=False).ok
    register_webdataset_opener()
    ds = wds.WebDataset(f"memory://ddpm-test/digits/{m.shards[0].url}", shardshuffle=False)
    samples = [s for _, s in zip(range(5), ds)]
    assert len(samples) == 5 and all("png" in s and "cls" in s for s in samples)
