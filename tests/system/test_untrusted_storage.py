"""Storage a user gets wrong ends in one line naming the redacted URL and what to check (exit 2), and no secret
(URL credentials, a presigned query, credentials from the environment) reaches a file or a log line. Against
an S3 API server (moto) in its own process on loopback."""

import os

import fsspec
import pytest

from tests.support.common import DIGITS, free_port
from tests.support.s3_server import s3_server_process
from tests.support.train_helpers import child_env, digits_args, run_module, train_args


def aws_env(endpoint: str, credentials: bool = True, **extra) -> dict:
    env = {k: v for k, v in child_env().items() if not k.startswith("AWS_")}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        FSSPEC_S3_ENDPOINT_URL=endpoint,
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent",
        **extra,
    )
    if credentials:
        env.update(
            AWS_ACCESS_KEY_ID=env.get("AWS_ACCESS_KEY_ID", "testing"),
            AWS_SECRET_ACCESS_KEY=env.get("AWS_SECRET_ACCESS_KEY", "testing"),
        )
    return env


CASES = {
    "no credentials": "no credentials for 's3://ddpm-data/shards/manifest.json': set AWS_ACCESS_KEY_ID",
    "access denied": "access denied to 's3://ddpm-data/shards/manifest.json': check the credentials",
    "no such bucket": (
        "manifest 's3://ddpm-data/shards/manifest.json' does not exist (bucket 'ddpm-data' does not exist"
    ),
    "endpoint unreachable": "cannot reach the storage endpoint for 's3://ddpm-data/shards/manifest.json'",
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_storage_failure_is_one_line_naming_the_redacted_url(tmp_path, case):
    server_env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if case == "access denied" else {}
    with s3_server_process(**server_env) as url:
        endpoint = f"http://127.0.0.1:{free_port()}" if case == "endpoint unreachable" else url
        env = aws_env(endpoint, credentials=case != "no credentials")
        source = "s3://ddpm-data/shards/manifest.json?X-Amz-Signature=sig0123456789"
        r = run_module("ddpm_dist.train", *digits_args(tmp_path / "run", f"data.source={source}"), env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert CASES[case] in errors[0]
    assert "sig0123456789" not in r.stderr + r.stdout


SECRETS = {
    "url password": "pw-Secret-4711",
    "presigned signature": "sig-Secret-0815",
    "presigned credential": "cred-Secret-1234",
    "environment secret key": "env-Secret-Key-98765",
    "environment session token": "env-Session-Token-5555",
}


def test_no_secret_is_written_or_logged(tmp_path):
    """Train (checkpoints, metrics, discovery file), sample and evaluate from shards behind a URL with a password
    and a presigned query, with credentials in the environment: grep every file written and every line."""
    with s3_server_process() as url:
        env = aws_env(
            url,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY=SECRETS["environment secret key"],
            AWS_SESSION_TOKEN=SECRETS["environment session token"],
        )
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": url}, key="testing", secret="testing")
        fs.mkdir("ddpm")
        fs.put(os.path.dirname(DIGITS), "ddpm/shards", recursive=True)
        host = url.split("://", 1)[1]
        source = (
            f"http://user:{SECRETS['url password']}@{host}/ddpm/shards/manifest.json?X-Amz-Signature="
            f"{SECRETS['presigned signature']}&X-Amz-Credential={SECRETS['presigned credential']}"
        )
        run, out = tmp_path / "run", tmp_path / "samples"
        metrics = [
            "metrics.prometheus=true",
            f"metrics.prometheus_port={free_port()}",
            "metrics.prometheus_addr=127.0.0.1",
            f"metrics.sd_dir={tmp_path / 'sd'}",
        ]
        missing = "data.source=s3://ddpm/nothing/manifest.json?token=" + SECRETS["presigned signature"]
        commands = [
            ["ddpm_dist.train", *train_args(run, 4, f"data.source={source}", "checkpoint.every_images=32", *metrics)],
            ["ddpm_dist.sample", "--run", run, "--out", out, "--num-images", 8, "--steps", 2],
            ["ddpm_dist.evaluate", "frechet", "--samples", out, "--data", source],
            ["ddpm_dist.train", *train_args(run, 4, missing)],  # fails: its error line
        ]
        said = ""
        for i, cmd in enumerate(commands):
            r = run_module(*cmd, env=env, timeout=600)
            assert (r.returncode == 0) == (i < 3), r.stderr[-3000:]
            said += r.stdout + r.stderr
    assert "error: manifest 's3://ddpm/nothing/manifest.json' does not exist" in said
    files = [os.path.join(d, f) for d, _, fs_ in os.walk(tmp_path) for f in fs_]
    assert (
        len(files) > 20
        and any(f.endswith("meta.json") for f in files)
        and any(f.endswith("sampling.json") for f in files)
    )
    for what, secret in SECRETS.items():
        assert secret not in said, what
        for f in files:
            with open(f, "rb") as fh:
                assert secret.encode() not in fh.read(), (what, f)
