"""One test per crash the fuzz tests (tests/unit/test_fuzz_parsers.py) found, through the public entry points; each
failed on the code before its fix (a traceback of another type, a hang, or an allocation of what a header
claimed)."""

import gzip
import io
import json
import os
import tarfile
import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image

from ddpm_dist.config import ConfigError, load_config
from ddpm_dist.data import DataError, ShardError, load_manifest, open_manifest
from ddpm_dist.data import storage as storage_mod
from ddpm_dist.data.shard_sets import decode_image, iter_tar_samples
from ddpm_dist.images import decode_image as decode_bytes
from tests.support.fuzz_helpers import build_dataset, gnu_sparse, header, one_line, read_stream, tar_bytes, within


@pytest.fixture
def data(tmp_path):
    build_dataset(str(tmp_path / "d"))
    return tmp_path / "d"


def edit_manifest(folder, fn):
    doc = json.loads((folder / "manifest.json").read_text())
    fn(doc)
    (folder / "manifest.json").write_text(json.dumps(doc))
    return str(folder / "manifest.json")


def test_manifest_with_zero_byte_shards_is_no_division_by_zero(data):
    def empty(doc):
        for s in doc["shards"]:
            s["bytes"] = s["num_samples"] = 0

    with pytest.raises(DataError, match="cannot fill one batch"):
        read_stream(load_manifest(edit_manifest(data, empty)))


@pytest.mark.parametrize("key,value", [("channels", "three"), ("num_classes", 2.5), ("image_size", [8, "8"])])
def test_manifest_field_of_the_wrong_type_is_a_shard_error(data, key, value):
    with pytest.raises(ShardError, match=f"not a ddpm_dist manifest .*{key}") as e:
        load_manifest(edit_manifest(data, lambda doc: doc.update({key: value})))
    one_line(e.value)


def test_manifest_shard_count_as_a_string_is_a_shard_error(data):
    with pytest.raises(ShardError, match="num_samples: expected int"):
        load_manifest(edit_manifest(data, lambda doc: doc["shards"][0].update(num_samples="6")))


def test_manifest_not_utf8_or_nested_too_deeply_is_a_shard_error(data):
    for raw in (b"\xff\xfe{}", b"[" * 100_000):
        (data / "manifest.json").write_bytes(raw)
        with pytest.raises(ShardError, match="not a ddpm_dist manifest"):
            load_manifest(str(data / "manifest.json"))


def test_manifest_claiming_a_trillion_samples_is_refused_before_planning(data):
    def claim(doc):
        doc["shards"][0].update(num_samples=10**12, bytes=10**16)

    with within(10), pytest.raises(DataError, match="too few for the 1000000000000 samples"):
        read_stream(load_manifest(edit_manifest(data, claim)))


def test_index_entry_claiming_a_terabyte_is_never_requested(data, monkeypatch):
    index = json.loads((data / "shard-000000.tar.idx.json").read_text())
    index[0][1]["png"][1] = 10**12
    (data / "shard-000000.tar.idx.json").write_text(json.dumps(index))
    requested = []
    real = storage_mod.read_range
    monkeypatch.setattr(storage_mod, "read_range", lambda url, a, b: requested.append(b - a) or real(url, a, b))
    with pytest.raises(DataError, match="index .* expected \\[offset >= 0, size <= 67108864\\]"):
        read_stream(load_manifest(str(data / "manifest.json")), batches=6)
    assert all(n <= os.path.getsize(data / "shard-000000.tar") for n in requested)


def test_index_shorter_than_the_shard_is_a_data_error(data):
    index = json.loads((data / "shard-000000.tar.idx.json").read_text())
    (data / "shard-000000.tar.idx.json").write_text(json.dumps(index[:2]))
    with pytest.raises(DataError, match="expected a list of 6 entries"):
        read_stream(load_manifest(str(data / "manifest.json")), batches=6)


def test_tar_member_with_a_huge_claimed_size_is_refused_not_skipped_for_ever():
    raw = header("__meta__.txt", 10**15) + b"\0" * 4096  # webdataset skips "__*__" members: tarfile would seek
    with within(5), pytest.raises(ShardError, match="claims 1000000000000000 bytes"):
        list(iter_tar_samples(raw))


