"""The start-up shard check (ddpm_dist/data/startup.py): each rank stats only its slice of the shards, one request
per shard, and every rank gets the same verdict from one collective. Against an S3 API server (moto) on loopback,
each of 4 real gloo ranks talks to it through its own counting proxy, so the requests are counted per rank at
the server's door; local files for one process and for ranks simulated in threads."""

from __future__ import annotations

import collections
import http.client
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest

from ddpm_dist.data.errors import DataError
from ddpm_dist.data.startup import check_shards, owner_of, slice_of
from tests.support.s3_server import s3_endpoint  # noqa: F401 - fixture

NUM_SHARDS, WORLD, PER_SAMPLE = 40, 4, 2  # 40 shards of 2 claimed samples: at least 2048 bytes each
MISSING, SMALL = 17, 29  # rank 1's and rank 2's slice


# ----------------------------------------------------------------------------------------------- local, one process


def _files(tmp_path, sizes):
    paths = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"shard-{i:06d}.tar"
        p.write_bytes(b"\0" * n)
        paths.append(str(p))
    return paths


def test_one_process_returns_every_size(tmp_path):
    sizes = [2048 + 7 * i for i in range(9)]
    got = check_shards(_files(tmp_path, sizes), np.full(9, 2))
    assert got.dtype == np.int64 and got.tolist() == sizes
    urls = _files(tmp_path, sizes)
    assert check_shards(lambda i: urls[i], np.full(9, 2), threads=1).tolist() == sizes  # a callable, one thread
    assert check_shards([], np.zeros(0, dtype=np.int64)).tolist() == []


