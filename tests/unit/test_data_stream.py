"""The training stream: exact resume, changed world size, equal batches per rank, corrupt samples, faults."""

import io
import os

import numpy as np
import pytest
import webdataset as wds

from ddpm_dist.data import (
    DataError,
    EpochPlan,
    Layout,
    ShardError,
    TrainStream,
    build_shards,
    load_manifest,
)
from ddpm_dist.data.reader import byte_runs
from ddpm_dist.data.shard_sets import read_all
from ddpm_dist.data.sources import iter_numpy
from tests.support.common import DIGITS
from tests.support.plan_reference import block_spans


def keys(batches):
    return [k for b in batches for k in b["key"]]


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def make_stream(rank, world, workers, batch=32, url=DIGITS, **kw):
    return TrainStream(load_manifest(url), rank=rank, layout=Layout(world, batch, workers), seed=7, **kw)


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_resume_reproduces_the_uninterrupted_sequence(world, workers):
    total, cut = 80, 37  # crosses epoch boundaries (28 or 56 batches per rank per epoch)
    for rank in range(world):
        straight = keys(take(make_stream(rank, world, workers), total))
        first = make_stream(rank, world, workers)
        part1 = take(first, cut)
        state = first.state_dict()
        second = make_stream(rank, world, workers)
        second.load_state_dict(state)
        assert keys(part1) + keys(take(second, total - cut)) == straight


def test_every_rank_gets_the_same_number_of_batches_and_an_epoch_has_no_repeats():
    m = load_manifest(DIGITS)
    for world in (1, 2, 3, 5):
        plan = EpochPlan([s.num_samples for s in m.shards], 7, 0, Layout(world, 32, 2))
        seqs = [plan.worker_sequence(r, w) for r in range(world) for w in range(2)]
        allpos = np.concatenate(seqs)
        assert len(allpos) == len(set(allpos.tolist())) == plan.batches_per_rank * world * 32
        assert plan.dropped < world * 32
        for r in range(world):
            stream = make_stream(r, world, 0)
            assert stream.samples_per_epoch == plan.batches_per_rank * world * 32


@pytest.mark.parametrize("old,new", [((2, 0), (1, 0)), ((2, 2), (3, 0)), ((1, 0), (2, 2))])
def test_changed_world_size_continues_the_epoch_without_repeats(old, new):
    """Documented bound: nothing repeats within the epoch, at most new_world*batch - 1 samples go unseen."""
    (w0, k0), (w1, k1) = old, new
    B, cut = 32, 9
    seen = []
    states = []
    for r in range(w0):
        s = make_stream(r, w0, k0, batch=B)
        seen += keys(take(s, cut))
        states.append(s.state_dict())
    assert all(st == states[0] for st in states)  # the cursor is the same on every rank
    streams = [make_stream(r, w1, k1, batch=B) for r in range(w1)]
    for s in streams:
        s.load_state_dict(states[0])
    plan = streams[0]._plan()
    rest = [keys(take(s, plan.batches_per_rank)) for s in streams]
    epoch = seen + [k for part in rest for k in part]
    assert len(epoch) == len(set(epoch))
    assert 1618 - len(epoch) <= w1 * B - 1  # the training split of the digits
    assert all(s.epoch == 1 and s.batches_done == 0 and s.pool is None for s in streams)  # the epoch is over
    nxt = take(streams[0], 1)[0]
    assert nxt["epoch"] == 1 and nxt["batch"] == 0 and len(nxt["key"]) == B


def _shards_with_corrupt(tmp_path, bad_every):
    """Shards where every `bad_every`-th PNG is garbage."""
    from ddpm_dist.data.sources import digits_images

    images, labels = digits_images(16)
    out = tmp_path / "bad"
    npz = tmp_path / "d.npz"
    np.savez(npz, images=images[:400], labels=labels[:400])
    m = build_shards(iter_numpy(str(npz)), str(out), samples_per_shard=100, progress=False, shuffle_seed=None)
    import dataclasses
    import hashlib
    import json

    from ddpm_dist.data.shard_sets import iter_tar_samples

    infos = []
    for info in m.shards:
        path = out / info.url
        samples = list(iter_tar_samples(path.read_bytes()))
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False) as w:
            for i, s in enumerate(samples):
                rec = {"__key__": s["__key__"], "png": s["png"] if i % bad_every else b"not a png", "cls": s["cls"]}
                w.write(rec)
        path.write_bytes(buf.getvalue())
        from ddpm_dist.data.shard_sets import tar_index

        (out / info.index).write_text(json.dumps(tar_index(buf.getvalue())))
        infos.append(
            dataclasses.replace(info, sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue()))
        )
    (out / "manifest.json").write_text(m.with_shards(infos).to_json())  # the JSON alone: the sidecar is stale
    return str(out / "manifest.json")


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    url = _shards_with_corrupt(tmp_path, bad_every=50)  # 2% corrupt
    s = make_stream(0, 1, 0, batch=20, url=url, max_skip_fraction=0.05)
    batches = take(s, 20)  # one epoch
    assert all(b["image"].shape[0] == 20 for b in batches)
    assert s.skipped_total == 8 and sum(b["skipped"] for b in batches) == 8


