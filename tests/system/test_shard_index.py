"""`python -m ddpm_dist.shards index`: a pattern indexed once (in parts, by any number of processes) gives the same
manifest and indexes as `shards build` wrote for the committed digits; img2dataset's stats are checked; training from
a bare pattern of many shards is refused with one line."""

import json
import os
import shutil

import pytest

from ddpm_dist.data import index
from ddpm_dist.data.manifest import ShardError, load_manifest
from ddpm_dist.data.samples import tar_index
from ddpm_dist.data.shard_sets import MAX_PATTERN_SHARDS, manifest_from_pattern, parse_json, verify
from tests.support.common import DIGITS
from tests.support.slurm_cluster import slurm  # noqa: F401 - fixture
from tests.support.train_helpers import digits_args, run_module

SHARDS = os.path.dirname(DIGITS)
PATTERN = os.path.join(SHARDS, "digits-{000000..000006}.tar")  # the committed training split: 7 shards


def cli(*args, timeout=120):
    return run_module("ddpm_dist.shards", "index", *args, timeout=timeout)


def test_two_processes_index_the_digits_into_out_like_build_did(tmp_path):
    r = cli(PATTERN, "--out", tmp_path / "ix", "--world-size", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "indexed 7 shards (7 with samples), 1618 samples of 16x16x1 png" in r.stdout
    built, m = load_manifest(DIGITS), load_manifest(str(tmp_path / "ix" / "manifest.json"))
    assert [(os.path.basename(s.url), s.num_samples, s.bytes, s.sha256) for s in m.shards] == [
        (s.url, s.num_samples, s.bytes, s.sha256) for s in built.shards
    ]
    assert all(s.url == os.path.join(SHARDS, os.path.basename(s.url)) for s in m.shards)  # absolute: not beside them
    assert (m.num_classes, m.image_format, m.extra["label_histogram"]) == (10, "png", built.extra["label_histogram"])
    for s in built.shards:  # byte for byte the indexes `shards build` wrote
        assert (tmp_path / "ix" / s.index).read_bytes() == open(os.path.join(SHARDS, s.index), "rb").read()
    assert not (tmp_path / "ix" / index.PARTS_DIR).exists()
    assert verify(str(tmp_path / "ix" / "manifest.json"), progress=False).ok


def test_parts_then_finalize_equal_one_process_and_default_out_is_beside_the_shards(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for k in range(3):
        shutil.copy(os.path.join(SHARDS, f"digits-{k:06d}.tar"), data)
    pattern = str(data / "digits-{000000..000002}.tar")
    plan = index.plan_index(pattern)
    assert plan.relative and plan.out == str(data)
    index.index_part(plan, 0, 1)
    one = index.finalize(plan, 1)
    whole = (data / "manifest.json").read_bytes()
    assert [s.url for s in one.shards] == [f"digits-{k:06d}.tar" for k in range(3)]  # relative: relocatable
    assert sorted(os.listdir(data)) == sorted(
        [
            *(f"digits-{k:06d}.tar" for k in range(3)),
            *(f"digits-{k:06d}.tar.idx.json" for k in range(3)),
            *(n for n in os.listdir(data) if n.startswith("manifest.")),
        ]
    )
    for p in (1, 0):  # an array of independent jobs, in any order
        r = cli(pattern, "--part", f"{p}/2")
        assert r.returncode == 0 and f"indexed part {p} of 2" in r.stdout, r.stderr
    parts = json.loads((data / index.PARTS_DIR / "part-00001-of-00002.json").read_bytes())
    assert [x["shard"] for x in parts["records"]] == [1] and parts["records"][0]["num_samples"] == 256
    r = cli(pattern, "--finalize")
    assert r.returncode == 2 and "exists (pass --overwrite" in r.stderr  # the manifest of the first run stays
    r = cli(pattern, "--finalize", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (data / "manifest.json").read_bytes() == whole  # 1 part or 2: the same manifest
    r = cli(pattern, "--finalize", "--overwrite")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no part records" in r.stderr


def test_a_missing_part_is_one_line_and_writes_no_manifest(tmp_path):
    plan = index.plan_index(os.path.join(SHARDS, "digits-{000000..000002}.tar"), str(tmp_path))
    index.index_part(plan, 1, 2)
    with pytest.raises(ShardError, match="part 0 of 2 has not finished"):
        index.finalize(plan, 2)
    assert not (tmp_path / "manifest.json").exists()


def test_img2dataset_stats_must_match_the_tar(tmp_path):
    """A tar with `_stats.json` beside it is img2dataset's: counts from the stats, which must be what the tar holds."""
    shutil.copy(os.path.join(SHARDS, "digits-000000.tar"), tmp_path / "00000.tar")
    stats = {"count": 300, "successes": 256, "failed_to_download": 40, "failed_to_resize": 4}
    (tmp_path / "00000_stats.json").write_text(json.dumps(stats))
    plan = index.plan_index(str(tmp_path))  # the folder: every *.tar in it
    index.index_part(plan, 0, 1)
    m = index.finalize(plan, 1)
    assert m.extra["img2dataset"] == {"shards": 1, **stats} and m.num_samples == 256
    (tmp_path / "00000_stats.json").write_text(json.dumps({**stats, "successes": 257}))
    r = cli(tmp_path, "--overwrite")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "holds 256 samples but its img2dataset stats say 257 succeeded" in r.stderr


@pytest.mark.parametrize(
    "damage,message",
    [
        ("missing", "does not exist"),
        ("gzip", "gzip-compressed"),
        ("truncated", "not a readable tar"),
    ],
)
def test_bad_shards_are_one_line_errors(tmp_path, damage, message):
    data = open(os.path.join(SHARDS, "digits-000000.tar"), "rb").read()
    target = tmp_path / "a.tar"
    if damage == "gzip":
        import gzip

        target.write_bytes(gzip.compress(data))
    elif damage == "truncated":
        target.write_bytes(data[:700])
    r = cli(target, "--out", tmp_path / "ix")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "ix" / "manifest.json").exists()


def test_stream_index_equals_tar_index():
    for k in range(7):
        url = os.path.join(SHARDS, f"digits-{k:06d}.tar")
        record, idx = index.scan_shard(url)
        assert idx == tar_index(open(url, "rb").read()) == parse_json(open(url + ".idx.json", "rb").read())
        assert record["shapes"] == {"16x16x1": record["num_samples"]}


def test_training_from_a_bare_pattern_of_many_shards_is_refused_in_one_line(tmp_path):
    many = f"s3://bucket/crawl/{{00000..{MAX_PATTERN_SHARDS:05d}}}.tar"  # 65 shards: refused before anything is read
    with pytest.raises(
        ShardError,
        match=r"names 65 shards: index it first with `python -m ddpm_dist.shards index "
        r"'s3://bucket/crawl/\{00000\.\.00064\}\.tar' --out DIR` and train from "
        r"DIR/manifest\.json",
    ):
        manifest_from_pattern(many)
    assert manifest_from_pattern(os.path.join(SHARDS, "digits-{000000..000001}.tar")).num_samples == 512  # small: ok
    r = run_module("ddpm_dist.train", *digits_args(tmp_path / "run", f"data.source={many}"), timeout=120)
    assert r.returncode != 0 and "index it first" in r.stderr
    assert len([line for line in r.stderr.splitlines() if "error" in line.lower()]) == 1, r.stderr[-2000:]


def test_slurm_task_entry_runs_the_index_verb(tmp_path):
    """What each task of `launchers.slurm shards` runs: shards.main with the arguments after --."""
    from launchers import slurm as launcher

    assert "shards" in launcher.VERBS
    assert launcher.run_entry("shards", ["index", PATTERN, "--out", str(tmp_path / "ix")]) == 0
    assert load_manifest(str(tmp_path / "ix" / "manifest.json")).num_samples == 1618


@pytest.mark.system
def test_slurm_job_of_two_tasks_indexes_the_pattern(tmp_path, slurm):  # noqa: F811 - the fixture
    """A real SLURM job (launchers.slurm shards, 2 tasks): each task indexes every other shard, task 0 the manifest,
    equal byte for byte to what 2 local processes write."""
    from tests.support.slurm_cluster import job_state, logs, submit, wait_for

    job = submit(tmp_path, "shards", ["index", PATTERN, "--out", str(tmp_path / "ix")])
    wait_for(lambda: job_state(job)[0] in ("COMPLETED", "FAILED", "CANCELLED"), 240, "index job did not end")
    assert job_state(job)[0] == "COMPLETED", logs(tmp_path, job)[-3000:]
    r = cli(PATTERN, "--out", tmp_path / "local", "--world-size", "2")
    assert r.returncode == 0, r.stderr
    a = (tmp_path / "ix" / "manifest.json").read_bytes()
    assert a == (tmp_path / "local" / "manifest.json").read_bytes() and json.loads(a)["num_samples"] == 1618
