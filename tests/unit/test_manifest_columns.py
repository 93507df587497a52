"""The manifest as columns and its sidecar (issue 24, item 6): JSON and sidecar load to the same manifest; a sidecar
written for another version of the JSON is ignored with a warning; a sidecar that claims this JSON but is corrupt or
has a field out of range is refused with one line; manifests without a sidecar load as before; fuzzed sidecar bytes."""

import dataclasses
import hashlib
import io
import json
import logging
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddpm_dist.data import ShardError, load_manifest
from ddpm_dist.data import manifest as mf
from ddpm_dist.data.manifest import Manifest, ShardInfo, parse_manifest, sidecar_url, write_manifest
from ddpm_dist.data.shard_table import npz_bytes, read_npz
from tests.support.common import DIGITS
from tests.support.fuzz_helpers import bounded, expect, fuzz, one_line


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sample_manifest(base: str = "") -> Manifest:
    train = [
        ShardInfo("a-000.tar", 3, 4096, digest("a"), "a-000.tar.idx.json"),
        ShardInfo("dír/ü-001.tar", 0, 0, digest("b")),  # non-ASCII url, no index, an empty shard
        ShardInfo("s3://bucket/x/c.tar", 5, 10_240, digest("c"), "c.idx"),
    ]
    val = [ShardInfo("v-000.tar", 2, 2048, digest("v"), "v-000.tar.idx.json")]
    return Manifest(train, [16, 16], 1, 10, "png", base, {"label_histogram": {"0": 3, "1": 5}}, val)


def old_to_json(m: Manifest) -> str:
    """What to_json wrote when the manifest held a list of dataclasses (the format is unchanged)."""
    held = (
        {"validation_samples": sum(s.num_samples for s in m.validation), "validation": [vars(s) for s in m.validation]}
        if m.validation
        else {}
    )
    return json.dumps(
        {
            "format": mf.FORMAT,
            "num_samples": sum(s.num_samples for s in m.shards),
            "image_size": m.image_size,
            "channels": m.channels,
            "num_classes": m.num_classes,
            "image_format": m.image_format,
            "shards": [vars(s) for s in m.shards],
            **held,
            **m.extra,
        },
        indent=1,
    )


def same(a: Manifest, b: Manifest) -> None:
    assert a.to_json() == b.to_json() and a.checksum() == b.checksum() and a.base == b.base
    assert a.num_shards == b.num_shards and a.num_samples == b.num_samples == int(a.counts.sum())
    for x, y in ((a, b), (a.split("validation"), b.split("validation"))):
        assert np.array_equal(x.counts, y.counts) and np.array_equal(x.sizes, y.sizes)
        assert np.array_equal(x.sha256, y.sha256) and x.counts.dtype == y.sizes.dtype == np.int64
        assert [x.shard_url(i) for i in range(x.num_shards)] == [y.shard_url(i) for i in range(y.num_shards)]
        assert [x.index_url(i) for i in range(x.num_shards)] == [y.index_url(i) for i in range(y.num_shards)]
        assert list(x.shards) == list(y.shards)


@pytest.fixture
def written(tmp_path):
    url = str(tmp_path / "manifest.json")
    write_manifest(sample_manifest(), url)
    return url


def test_columns_keep_the_json_format_and_rows(written):
    m = sample_manifest()
    assert m.to_json() == old_to_json(m) and list(m.shards) == sample_manifest().shards[:]
    assert m.counts.tolist() == [3, 0, 5] and m.sizes.tolist() == [4096, 0, 10_240] and m.num_samples == 8
    assert m.shards[1] == ShardInfo("dír/ü-001.tar", 0, 0, digest("b"), "") and m.index_url(1) == ""
    assert m.shards[-1].url == "s3://bucket/x/c.tar" == m.shard_url(2) and len(m.shards[0:2]) == 2
    assert m.checksum() == hashlib.sha256("".join(digest(c) for c in "abc").encode()).hexdigest()
    assert m.split("validation").counts.tolist() == [2] and m.held_out() == "validation"
    with pytest.raises(AttributeError, match="read-only .*dataclasses.replace.*with_shards"):
        m.shards[0].bytes = 1
    with pytest.raises(ValueError, match="counts|writeable|read-only"):
        m.counts[0] = 1
    changed = m.with_shards([dataclasses.replace(m.shards[0], num_samples=4), *m.shards[1:]])
    assert changed.num_samples == 9 and m.num_samples == 8 and changed.validation[0] == m.validation[0]


