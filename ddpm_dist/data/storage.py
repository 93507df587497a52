"""fsspec helpers: resolve URLs relative to a manifest, atomic writes, and webdataset's opener."""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid

import fsspec

from ..redact import redact as redact_text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def join(base: str, name: str) -> str:
    if "://" in name or os.path.isabs(name):
        return name
    if is_local(base):
        return os.path.join(local_path(base), name)
    return posixpath.join(base, name)


def dirname(url: str) -> str:
    return os.path.dirname(local_path(url)) if is_local(url) else posixpath.dirname(url.rstrip("/"))


def redact(url: str) -> str:
    """A URL safe for logs, errors and files: credentials and query strings removed (ddpm_dist.redact)."""
    return redact_text(url)


class StorageError(OSError):
    """A storage failure the user can fix (credentials, permissions, bucket, endpoint); one-line message."""


_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectTimeout",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ConnectionRefusedError",
    "ReadTimeoutError",
}


def _explain(url: str, e: BaseException) -> str | None:
    """What to check, for the failures a user causes; None for anything else (raised as it is)."""
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    names, text, where = {type(x).__name__ for x in chain}, " ".join(str(x) for x in chain), redact(url)
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return f"no credentials for '{where}': set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    if any(isinstance(x, PermissionError) for x in chain) or names & {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
    }:
        return f"access denied to '{where}': check the credentials and the bucket's policy"
    if "NoSuchBucket" in names or "bucket does not exist" in text:
        return f"no such bucket for '{where}': check the bucket name and AWS_ENDPOINT_URL"
    if names & _UNREACHABLE or any(isinstance(x, ConnectionError) for x in chain):
        return f"cannot reach the storage endpoint for '{where}': check AWS_ENDPOINT_URL and the network"
    return None


@contextlib.contextmanager
def translated(url: str):
    """Turn a storage failure the user can fix into a StorageError that names the redacted URL. Object stores
    only: a local OSError already says what is wrong (and is no matter of credentials or buckets)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        if is_local(url):
            raise
        why = _explain(url, e)
        if why is None:
            raise
        raise StorageError(why) from None


def exists(url: str) -> bool:
    with translated(url):
        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)


def size(url: str) -> int | None:
    """The object's size in bytes, or None when it does not exist."""
    with translated(url):
        fs, path = fsspec.core.url_to_fs(url)
        try:
            return int(fs.size(path))
        except FileNotFoundError:
            return None


def missing_hint(url: str) -> str:
    """Why an object-store URL is missing when its bucket is ("" when the bucket exists or for local paths)."""
    if is_local(url) or "://" not in url:
        return ""
    with translated(url):
        fs, path = fsspec.core.url_to_fs(url)
        bucket = path.split("/", 1)[0]
        return "" if fs.exists(bucket) else f" (bucket '{bucket}' does not exist: check the name and AWS_ENDPOINT_URL)"


def read_bytes(url: str) -> bytes:
    with translated(url), fsspec.open(url, "rb") as f:
        return f.read()


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of an object: one ranged request on an object store."""
    with translated(url):
        fs, path = fsspec.core.url_to_fs(url)
        return fs.cat_file(path, start=start, end=end)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Never leave a half-written file visible: temp + rename locally; object stores publish whole objects."""
    with translated(url):
        _write_bytes_atomic(url, data)


def _write_bytes_atomic(url: str, data: bytes) -> None:
    if is_local(url):
        path = local_path(url)
        d = os.path.dirname(path) or "."
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs, path = fsspec.core.url_to_fs(url)
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if "memory" in protocols:
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        else:  # s3/gcs/...: a PUT becomes visible only when complete
            fs.pipe_file(path, data)


def list_prefix(url: str) -> list[str]:
    with translated(url):
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            return []
        return fs.ls(path, detail=False) if fs.isdir(path) else [path]


def register_webdataset_opener() -> None:
    """Let webdataset.WebDataset open any fsspec protocol (s3://, gs://, memory://, ...) via fsspec.

    ddpm_dist's own stream opens through fsspec directly; this is for users who also drive
    webdataset pipelines over the same URLs. Call it in every DataLoader worker (spawn re-imports)."""
    import webdataset

    def fsspec_gopen(url, mode="rb", bufsize=8192, **kw):
        return fsspec.open(url, mode).open()

    for proto in ("s3", "gs", "gcs", "memory", "az", "abfs", "hf"):
        webdataset.gopen_schemes.setdefault(proto, fsspec_gopen)