def test_too_many_corrupt_samples_is_fatal(tmp_path):
    url = _shards_with_corrupt(tmp_path, bad_every=5)  # 20% corrupt
    s = make_stream(0, 1, 0, batch=20, url=url, max_skip_fraction=0.05)
    with pytest.raises(DataError, match="corrupt, more than data.max_skip_fraction=0.05"):
        take(s, 20)


def test_missing_shard_fails_before_training(tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(os.path.dirname(DIGITS), out)
    os.unlink(out / "digits-000003.tar")
    with pytest.raises(DataError, match="do not exist, first '.*digits-000003.tar'"):
        make_stream(0, 1, 0, url=str(out / "manifest.json"))


@pytest.mark.parametrize("buffer", [256 << 20, 64 << 10])
def test_shards_without_an_index_read_through_webdataset(buffer):
    """A brace pattern (no manifest, no index) streams the same samples as the indexed manifest, also a
    block at a time (one pass over each visited tar)."""
    from ddpm_dist.data import open_manifest

    pattern = open_manifest(os.path.join(os.path.dirname(DIGITS), "digits-{000000..000006}.tar"))
    assert not any(s.index for s in pattern.shards)
    a = TrainStream(pattern, rank=0, layout=Layout(1, 32, 0), seed=7, buffer_bytes=buffer)
    assert keys(take(a, 60)) == keys(take(make_stream(0, 1, 0, buffer_bytes=buffer), 60))


def test_random_flip_is_deterministic_and_flips_about_half():
    a = take(make_stream(0, 1, 0, random_flip=True), 5)
    b = take(make_stream(0, 1, 0, random_flip=True), 5)
    c = take(make_stream(0, 1, 0, random_flip=False), 5)
    flipped = sum(
        not np.array_equal(x, y) for ba, bc in zip(a, c) for x, y in zip(ba["image"].numpy(), bc["image"].numpy())
    )
    assert all((x["image"] == y["image"]).all() for x, y in zip(a, b))
    assert 0.3 < flipped / (5 * 32) < 0.7


SMALL_BUFFER = 64 << 10  # digits shards hold 256 samples of ~2 KB: blocks of 15 samples


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_resident_blocks_resume_exactly_and_cover_the_epoch(world, workers):
    total, cut = 60, 23
    for rank in range(world):
        straight = make_stream(rank, world, workers, buffer_bytes=SMALL_BUFFER)
        assert straight.layout.block == 15
        expected = keys(take(straight, total))
        first = make_stream(rank, world, workers, buffer_bytes=SMALL_BUFFER)
        part1 = take(first, cut)
        second = make_stream(rank, world, workers, buffer_bytes=SMALL_BUFFER)
        second.load_state_dict(first.state_dict())
        assert keys(part1) + keys(take(second, total - cut)) == expected
    # a changed buffer is a changed layout: the rest of the epoch is re-planned, nothing repeats
    s = make_stream(0, 1, 0)
    seen = keys(take(s, 10))
    small = make_stream(0, 1, 0, buffer_bytes=SMALL_BUFFER)
    small.load_state_dict(s.state_dict())
    rest = keys(take(small, small._plan().batches_per_rank))
    assert len(set(seen + rest)) == len(seen + rest) > 1618 - 32


def test_a_block_is_one_range_request_within_the_buffer(monkeypatch):
    """Every request of an epoch is one block of consecutive samples of one shard, at most half the buffer
    (the fetched bytes and their per-sample copies both fit), and the block's samples come out shuffled."""
    import fsspec.implementations.local as local

    requests = []
    real = local.LocalFileSystem.cat_file

    def counting(self, path, start=None, end=None, **kw):
        requests.append((os.path.basename(path), start, end))
        return real(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(local.LocalFileSystem, "cat_file", counting)
    s = make_stream(0, 1, 0, batch=16, buffer_bytes=SMALL_BUFFER)
    plan = s._plan()
    order = take(s, plan.batches_per_rank)
    positions = np.concatenate([b["index"].numpy() for b in order])
    shard_of = np.searchsorted(plan.offsets, positions, side="right") - 1
    spans = list(block_spans(shard_of, 15))
    assert len(requests) == len(spans) == sum(-(-n // 15) for n in np.bincount(shard_of) if n)
    assert all(end - start <= SMALL_BUFFER // 2 for _, start, end in requests)
    in_order = 0
    for i, j in spans:  # each block a permutation of consecutive positions of one shard
        block = positions[i:j].tolist()
        assert sorted(block) == list(range(min(block), min(block) + j - i))
        in_order += j - i > 3 and block == sorted(block)
    assert in_order == 0


def test_batches_are_the_shards_uint8_images():
    """Workers ship uint8 B x C x H x W (the step converts on its device): the very pixels of the shards."""
    import torch

    from ddpm_dist.images import model_range, to_model_range

    images, labels = read_all(DIGITS)
    for workers in (0, 2):
        for b in take(make_stream(0, 1, workers), 3):
            assert b["image"].dtype == torch.uint8 and b["label"].dtype == b["index"].dtype == torch.long
            pos = b["index"].numpy()
            assert (b["image"].permute(0, 2, 3, 1).numpy() == images[pos]).all()
            assert (b["label"].numpy() == labels[pos]).all()
            assert torch.equal(model_range(b["image"]), to_model_range(images[pos]))


def test_byte_runs_merge_small_holes_and_cap_requests():
    """One request per contiguous run, at most max_bytes; a hole is read through only when it is small and no
    larger than the sample after it (or 4 KB); every wanted sample lies inside its request."""
    index, off = [], 0
    for i in range(200):
        size = 100_000 if i % 50 else 300  # a few tiny samples
        index.append([f"k{i}", {"cls": [off + 512, 1], "npy": [off + 1536, size]}])
        off += 1536 + -(-size // 512) * 512
    index[7][1] = None  # past the end of a truncated shard: left out
    wanted = [p for p in range(200) if p % 10 != 3]  # holes of one sample (~100 KB > 64 KB): a new request
    runs = byte_runs(index, wanted, max_bytes=1 << 20)
    got = [p for _, _, members in runs for p in members]
    assert got == [p for p in wanted if p != 7]
    for start, end, members in runs:
        assert end - start <= 1 << 20
        for p in members:
            lo = min(o for o, _ in index[p][1].values())
            hi = max(o + n for o, n in index[p][1].values())
            assert start <= lo and hi <= end
    assert len(runs) > 20  # split at every hole and every MiB
    contiguous = byte_runs(index, range(10, 20))
    assert len(contiguous) == 1  # tar headers between neighbours are read through
    # a 10 KB hole is read through for a 100 KB sample after it, not for a 300-byte one
    small, off = [], 0
    for i, size in enumerate([100_000, 10_000, 300, 10_000, 100_000]):
        small.append([f"s{i}", {"npy": [off + 512, size]}])
        off += 512 + -(-size // 512) * 512
    assert len(byte_runs(small, [0, 2])) == 2  # an 11 KB hole before a 300-byte sample: its own request
    assert len(byte_runs(small, [1, 4])) == 1  # a 12 KB hole before a 100 KB sample: read through
    assert len(byte_runs(small, range(5))) == 1


def test_an_index_of_one_entry_per_line_is_parsed_only_where_a_visit_reads(tmp_path):
    """shards build writes one entry per line; a span parses and checks just its lines (an entry outside it may be
    anything), and a stream over such indexes equals one over single-line indexes of the same shards."""
    import json
    import shutil

    from ddpm_dist.data.member_index import index_json, parse_index

    m = load_manifest(DIGITS)
    info = m.shards[0]
    data = open(m.index_url(0), "rb").read()
    assert data.startswith(b"[\n") and data.count(b"\n") == info.num_samples + 1
    whole = parse_index(data, "i", info.num_samples, info.bytes)
    part = parse_index(data, "i", info.num_samples, info.bytes, span=(5, 9))
    assert part[5:9] == whole[5:9] and part[:5] == [None] * 5 and part[9:] == [None] * (info.num_samples - 9)
    entries = json.loads(data)
    entries[0][1]["png"] = [-1, 10**12]  # a bad entry outside the span is never read, so never parsed
    bad = index_json(entries)
    assert parse_index(bad, "i", info.num_samples, info.bytes, span=(5, 9))[5:9] == whole[5:9]
    with pytest.raises(ShardError, match="entry 0 file 'png'"):
        parse_index(bad, "i", info.num_samples, info.bytes, span=(0, 9))
    with pytest.raises(ShardError, match="entry 0 file 'png'"):
        parse_index(bad, "i", info.num_samples, info.bytes)
    # the same shards with single-line indexes stream the same batches (2 workers: visits start mid-shard)
    copy = tmp_path / "digits"
    shutil.copytree(os.path.dirname(DIGITS), copy)
    for idx in copy.glob("*.idx.json"):
        idx.write_text(json.dumps(json.loads(idx.read_text())))
    a = take(make_stream(0, 2, 2, url=str(copy / "manifest.json"), buffer_bytes=SMALL_BUFFER), 30)
    b = take(make_stream(0, 2, 2, buffer_bytes=SMALL_BUFFER), 30)
    assert keys(a) == keys(b) and all((x["image"] == y["image"]).all() for x, y in zip(a, b))


def _mixed_size_jpeg_shards(tmp_path):
    """Two foreign shards of JPEGs of many sizes and aspect ratios, indexed with `shards index`."""
    from PIL import Image

    from ddpm_dist.data.index import finalize, index_part, plan_index

    rng = np.random.default_rng(3)
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"crawl-{s}.tar"), encoder=False) as w:
            for i in range(40):
                h, wd = int(rng.integers(9, 60)), int(rng.integers(9, 60))
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, wd, 3), dtype=np.uint8)).save(buf, format="JPEG")
                w.write({"__key__": f"s{s}i{i:03d}", "jpg": buf.getvalue()})
    plan = plan_index(str(tmp_path / "crawl-{0..1}.tar"))
    index_part(plan, 0, 1)
    finalize(plan, 1)
    return str(tmp_path / "manifest.json")


def test_images_of_any_size_are_fitted_in_the_workers(tmp_path):
    """data.resize: every batch image is decode_for_training's fit of that very sample to data.image_size, a random
    crop is the same after a resume and differs across epochs; without resize the mixed sizes are refused."""
    from ddpm_dist.data.samples import decode_for_training, iter_tar_samples
    from ddpm_dist.rng import mix_seed

    url = _mixed_size_jpeg_shards(tmp_path)
    m = load_manifest(url)
    raw = {}
    for i in range(m.num_shards):
        for k, sample in enumerate(iter_tar_samples(open(m.shard_url(i), "rb").read())):
            raw[int(m.counts[:i].sum()) + k] = sample
    for mode in ("center_crop", "random_crop"):

        def stream(mode=mode):
            return TrainStream(m, rank=0, layout=Layout(1, 8, 2), seed=5, image_size=(16, 16), resize=mode)

        batches = take(stream(), 15)  # 10 batches an epoch: into the second epoch
        for b in batches:
            assert b["image"].shape == (8, 3, 16, 16)
            for img, pos in zip(b["image"].permute(0, 2, 3, 1).numpy(), b["index"].tolist()):
                seed = mix_seed(5, b["epoch"], pos, 0xC209)
                assert (img == decode_for_training(raw[pos], (16, 16, 3), mode, seed)).all()
        first = stream()
        head = take(first, 4)
        resumed = stream()
        resumed.load_state_dict(first.state_dict())
        rest = take(resumed, 11)
        assert all((x["image"] == y["image"]).all() for x, y in zip(head + rest, batches))
        if mode == "random_crop":  # the same sample, cropped elsewhere in the next epoch
            by_pos = {}
            for b in batches:
                for img, pos in zip(b["image"], b["index"].tolist()):
                    by_pos.setdefault(pos, []).append(img)
            assert any(len(v) == 2 and not (v[0] == v[1]).all() for v in by_pos.values())
    with pytest.raises(DataError, match=r"image sizes and data.resize is none: set data.image_size and data.resize"):
        TrainStream(m, rank=0, layout=Layout(1, 8, 0), seed=5)
    with pytest.raises(DataError, match="data.resize 'squash' is not one of none, center_crop"):
        TrainStream(m, rank=0, layout=Layout(1, 8, 0), seed=5, image_size=(16, 16), resize="squash")


def test_train_on_images_of_any_size(tmp_path):
    """`train data.image_size=16 data.resize=center_crop` on a crawl of JPEGs of many sizes: the run trains from
    what the workers fitted (the audit lists every sample of its steps); without data.resize it stops in one line."""
    import json

    from tests.support.train_helpers import run_train

    url = _mixed_size_jpeg_shards(tmp_path)
    size = ["model.image_size=16", "model.in_channels=3", "model.num_classes=0", f"data.source={url}"]
    run_train(tmp_path / "run", 3, *size, "data.image_size=16", "data.resize=center_crop")
    audit = [json.loads(line) for line in open(tmp_path / "run" / "data_audit" / "rank0.jsonl")]
    assert len(audit) == 3
    bad = run_train(tmp_path / "bad", 3, *size, check=False)
    assert bad.returncode != 0 and "image sizes and data.resize is none" in bad.stderr.strip().splitlines()[-1]