def test_sidecar_and_json_load_the_same_manifest(written, monkeypatch):
    from_json = parse_manifest(open(written, "rb").read(), mf.storage.dirname(written))
    with open(sidecar_url(written), "rb") as f:
        assert set(read_npz(f)) >= {"counts", "sizes", "sha256", "urls", "url_offsets", "json_sha256"}
    monkeypatch.setattr(mf, "parse_manifest", lambda *a: pytest.fail("the JSON was parsed despite its sidecar"))
    from_sidecar = load_manifest(written)
    same(from_sidecar, from_json)
    assert from_sidecar.to_json().encode() == open(written, "rb").read()
    with open(sidecar_url(written), "rb") as f:  # reproducible: the same manifest writes the same sidecar bytes
        assert f.read() == mf._sidecar_bytes(from_json, from_json.to_json().encode())


def test_manifests_without_a_sidecar_load_from_json(tmp_path):
    m = load_manifest(DIGITS)
    assert m.to_json() == open(DIGITS).read() and m.num_shards == 7 and m.num_samples == 1618
    assert not mf.storage.exists(sidecar_url(DIGITS))  # the committed digits keep the JSON path in every e2e test
    url = str(tmp_path / "old.json")
    open(url, "w").write(old_to_json(sample_manifest()))
    same(load_manifest(url), sample_manifest(str(tmp_path)))


def test_a_stale_sidecar_is_ignored_with_a_warning(written, caplog):
    m = load_manifest(written)
    edited = m.with_shards([dataclasses.replace(m.shards[0], num_samples=2), *m.shards[1:]])
    open(written, "w").write(edited.to_json())  # the JSON rewritten by something that knows only JSON
    with caplog.at_level(logging.WARNING, logger=mf.__name__):
        got = load_manifest(written)
    assert got.counts.tolist() == [2, 0, 5] and got.num_samples == 7
    assert any("was written for another version" in r.getMessage() for r in caplog.records)
    mf.write_sidecar(written)  # a fresh sidecar for the JSON as it is, the JSON untouched
    assert open(written).read() == edited.to_json()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=mf.__name__):
        same(load_manifest(written), edited)
    assert not caplog.records


def rewrite(url: str, **changes) -> None:
    """The sidecar with arrays replaced (None: removed), still bound to the same JSON."""
    with open(sidecar_url(url), "rb") as f:
        arrays = dict(read_npz(f))
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    open(sidecar_url(url), "wb").write(npz_bytes(arrays))


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"counts": np.array([3, 0, 11], np.int64)},
            r"counts\[2\]: expected an integer in \[0, sizes // 1024\], got 11",
        ),
        (
            {"sizes": np.array([4096, -1, 10_240], np.int64)},
            r"sizes\[1\]: expected an integer in \[0, 4611686018427387904\]",
        ),
        ({"counts": np.array([3, 0, 5], np.int32)}, r"counts: expected a <i8 array of shape \('n',\), got <i4"),
        ({"counts": np.array([3, 0, 5], ">i8")}, r"counts: expected a <i8 array"),
        ({"sha256": np.zeros((3, 31), np.uint8)}, r"sha256: expected a \|u1 array of shape \(3, 32\)"),
        ({"sizes": None}, r"sizes: expected a <i8 array of shape \(3,\), got nothing"),
        ({"url_offsets": np.array([0, 9, 9, 43], np.int64)}, r"url_offsets\[1\]: expected an integer length >= 1"),
        ({"url_offsets": np.array([0, 9, 24, 42], np.int64)}, r"url_offsets: expected 0 first and 43"),
        (
            {"url_offsets": np.array([0, 9, 11, 43], np.int64)},
            r"url_offsets\[2\]: expected an integer at the start of a UTF-8",
        ),
        (
            {"validation_counts": np.array([3], np.int64)},
            r"validation_counts\[0\]: expected an integer in \[0, validation_sizes",
        ),
        ({"counts": np.zeros(0, np.int64)}, r"counts: expected at least 1 shard"),
        ({"header": np.frombuffer(b'{"sidecar": "x"}', np.uint8)}, r"header: expected \{'sidecar'"),
        (
            {
                "header": np.frombuffer(
                    json.dumps(
                        {"sidecar": mf.SIDECAR_FORMAT, "manifest": {"image_size": [16, 0], "channels": 1}}
                    ).encode(),
                    np.uint8,
                )
            },
            r"image_size: expected an integer in \[1, 16384\]",
        ),
    ],
)
def test_a_bad_sidecar_field_is_one_line(written, changes, message):
    rewrite(written, **changes)
    with pytest.raises(
        ShardError, match=r"manifest sidecar '.*manifest.shards.npz' is not a ddpm_dist shard table \(" + message
    ) as e:
        load_manifest(written)
    assert "delete it to read the JSON" in one_line(e.value)


