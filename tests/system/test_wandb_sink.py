"""The Weights & Biases sink, with the real wandb package offline (nothing tries the network): a training run and its
resume, read back from W&B's own run files (`run-ID.wandb`, records in wandb's protobuf `Record` schema, framed in
the LevelDB log format that wandb writes). Every scalar equals its row in metrics.jsonl at the same images seen, the
sample grids are the PNGs training wrote, the config is there, and the resume continued the same W&B run."""

import glob
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ddpm_dist.obs.tensorboard import SAMPLES_TAG, TAGS
from ddpm_dist.obs.wandb_sink import RUN_ID_FILE, STEP
from tests.support.train_helpers import SINK_CADENCE, assert_missing_sink_is_one_line, child_env, run_command, train_cmd

pytestmark = pytest.mark.system
SINK = [
    "metrics.wandb=true",
    "metrics.wandb_project=ddpm-test",
    *SINK_CADENCE,
]
STEPS = (6, 10)  # trained, then resumed to 10 steps in the same run directory
BLOCK, FULL, FIRST, MIDDLE, LAST = 32768, 1, 2, 3, 4  # LevelDB log: 32 KiB blocks, a record in one or more chunks
HISTORY_META = {"_step", "_runtime", "_timestamp"}


def wandb_env(tmp):
    """Offline and silent; W&B's own folders (settings, cache, logs) under the test's tmp, none in $HOME."""
    dirs = {k: tmp / k.lower() for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    return child_env(WANDB_MODE="offline", WANDB_SILENT="true", **{k: str(v) for k, v in dirs.items()})


def records(path):
    """The `Record`s of one .wandb file: a 7-byte header (':W&B', magic 0xBEE1, version 0), then LevelDB log
    chunks (crc32 of type byte and data, length, type) that never straddle a 32 KiB block."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), data[:7]
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if (crc, n, kind) == (0, 0, 0):  # the padded end of a block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {pos}"
        pos += 7 + n
        buf = chunk if kind in (FULL, FIRST) else buf + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def read_run(folder):
    """(run id, config, history rows without W&B's own keys) of one offline run folder."""
    (path,) = glob.glob(str(folder / "run-*.wandb"))
    run_id, config, history = None, {}, []
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "history":
            row = {}
            for item in r.history.item:  # a logged value is under key, or under nested_key, an image's fields
                *outer, last = list(item.nested_key) or [item.key]
                inner = row
                for k in outer:
                    inner = inner.setdefault(k, {})
                inner[last] = json.loads(item.value_json)
            history.append({k: v for k, v in row.items() if k not in HISTORY_META})
    return run_id, config, history


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    run, env = tmp / "run", wandb_env(tmp)
    for steps in STEPS:
        r = run_command(train_cmd(run, steps, *SINK), env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-4000:]
    return run


@pytest.fixture(scope="module")
def segments(run):
    """Per start of training (the first run, the resume): its metrics.jsonl rows and its W&B run folder's contents."""
    with open(run / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    starts = [i for i, r in enumerate(rows) if r["event"] == "start"]
    assert len(starts) == len(STEPS), starts
    parts = [rows[a:b] for a, b in zip(starts, starts[1:] + [len(rows)])]
    folders = sorted((run / "wandb").glob("offline-run-*"))  # named by start time: in order
    assert len(folders) == len(STEPS), folders
    return [(part, folder, read_run(folder)) for part, folder in zip(parts, folders)]


def test_resume_continues_the_same_wandb_run(run, segments):
    stored = (run / RUN_ID_FILE).read_text().strip()
    assert len(stored) >= 8 and stored.isalnum(), stored
    assert [run_id for _, _, (run_id, _, _) in segments] == [stored] * len(STEPS)
    assert [f.name.endswith(f"-{stored}") for _, f, _ in segments] == [True] * len(STEPS)
    for _, folder, _ in segments:  # each W&B run was finished (Metrics.close or, failing that, atexit): exit code 0
        (path,) = glob.glob(str(folder / "run-*.wandb"))
        exits = [r.exit for r in records(path) if r.WhichOneof("record_type") == "exit"]
        assert [e.exit_code for e in exits] == [0], (folder.name, exits)


def test_scalars_equal_metrics_jsonl(segments):
    for part, folder, (_, _, history) in segments:
        expected = []
        for row in part:
            values = {tag: row[key] for key, tag in TAGS.get(row["event"], {}).items() if row.get(key) is not None}
            if values:
                expected.append({STEP: row["images"], **values})
        got = [h for h in history if SAMPLES_TAG not in h]
        assert len(got) == len(expected) and len(got) >= 3, (folder.name, len(got), len(expected))
        for g, e in zip(got, expected):
            assert g == e, (folder.name, g, e)  # float64 in both, to the last bit
    kinds = {k for _, _, (_, _, history) in segments for h in history for k in h}
    assert {"train/loss", "checkpoint/duration_seconds", "eval/frechet_distance", "checkpoint/age_seconds"} <= kinds


def test_sample_grids_are_the_written_pngs(segments):
    pairs = []  # (png training wrote, the file W&B logged), in order
    for part, folder, (_, _, history) in segments:
        written = [(r["images"], r["path"]) for r in part if r["event"] == "samples"]
        shown = [(h[STEP], h[SAMPLES_TAG]) for h in history if SAMPLES_TAG in h]
        assert len(written) >= 1 and [i for i, _ in shown] == [i for i, _ in written], (written, shown)
        for (_, png), (_, image) in zip(written, shown):
            assert image["_type"] == "image-file" and image["format"] == "png", image
            pairs.append((png, folder / "files" / image["path"]))
    last = {png: i for i, (png, _) in enumerate(pairs)}  # final_grid.png: the resume rewrote the first run's
    compared = [(png, logged) for i, (png, logged) in enumerate(pairs) if last[png] == i]
    assert len(compared) >= 3 and len(pairs) > len(compared), pairs
    for png, logged in compared:
        np.testing.assert_array_equal(
            np.asarray(Image.open(logged).convert("RGB")), np.asarray(Image.open(png).convert("RGB")), str(png)
        )


def test_config_is_the_resolved_config(run, segments):
    for _, _, (_, config, _) in segments:
        assert config["run_dir"] == str(run)
        assert config["metrics"]["wandb"] is True and config["metrics"]["wandb_project"] == "ddpm-test"
        assert config["train"]["log_every"] == 2 and config["eval"]["num_images"] == 32
    assert [c["train"]["total_images"] for _, _, (_, c, _) in segments] == [16 * s for s in STEPS]


def test_missing_package_is_one_line(tmp_path):
    """Asking for the sink without wandb installed: one line, exit 2, before any work."""
    assert_missing_sink_is_one_line("wandb", tmp_path / "run")