def test_one_process_missing_and_too_small_are_one_line(tmp_path):
    urls = _files(tmp_path, [4096] * 6)
    os.unlink(urls[4])
    os.unlink(urls[2])
    with pytest.raises(DataError) as e:
        check_shards(urls, np.full(6, 2))
    assert str(e.value) == f"2 shard(s) listed in the manifest do not exist, first '{urls[2]}'"
    urls = _files(tmp_path, [4096, 4096, 3071, 4096, 100])
    with pytest.raises(DataError) as e:
        check_shards(urls, np.array([4, 4, 3, 4, 1]))
    assert str(e.value) == (
        f"shard '{urls[2]}' has 3071 bytes, too few for the 3 samples the manifest claims (a "
        f"sample takes at least 1024) (2 such shards)"
    )
    os.mkdir(tmp_path / "a-directory")  # not a shard
    with pytest.raises(DataError, match="1 shard.s. listed in the manifest do not exist, first '.*a-directory'"):
        check_shards([str(tmp_path / "a-directory")], np.array([0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs `share`"):
        check_shards([], np.zeros(0), rank=0, world=2)
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        check_shards([], np.zeros(0), rank=2, world=2, share=lambda a: a)


def test_slices_cover_every_shard_once():
    for shards in range(0, 23):
        for world in range(1, 9):
            slices = [slice_of(r, world, shards) for r in range(world)]
            assert [i for s in slices for i in s] == list(range(shards))
            assert max(map(len, slices)) - min(map(len, slices)) <= 1
            assert all(owner_of(i, world, shards) == r for r, s in enumerate(slices) for i in s)


# ------------------------------------------------------------------------------------- local, ranks in threads


class ThreadSum:
    """A SUM all-reduce between ranks simulated in threads."""

    def __init__(self, world):
        self.parts, self.barrier = [None] * world, threading.Barrier(world, timeout=30)

    def share_for(self, rank):
        def share(array):
            self.parts[rank] = array.copy()
            self.barrier.wait()
            total = np.sum(self.parts, axis=0)
            self.barrier.wait()
            return total

        return share


def _run_ranks(world, urls, counts):
    """check_shards on `world` threads; per rank: (indices it asked for, its result or exception)."""
    reduce, asked, out = ThreadSum(world), [[] for _ in range(world)], [None] * world

    def rank_main(r):
        def url_of(i):
            asked[r].append(i)
            return urls[i]

        try:
            out[r] = check_shards(url_of, counts, r, world, reduce.share_for(r), threads=3)
        except Exception as e:  # noqa: BLE001 - the result under test
            out[r] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank did not finish"
    return asked, out


def test_ranks_in_threads_each_stat_their_slice(tmp_path):
    sizes = [2048 + i for i in range(10)]
    urls = _files(tmp_path, sizes)
    asked, out = _run_ranks(3, urls, np.full(10, 2))
    assert [sorted(a) for a in asked] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert all(o.tolist() == sizes for o in out)
    os.unlink(urls[5])
    _, out = _run_ranks(3, urls, np.full(10, 2))
    assert {str(o) for o in out} == {f"1 shard(s) listed in the manifest do not exist, first '{urls[5]}'"}
    assert all(isinstance(o, DataError) for o in out)


def test_a_failing_rank_raises_its_own_error_and_no_rank_waits(tmp_path):
    urls = _files(tmp_path, [2048] * 8)
    urls[5] = "nosuchprotocol://bucket/shard.tar"  # rank 2 of 4 cannot even open it
    _, out = _run_ranks(4, urls, np.full(8, 2))
    assert isinstance(out[2], ValueError) and "nosuchprotocol" in str(out[2])
    others = {str(out[r]) for r in (0, 1, 3)}
    assert others == {
        "1 shard(s) could not be checked, first 'nosuchprotocol://bucket/shard.tar' (rank 2 failed to "
        "stat it; its own error says why)"
    }


# ------------------------------------------------------------------------- S3 API server, 4 real gloo ranks


class _Forward(BaseHTTPRequestHandler):
    """Forward one request to the upstream server and record (method, path, query) first."""

    protocol_version = "HTTP/1.1"

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        self.server.seen.append((self.command, url.path, url.query))
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                conn.putheader(k, v)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            # a HEAD's Content-Length is the object's size (what the check reads); otherwise the body's
            self.send_header(
                "Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
            )
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_HEAD = do_GET = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args):
        pass


class CountingProxy:
    """A reverse proxy on 127.0.0.1 that records every request passing it; stopped by stop()."""

    def __init__(self, upstream_url: str):
        up = urlsplit(upstream_url)
        assert up.hostname == "127.0.0.1"
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Forward)
        self.server.daemon_threads = True
        self.server.seen, self.server.upstream = [], (up.hostname, up.port)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def seen(self) -> list:
        return list(self.server.seen)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _key(prefix, i):
    return f"startup/{prefix}/shard-{i:06d}.tar"


def _url(prefix, i):
    return f"s3://ddpm/{_key(prefix, i)}"


def _size(i):
    return 2048 + i


SCENARIOS = {  # name: (prefix, claimed samples per shard); run in this order by every rank
    "fine": ("a", [PER_SAMPLE] * NUM_SHARDS),
    "missing": ("b", [PER_SAMPLE] * NUM_SHARDS),  # b lacks shard MISSING and holds a too-small shard SMALL
    "small": ("a", [PER_SAMPLE] * SMALL + [3] + [PER_SAMPLE] * (NUM_SHARDS - SMALL - 1)),  # 2077 bytes < 3 * 1024
}


def _rank_main(endpoints: list, out_dir: str) -> None:
    """One gloo rank: its own proxy as the S3 endpoint, then every scenario's check; writes what it got."""
    import fsspec

    from ddpm_dist.parallel.collectives import sum_across_ranks
    from ddpm_dist.parallel.env import init_distributed, read_env, shutdown

    env = init_distributed(read_env(), timeout_s=60)
    os.environ["AWS_ENDPOINT_URL"] = os.environ["FSSPEC_S3_ENDPOINT_URL"] = endpoints[env.rank]
    fsspec.config.set_conf_env(fsspec.config.conf)  # re-read FSSPEC_S3_ENDPOINT_URL: this rank's proxy
    got = {}
    for name, (prefix, counts) in SCENARIOS.items():
        try:
            sizes = check_shards(
                lambda i, p=prefix: _url(p, i), np.array(counts), env.rank, env.world_size, share=sum_across_ranks
            )
            got[name] = {"sizes": sizes.tolist()}
        except DataError as e:
            got[name] = {"error": str(e)}
    with open(os.path.join(out_dir, f"rank-{env.rank}.json"), "w") as f:
        json.dump(got, f)
    shutdown()


@pytest.mark.system
def test_four_ranks_each_head_only_their_slice_on_s3(s3_endpoint, tmp_path):  # noqa: F811 - fixture
    import boto3

    from ddpm_dist.parallel.env import spawn_local

    s3 = boto3.client("s3", endpoint_url=s3_endpoint["AWS_ENDPOINT_URL"])
    for i in range(NUM_SHARDS):
        s3.put_object(Bucket="ddpm", Key=_key("a", i), Body=b"\0" * _size(i))
        if i != MISSING:
            s3.put_object(Bucket="ddpm", Key=_key("b", i), Body=b"\0" * (2047 if i == SMALL else _size(i)))
    proxies = []
    try:
        for _ in range(WORLD):
            proxies.append(CountingProxy(s3_endpoint["AWS_ENDPOINT_URL"]))
        for p in proxies:  # each answers (through to the server) before any rank starts
            conn = http.client.HTTPConnection("127.0.0.1", int(p.url.rsplit(":", 1)[1]), timeout=10)
            conn.request("HEAD", f"/ddpm/{_key('a', 0)}")  # unsigned: the server answers 403, through the proxy
            assert conn.getresponse().status in (200, 403)
            conn.close()
        probes = [p.seen for p in proxies]
        spawn_local(_rank_main, ([p.url for p in proxies], str(tmp_path)), WORLD)
        seen = [p.seen[len(probe) :] for p, probe in zip(proxies, probes)]
    finally:
        for p in proxies:
            p.stop()
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(WORLD)]

    # what each rank asked the server: exactly one HEAD per shard of its slice per scenario, nothing else
    for r in range(WORLD):
        mine = slice_of(r, WORLD, NUM_SHARDS)
        assert len(mine) == NUM_SHARDS // WORLD
        assert len(seen[r]) == len(SCENARIOS) * len(mine), (r, collections.Counter(m for m, _, _ in seen[r]))
        for k, (name, (prefix, _)) in enumerate(SCENARIOS.items()):
            got = seen[r][k * len(mine) : (k + 1) * len(mine)]
            assert sorted(got) == [("HEAD", f"/ddpm/{_key(prefix, i)}", "") for i in mine], (r, name)

    # what each rank concluded: the same on every rank
    for got in results:
        assert got["fine"] == {"sizes": [_size(i) for i in range(NUM_SHARDS)]}
        assert got["missing"] == {
            "error": f"1 shard(s) listed in the manifest do not exist, first '{_url('b', MISSING)}'"
        }
        assert got["small"] == {
            "error": f"shard '{_url('a', SMALL)}' has {_size(SMALL)} bytes, too few for the 3 "
            f"samples the manifest claims (a sample takes at least 1024)"
        }


@pytest.mark.system
def test_no_shard_in_a_missing_bucket_says_so(s3_endpoint):  # noqa: F811 - fixture
    with pytest.raises(DataError) as e:
        check_shards([f"s3://no-such-bucket-startup/shard-{i}.tar" for i in range(3)], np.ones(3))
    assert str(e.value) == (
        "3 shard(s) listed in the manifest do not exist, first "
        "'s3://no-such-bucket-startup/shard-0.tar' (bucket 'no-such-bucket-startup' does not "
        "exist: check the name and AWS_ENDPOINT_URL)"
    )