def test_unreadable_sidecars_are_refused_and_nothing_is_unpickled(written):
    side = sidecar_url(written)
    good = open(side, "rb").read()
    pickled = io.BytesIO()
    np.savez(pickled, counts=np.array([object()], dtype=object), allow_pickle=True)
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("counts.npy", good[:100])
    flipped = bytearray(good)
    flipped[good.index(np.array([4096, 0, 10_240], np.int64).tobytes()) + 9] ^= 1  # in `sizes`: its CRC fails
    for data, why in (
        (b"not a zip", "File is not a zip file"),
        (good[:-40], "zip"),
        (pickled.getvalue(), "holds objects"),
        (deflated.getvalue(), "expected an uncompressed"),
        (bytes(flipped), "CRC"),
    ):
        open(side, "wb").write(data)
        with pytest.raises(ShardError, match="manifest sidecar .* (is unreadable|is not a ddpm_dist)") as e:
            load_manifest(written)
        assert why.lower() in one_line(e.value).lower() or why == "zip", one_line(e.value)
    rewrite_missing = npz_bytes({"counts": np.zeros(1, np.int64)})
    open(side, "wb").write(rewrite_missing)
    with pytest.raises(ShardError, match="is unreadable .*json_sha256"):
        load_manifest(written)


def test_json_errors_name_the_entry(tmp_path):
    doc = json.loads(sample_manifest().to_json())
    for where, key, value, message in (
        (1, "num_samples", 1, r"shards\[1\].num_samples: expected an integer in \[0, 0\]"),
        (2, "sha256", "AB" * 32, r"shards\[2\].sha256: expected 64 lowercase hex"),
        (0, "url", "", r"shards\[0\].url is empty"),
        (0, "bytes", True, r"shards\[0\].bytes: expected int"),
    ):
        bad = json.loads(json.dumps(doc))
        bad["shards"][where][key] = value
        with pytest.raises(ValueError, match=message):
            parse_manifest(json.dumps(bad).encode())
    bad = json.loads(json.dumps(doc))
    bad["validation"][0]["num_samples"] = -1
    with pytest.raises(ValueError, match=r"validation\[0\].num_samples"):
        parse_manifest(json.dumps(bad).encode())


@given(st.lists(st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8)), min_size=1, max_size=3))
@fuzz(300)
def test_fuzzed_sidecar_bytes(tmp_path_factory, edits):
    """Any bytes in place of parts of the sidecar: the genuine manifest, or one line; never anything else."""
    url = str(tmp_path_factory.mktemp("side") / "manifest.json")
    write_manifest(sample_manifest(), url)
    data = bytearray(open(sidecar_url(url), "rb").read())
    for pos, insert in edits:
        pos %= len(data)
        data[pos : pos + len(insert)] = insert
    open(sidecar_url(url), "wb").write(bytes(data))
    with bounded():
        got = expect(lambda: load_manifest(url), (ShardError,))
    if got is not None:  # a change the format does not read, or a stale binding (the JSON is read): the same manifest
        same(got, parse_manifest(open(url, "rb").read(), mf.storage.dirname(url)))
        assert got.to_json() == sample_manifest().to_json()
