"""Fuzzed parsers (issue 17, item 4): hypothesis drives the manifest, the per-shard index, tar members and sample
decoding with malformed input (the config loader: tests/unit/test_fuzz_config.py). Every example ends in success with
sane output, or in the documented error (ShardError / DataError) with one line of under 500 characters, or in a counted
skipped sample; each in bounded time and bounded Python memory (tests/support/fuzz_helpers.bounded).

Examples (derandomized, so CI runs the same ones every time): manifest structure 600 + manifest bytes 600, index 400,
tar members 800 + tar bytes 600, sample decoding 900 (and 1,200 for the config): 5,100 in all, 20 s on two idle cores
(under a minute on a loaded one). Crashes found on the way are regression tests in tests/unit/test_fuzz_regressions.py.
"""

import copy
import functools
import io
import json
import tarfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddpm_dist.data import DataError, ShardError, load_manifest
from ddpm_dist.data.manifest import MAX_SAMPLE_BYTES, parse_manifest
from ddpm_dist.data.member_index import index_json
from ddpm_dist.data.samples import decode_image, decode_label, iter_tar_samples, tar_index
from tests.support.fuzz_helpers import (
    NUM_CLASSES,
    SHAPE,
    bounded,
    build_dataset,
    expect,
    fuzz,
    gnu_sparse,
    header,
    one_line,
    stream_or_error,
    tar_bytes,
    write_json,
)

WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 10),
    st.integers(-(10**30), 10**30),
    st.sampled_from([0, 1, 10**12, 2**63, -1, 1e308, float("nan"), float("inf")]),
    st.floats(),
    st.text(max_size=20),
    st.lists(st.integers(0, 100), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    m = build_dataset(str(root / "png"))
    build_dataset(str(root / "npy"), fmt="npy")
    return root, m


# ---- manifest ----------------------------------------------------------------------------------------------


def mutate(doc, path_choice, value, action):
    """Replace, delete or add one field of the manifest (top level or one shard entry)."""
    doc = copy.deepcopy(doc)
    shards = doc.get("shards")
    target = doc
    if path_choice[0] == "shard" and isinstance(shards, list) and shards:
        target = shards[path_choice[1] % len(shards)]
    if not isinstance(target, dict):
        return doc
    keys = sorted(target) + ["unknown"]
    key = keys[path_choice[2] % len(keys)]
    if action == "delete":
        target.pop(key, None)
    else:
        target[key] = value
    return doc


@given(
    st.lists(
        st.tuples(
            st.tuples(st.sampled_from(["top", "shard"]), st.integers(0, 3), st.integers(0, 20)),
            WEIRD,
            st.sampled_from(["set", "set", "delete"]),
        ),
        min_size=1,
        max_size=3,
    )
)
@fuzz(600)
def test_manifest_structure(genuine, mutations):
    root, m = genuine
    doc = json.loads((root / "png" / "manifest.json").read_text())
    for where, value, action in mutations:
        doc = mutate(doc, where, value, action)
    path = root / "png" / "fuzzed.json"
    path.write_text(json.dumps(doc))
    with bounded():
        got = expect(lambda: load_manifest(str(path)), (ShardError,))
        if got is not None:
            assert all(s.num_samples >= 0 and s.bytes >= s.num_samples * 1024 for s in got.shards)
            stream_or_error(got, batches=1)


@given(
    st.one_of(
        st.binary(max_size=300),
        st.tuples(st.integers(0, 2000), st.integers(0, 2000), st.binary(max_size=8)),
        st.sampled_from([b"[" * 100_000, b"1" * 5000, b'{"shards": 1e999}', b"\xff\xfe", b"NaN"]),
    )
)
@fuzz(600)
def test_manifest_bytes(genuine, raw):
    root, _ = genuine
    if isinstance(raw, tuple):  # the genuine manifest, spliced
        text = (root / "png" / "manifest.json").read_bytes()
        a, b, insert = raw
        raw = text[: min(a, b)] + insert + text[max(a, b) :]
    with bounded():
        expect(lambda: parse_manifest(raw, str(root / "png")), (ValueError,))


# ---- per-shard index ---------------------------------------------------------------------------------------

INDEX_VALUES = st.one_of(
    st.integers(-5, 5000), st.sampled_from([10**12, 2**63, MAX_SAMPLE_BYTES + 1, -(10**9), True, 1.5, "7", None])
)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 5), st.sampled_from(["offset", "size", "entry", "drop", "files", "key", "dup"]), INDEX_VALUES
        ),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