def test_gnu_sparse_member_does_not_inflate():
    raw = gnu_sparse("s.png", 60 << 20, b"x" * 100)  # 2.5 KB of tar, a 60 MB member
    assert len(raw) < 3000
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match="sparse member"):
            list(iter_tar_samples(raw))
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_gzip_compressed_tar_is_refused_with_one_line(tmp_path):
    info = tarfile.TarInfo("a.png")
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    info.size = len(png.getvalue())
    (tmp_path / "s.tar").write_bytes(gzip.compress(tar_bytes([(info, png.getvalue())])))
    with pytest.raises(DataError, match="gzip-compressed: shards must be uncompressed tars"):
        open_manifest(str(tmp_path / "s.tar"))


def test_npy_header_claiming_gigabytes_is_not_allocated():
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 1, 3), np.uint8))
    raw = buf.getvalue().replace(b"(1, 1, 3)", b"(100000, 100000, 3)")
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match="does not match its 13 data bytes"):
            decode_image({"__key__": "k", "npy": raw})
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_a_remembered_npy_header_still_checks_each_sample():
    """Headers are parsed once per distinct header; the per-sample checks (byte count, expected shape) are not."""
    buf = io.BytesIO()
    np.save(buf, np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    raw = buf.getvalue()
    first = decode_image({"__key__": "a", "npy": raw}, (2, 2, 3))
    again = decode_image({"__key__": "b", "npy": memoryview(raw)}, (2, 2, 3))  # a view, as blocks hand them out
    assert (first == again).all() and again.flags.writeable  # a copy: the block's buffer can go
    with pytest.raises(ShardError, match="does not match its 11 data bytes"):
        decode_image({"__key__": "c", "npy": raw[:-1]}, (2, 2, 3))
    with pytest.raises(ShardError, match="is not the expected"):
        decode_image({"__key__": "d", "npy": raw}, (4, 4, 3))
    fortran = raw.replace(b"'fortran_order': False", b"'fortran_order': True ")
    with pytest.raises(ShardError, match="fortran order: True"):
        decode_image({"__key__": "e", "npy": fortran}, (2, 2, 3))


def test_png_over_the_decompression_bomb_limit_is_not_decoded():
    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 100  # over the limit, under twice it: PIL only warns
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="decompression-bomb limit"):
            decode_bytes(buf.getvalue())


def test_png_of_another_size_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    with pytest.raises(ShardError, match="image is 64x64, expected 8x8"):
        decode_image({"__key__": "k", "png": buf.getvalue()}, (8, 8, 3))


@pytest.mark.parametrize("label", [b"99999999999999999999999", b"-3", b"5"])
def test_bad_labels_are_skipped_and_counted(tmp_path, label):
    m = build_dataset(str(tmp_path / "d"), n=6, per_shard=6)  # labels 0..4, num_classes 5
    from ddpm_dist.data.shard_sets import tar_index

    path = tmp_path / "d" / m.shards[0].url
    samples = list(iter_tar_samples(path.read_bytes()))
    samples[0]["cls"] = label
    members = []
    for s in samples:
        for ext in ("png", "cls"):
            info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
            info.size = len(s[ext])
            members.append((info, s[ext]))
    raw = tar_bytes(members)
    path.write_bytes(raw)
    (tmp_path / "d" / m.shards[0].index).write_text(json.dumps(tar_index(raw)))
    import dataclasses

    from ddpm_dist.data.manifest import write_manifest

    m = m.with_shards([dataclasses.replace(m.shards[0], bytes=len(raw)), *m.shards[1:]])  # shards are read-only rows
    write_manifest(m, str(tmp_path / "d" / "manifest.json"))  # sidecar and JSON
    assert load_manifest(str(tmp_path / "d" / "manifest.json")).sizes[0] == len(raw) == m.shards[0].bytes
    stream_batches = read_stream(load_manifest(str(tmp_path / "d" / "manifest.json")), batches=3)
    assert sum(b["skipped"] for b in stream_batches) == 1


def write(tmp_path, text: bytes) -> str:
    (tmp_path / "c.yaml").write_bytes(text)
    return str(tmp_path / "c.yaml")


@pytest.mark.parametrize("text", [b"\xff\xfe", b"name: 2001-13-45\n", b"[" * 3000, b"seed: .inf\n", b"seed: .nan\n"])
def test_yaml_faults_beyond_yaml_error_are_config_errors(tmp_path, text):
    with within(5), pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    one_line(e.value)


def test_yaml_alias_bomb_error_is_one_bounded_line(tmp_path):
    """A billion laughs: cheap to load (the lists are shared), 10^9 elements to repr in the error message."""
    levels = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    with within(5), pytest.raises(ConfigError, match="name: expected a string, got ") as e:
        load_config(write(tmp_path, f"name: [{', '.join(levels)}]\n".encode()))
    one_line(e.value)
