"""A real img2dataset crawl: the digits served as PNG files by an HTTP server on 127.0.0.1, downloaded and resized
by the real `img2dataset` into its webdataset layout (tars + *_stats.json + parquet), indexed by 2 processes into
another folder (the crawl left as it is, like a read-only bucket), then trained on by 2 ranks, interrupted and
resumed exactly."""

import csv
import functools
import http.server
import io
import os
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.support.train_helpers import (
    assert_runs_equal,
    audit,
    child_env,
    run_command,
    run_module,
    run_train,
    start_command,
    train_cmd,
)

pytestmark = pytest.mark.system
IMAGES, PER_SHARD, SIZE = 512, 64, 16  # 8 shards of 64 digits, upscaled 8x8 -> 16x16 by img2dataset
N = 4  # steps before the interruption; the uninterrupted run takes 2N


def img2dataset_cmd() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "img2dataset")
    if not os.path.exists(path):
        pytest.fail("img2dataset is not installed (make install installs it: see the Makefile)")
    return path


@pytest.fixture
def server(tmp_path):
    """The digits as 8x8 PNG files, served from 127.0.0.1 on a free port; stopped at the end (also on failure)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    digits = (d.images[:IMAGES] * (255 / 16)).round().astype(np.uint8)
    root = tmp_path / "www"
    (root / "digits").mkdir(parents=True)
    for i, img in enumerate(digits):
        Image.fromarray(img, "L").save(root / "digits" / f"{i:04d}.png")
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        with urllib.request.urlopen(f"{base}/digits/0000.png", timeout=10) as r:  # evidence: the port answers
            assert r.status == 200 and r.read(8) == b"\x89PNG\r\n\x1a\n"
        yield base, digits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _no_other_hosts_env() -> dict:
    """img2dataset's environment: nothing but 127.0.0.1 is contacted. wandb is off (and disabled), albumentations'
    update check (a request to PyPI at import) is off, and any HTTP(S) request that would not go to 127.0.0.1 is sent
    to a proxy address nothing listens on."""
    env = child_env(
        NO_ALBUMENTATIONS_UPDATE="1",
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        WANDB_DISABLED="true",
        HF_HUB_OFFLINE="1",
        no_proxy="127.0.0.1",
        NO_PROXY="127.0.0.1",
        http_proxy="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
    )
    return env


def side_by_side(tmp_path, *cmds) -> None:
    """Run independent commands at once (the start-ups overlap on the two cores); each must succeed."""
    logs = [open(tmp_path / f"side_by_side{i}.log", "w+") for i in range(len(cmds))]
    procs = [start_command(cmd, stdout=log, stderr=subprocess.STDOUT) for cmd, log in zip(cmds, logs)]
    try:
        for p, log in zip(procs, logs):
            code = p.wait(timeout=600)
            log.seek(0)
            assert code == 0, log.read()[-4000:]
    finally:
        for p, log in zip(procs, logs):
            p.terminate()  # a no-op for those that ended (torchrun stops its ranks on SIGTERM)
            log.close()


def _listing(folder) -> dict:
    return {
        p: (os.path.getsize(os.path.join(folder, p)), os.path.getmtime(os.path.join(folder, p)))
        for p in sorted(os.listdir(folder))
    }


def test_img2dataset_crawl_is_indexed_and_trains_two_ranks_resuming_exactly(server, tmp_path):
    base, digits = server
    urls = tmp_path / "urls.csv"
    with open(urls, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for i in range(IMAGES):
            w.writerow([f"{base}/digits/{i:04d}.png", f"digit {i}"])
    crawl = tmp_path / "crawl"
    r = run_command(
        [
            img2dataset_cmd(),
            "--url_list",
            str(urls),
            "--input_format",
            "csv",
            "--url_col",
            "url",
            "--caption_col",
            "caption",
            "--output_format",
            "webdataset",
            "--output_folder",
            str(crawl),
            "--image_size",
            str(SIZE),
            "--resize_mode",
            "border",
            "--encode_format",
            "jpg",
            "--processes_count",
            "1",
            "--thread_count",
            "4",
            "--number_sample_per_shard",
            str(PER_SHARD),
            "--enable_wandb",
            "False",
            "--timeout",
            "5",
            "--retries",
            "0",
            "--distributor",
            "multiprocessing",
        ],
        timeout=240,
        env=_no_other_hosts_env(),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    shards = IMAGES // PER_SHARD
    names = sorted(os.listdir(crawl))
    for k in range(shards):  # img2dataset's own layout
        assert {f"{k:05d}.tar", f"{k:05d}_stats.json", f"{k:05d}.parquet"} <= set(names), names
    before = _listing(crawl)

    out = tmp_path / "index"
    r = run_module("ddpm_dist.shards", "index", crawl, "--out", out, "--world-size", 2, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"indexed {shards} shards ({shards} with samples), {IMAGES} samples of {SIZE}x{SIZE}x1 jpg" in r.stdout
    assert _listing(crawl) == before  # the crawl's folder is read, never written (a read-only bucket works)

    from ddpm_dist.data.samples import iter_tar_samples, tar_index
    from ddpm_dist.data.shard_sets import load_manifest, parse_json, verify

    m = load_manifest(str(out / "manifest.json"))
    assert (m.num_samples, len(m.shards), m.image_size, m.channels, m.image_format, m.num_classes) == (
        IMAGES,
        shards,
        [SIZE, SIZE],
        1,
        "jpg",
        0,
    )
    assert m.extra["img2dataset"] == {
        "shards": shards,
        "successes": IMAGES,
        "count": IMAGES,
        "failed_to_download": 0,
        "failed_to_resize": 0,
    }
    written = set(os.listdir(out))  # the manifest (and whatever sidecar its writer adds) and the indexes, no parts left
    assert {"manifest.json", *(f"{k:05d}.tar.idx.json" for k in range(shards))} <= written
    assert all(n.startswith("manifest.") or n.endswith(".tar.idx.json") for n in written), written
    for k, info in enumerate(m.shards):
        assert info.url == str(crawl / f"{k:05d}.tar")  # absolute: the manifest is not beside the shards
        data = (crawl / f"{k:05d}.tar").read_bytes()
        assert parse_json((out / info.index).read_bytes()) == tar_index(data)
        assert info.num_samples == PER_SHARD == parse_json((crawl / f"{k:05d}_stats.json").read_bytes())["successes"]
    report = verify(str(out / "manifest.json"), progress=False)
    assert report.ok and report.samples == IMAGES, report.faults

    # The crawl holds the digits: each sample's url names its digit, and the 16x16 jpg is that digit upscaled.
    seen, worst = set(), 1.0
    for k in range(shards):
        for s in iter_tar_samples((crawl / f"{k:05d}.tar").read_bytes()):
            i = int(parse_json(s["json"])["url"].rsplit("/", 1)[1][:4])
            seen.add(i)
            got = np.asarray(Image.open(io.BytesIO(s["jpg"]))).astype(float)
            want = np.asarray(Image.fromarray(digits[i]).resize((SIZE, SIZE), Image.BILINEAR)).astype(float)
            worst = min(worst, np.corrcoef(got.ravel(), want.ravel())[0, 1])
    assert seen == set(range(IMAGES)) and worst > 0.9, worst

    # 2 ranks train from the index; an interrupted run resumes to exactly the uninterrupted one.
    opts = [f"data.source={out / 'manifest.json'}", "model.num_classes=0", "parallel.backend=fsdp"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # the uninterrupted run and the first half of the interrupted one share nothing: they run side by side
    side_by_side(tmp_path, train_cmd(straight, 2 * N, *opts, nproc=2), train_cmd(resumed, N, *opts, nproc=2))
    second = run_train(resumed, 2 * N, *opts, nproc=2)
    assert f"resumed from {resumed}/checkpoints/step_{N:09d}" in second.stderr
    drawn = []
    for rank in (0, 1):
        steps = audit(straight, rank)
        assert len(steps) == 2 * N and all(len(v) == 8 for v in steps.values()), steps
        drawn += [i for v in steps.values() for i in v]
    assert (
        len(set(drawn)) == len(drawn) == 2 * N * 16 and 0 <= min(drawn) and max(drawn) < IMAGES
    )  # one epoch, no repeats
    assert_runs_equal(straight, resumed, ranks=(0, 1))