@fuzz(400)
def test_index(genuine, edits, as_lines):
    """Both layouts: one entry per line (what shards build writes; a visit parses only its lines) and one line."""
    root, m = genuine
    idx_path = root / "png" / m.shards[0].index
    original = idx_path.read_text()
    index = json.loads(original)
    for pos, what, value in edits:
        if not index:
            break
        pos %= len(index)
        if not (
            isinstance(index[pos], list) and len(index[pos]) == 2 and isinstance(index[pos][1], dict) and index[pos][1]
        ):
            continue
        files = index[pos][1]
        ext = sorted(files)[0]
        if not isinstance(files[ext], list) or len(files[ext]) != 2:
            continue
        if what == "offset":
            files[ext][0] = value
        elif what == "size":
            files[ext][1] = value
        elif what == "entry":
            index[pos] = value
        elif what == "drop":
            index.pop(pos)
        elif what == "files":
            index[pos][1] = {} if value is None else {ext: value}
        elif what == "key":
            index[pos][0] = value
        elif what == "dup" and isinstance(value, int) and 0 <= value < len(index):
            index[pos] = copy.deepcopy(index[value])
    try:
        if as_lines:
            idx_path.write_bytes(index_json(index))
        else:
            write_json(idx_path, index)
        with bounded():
            got = stream_or_error(load_manifest(str(root / "png" / "manifest.json")), batches=4)
            assert got is None or all(b["image"].shape[0] == 2 for b in got)
    finally:
        idx_path.write_text(original)


# ---- tar members -------------------------------------------------------------------------------------------

NAMES = st.one_of(
    st.sampled_from(
        [
            "a.png",
            "a.cls",
            "../x.png",
            "/abs/b.png",
            "c" * 300 + ".png",
            "noext",
            "__meta__",
            "d/",
            "k.PNG",
            "k.png.cls",
            ".png",
            "e.npy",
            "__key__.txt",
            "./f.png",
        ]
    ),
    st.text(min_size=1, max_size=40),
)
TYPES = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.AREGTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.DIRTYPE,
        tarfile.FIFOTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.CONTTYPE,
        b"Z",
    ]
)
SIZES = st.one_of(st.integers(0, 3000), st.sampled_from([MAX_SAMPLE_BYTES + 1, 10**12, 8**11, 2**70]))


def png_of(shape=SHAPE) -> bytes:
    from ddpm_dist.images import png_bytes

    return png_bytes(np.zeros(shape, np.uint8))


@given(
    st.lists(st.tuples(NAMES, TYPES, st.binary(max_size=600), st.booleans()), min_size=1, max_size=5),
    st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]),
    st.integers(0, 4),
    SIZES,
    st.one_of(st.none(), st.integers(0, 6000)),
)
@fuzz(800)
def test_tar_members(specs, fmt, claim_at, claimed, cut):
    members = []
    for name, type_, data, real_png in specs:
        info = tarfile.TarInfo(name)
        info.type = type_
        payload = png_of() if real_png else data
        info.size = len(payload) if info.isreg() else 0
        if type_ in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            info.linkname = "a.png"
        if fmt == tarfile.PAX_FORMAT and real_png:
            info.pax_headers = {"comment": "x" * len(data)}
        members.append((info, payload))
    try:
        raw = tar_bytes(members, fmt)
    except (ValueError, UnicodeError):
        return  # tarfile will not write that member (e.g. a USTAR name over 100 bytes)
    if claim_at < len(specs):  # one header claims another size (huge, or not what follows)
        raw = raw[: 512 * claim_at] + header("big.png", claimed) + raw[512 * claim_at :]
    if cut is not None:
        raw = raw[:cut]
    check_tar(raw)


