"""A real S3 API server (moto) on loopback for tests, stopped by the fixture that started it."""

import contextlib
import os
import socket
import subprocess
import sys

import pytest

from tests.support.common import free_port, wait_for


def s3_env(url: str, key: str = "test") -> dict:
    """What points boto3 and fsspec's s3 at the server at `url`, with `key` as access key and secret."""
    return {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": url,
        "FSSPEC_S3_ENDPOINT_URL": url,
    }


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = s3_env(url)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="ddpm")
    try:
        yield env
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def s3_server_process(log=None, **server_env):
    """An S3 API server (moto) in its own process, e.g. INITIAL_NO_AUTH_ACTION_COUNT="0" to check credentials;
    its access log to the open file `log` if given; yields its URL; stopped by PID."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **server_env},
        stdout=subprocess.DEVNULL if log is None else log,
        stderr=subprocess.DEVNULL if log is None else subprocess.STDOUT,
    )
    try:

        def answers():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                assert server.poll() is None, "the S3 API server exited"
                return False

        wait_for(answers, 60, "the S3 API server to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait(timeout=30)
