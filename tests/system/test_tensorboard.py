"""The TensorBoard sink, read back through a real TensorBoard server's HTTP API: every scalar equals its row in
metrics.jsonl (at the same images seen), the sample grids are the PNGs training wrote, the config is there."""

import io
import json
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from ddpm_dist.obs.tensorboard import CONFIG_TAG, SAMPLES_TAG, TAGS
from tests.support.common import wait_for
from tests.support.train_helpers import SINK_CADENCE, assert_missing_sink_is_one_line, run_train

pytestmark = pytest.mark.system
SINK = [
    "metrics.tensorboard=true",
    *SINK_CADENCE,
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tb") / "run"
    run_train(run, 8, *SINK)
    return run


@pytest.fixture(scope="module")
def server(run):
    """`tensorboard` on 127.0.0.1 (a port it picks) over the run's events; stopped by its PID."""
    exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    proc = subprocess.Popen(
        [exe, "--logdir", str(run / "tensorboard"), "--host", "127.0.0.1", "--port", "0", "--load_fast=false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        for line in proc.stderr:  # "TensorBoard 2.x at http://127.0.0.1:PORT/ (Press CTRL+C to quit)"
            m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if m:
                url = m.group(1)
                break
        assert url, f"tensorboard exited ({proc.poll()}) without naming its address"

        def get(path, **query):
            with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=30) as r:
                return r.read()

        def loaded():  # the server reads event files in the background: wait for the last tags to appear
            try:
                tags = json.loads(get("/data/plugin/scalars/tags")).get(".", {})
                images = json.loads(get("/data/plugin/images/tags")).get(".", {})
            except OSError:
                return False
            return "checkpoint/duration_seconds" in tags and SAMPLES_TAG in images

        wait_for(loaded, 120, "tensorboard serving the run's scalars and images")
        yield get
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rows(run, event):
    with open(run / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["event"] == event]


def scalars(get, tag) -> dict[int, float]:
    return {step: value for _, step, value in json.loads(get("/data/plugin/scalars/scalars", run=".", tag=tag))}


def test_scalars_equal_metrics_jsonl(run, server):
    for kind in ("train", "checkpoint", "eval"):
        logged = rows(run, kind)
        assert logged, f"no {kind} rows in metrics.jsonl"
        for key, tag in TAGS[kind].items():
            expected = {r["images"]: r[key] for r in logged if r.get(key) is not None}
            if key == "checkpoint_age_s":
                assert len(expected) >= 2, "checkpoint age is logged once a checkpoint exists"
            assert expected, f"{kind} rows have no '{key}'"
            got = scalars(server, tag)
            assert sorted(got) == sorted(expected), f"{tag}: steps {sorted(got)} vs images {sorted(expected)}"
            for images, value in expected.items():  # TensorBoard keeps float32
                assert got[images] == pytest.approx(value, rel=1e-6, abs=1e-30), f"{tag} at {images} images"


def test_sample_grids_are_the_written_pngs(run, server):
    written = {r["images"]: r["path"] for r in rows(run, "samples")}
    assert len(written) >= 2  # periodic grids and the final one
    listing = json.loads(server("/data/plugin/images/images", run=".", tag=SAMPLES_TAG))
    assert sorted(e["step"] for e in listing) == sorted(written)
    for entry in listing:
        png = server("/data/plugin/images/individualImage", **dict(urllib.parse.parse_qsl(entry["query"])))
        shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        np.testing.assert_array_equal(shown, np.asarray(Image.open(written[entry["step"]]).convert("RGB")))


def test_config_is_shown(run, server):
    text = json.loads(server("/data/plugin/text/text", run=".", tag=f"{CONFIG_TAG}/text_summary"))
    shown = text[0]["text"]
    assert "tensorboard: true" in shown and f"run_dir: {run}" in shown


def test_missing_package_is_one_line(tmp_path):
    """Asking for the sink without tensorboard installed: one line, exit 2, before any work."""
    assert_missing_sink_is_one_line("tensorboard", tmp_path / "run")