def check_tar(raw: bytes):
    with bounded():
        samples = expect(lambda: list(iter_tar_samples(raw, "memory://x.tar")), (ShardError,))
        if samples is not None:
            assert all(
                isinstance(s["__key__"], str) and sum(len(v) for k, v in s.items() if k[:2] != "__") <= len(raw)
                for s in samples
            )
        index = expect(lambda: tar_index(raw), (ShardError,))
        if index is not None:
            assert all(
                0 <= off and off + size <= max(len(raw), off + size) and size <= MAX_SAMPLE_BYTES
                for _, files in index
                for off, size in files.values()
            )


@given(
    st.one_of(
        st.binary(max_size=2000),
        st.tuples(st.integers(0, 3000), st.binary(min_size=1, max_size=16)),
        st.tuples(st.sampled_from(["sparse", "gzip", "pax-sparse", "longname"]), st.integers(1, 10**9)),
    )
)
@fuzz(600)
def test_tar_bytes(raw):
    if isinstance(raw, tuple) and isinstance(raw[0], int):  # a genuine shard with bytes overwritten
        genuine_tar = tar_bytes([(info_of("s.png", len(png_of())), png_of()), (info_of("s.cls", 1), b"3")])
        at, patch = raw
        raw = genuine_tar[:at] + patch + genuine_tar[at + len(patch) :]
    elif isinstance(raw, tuple):
        kind, n = raw
        if kind == "sparse":
            raw = gnu_sparse("s.png", n, png_of())
        elif kind == "gzip":
            import gzip

            raw = gzip.compress(tar_bytes([(info_of("g.png", 10), b"0" * 10)]))
        elif kind == "pax-sparse":
            info = info_of("p.png", 10)
            info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": str(n)}
            raw = tar_bytes([(info, b"1" * 10)], tarfile.PAX_FORMAT)
        else:
            raw = tar_bytes([(info_of("n" * (n % 20000 + 1) + ".png", 4), b"abcd")])
    check_tar(raw)


def info_of(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


# ---- sample decoding ---------------------------------------------------------------------------------------


def npy_of(shape=SHAPE, dtype=np.uint8) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype))
    return buf.getvalue()


SEEDS = st.sampled_from(["png", "npy", "npy-big", "npy-f8", "png-big", "png-16", "jpg", "empty"])


@functools.lru_cache(maxsize=None)
def seed_bytes(kind: str) -> tuple[str, bytes]:
    if kind == "npy-big":  # a header claiming 100000 x 100000 x 3 and nothing after it
        return "npy", npy_of((1, 1, 3)).replace(b"(1, 1, 3)", b"(100000, 100000, 3)")
    if kind == "npy-f8":
        return "npy", npy_of(SHAPE, np.float64)
    if kind == "png-big":
        return "png", png_of((4000, 4000, 1))
    if kind == "png-16":
        return "png", png_of((16, 8, 3))
    if kind == "jpg":
        return "jpg", b"\xff\xd8\xff\xe0" + bytes(40)
    if kind == "empty":
        return "png", b""
    return kind, png_of() if kind == "png" else npy_of()


@given(
    SEEDS,
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), max_size=4),
    st.integers(0, 10**6),
    st.one_of(
        st.binary(max_size=12),
        st.sampled_from(
            [b"3", b"-1", b"5", b"1e3", b"99999999999999999999999", b" 4\n", b"\xff", b"\xd9\xa3", b"0x2", b"3_0"]
        ),
    ),
)
@fuzz(900)
def test_sample_decoding(kind, flips, cut, label):
    ext, data = seed_bytes(kind)
    data = bytearray(data)
    for at, value in flips:
        if data:
            data[at % len(data)] = value
    sample = {"__key__": "k", ext: bytes(data[:cut]), "cls": label}
    with bounded():
        img = expect(lambda: decode_image(sample, SHAPE), (ShardError,))
        if img is not None:
            assert img.shape == SHAPE and img.dtype == np.uint8
        got = expect(lambda: decode_label(sample, NUM_CLASSES), (ShardError,))
        assert got is None or 0 <= got < NUM_CLASSES


def test_messages_are_one_line():
    one_line(ShardError("x"))
    with pytest.raises(AssertionError):
        one_line(DataError("a\nb"))
