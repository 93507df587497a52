"""fsspec helpers: resolve URLs relative to a manifest, atomic writes, and webdataset's opener."""
from __future__ import annotations

import os
import posixpath
import re
import tempfile
import uuid

import fsspec


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(base: str, name: str) -> str:
    if "://" in name or os.path.isabs(name):
        return name
    if is_local(base):
        return os.path.join(local_path(base), name)
    return posixpath.join(base, name)


def dirname(url: str) -> str:
    return os.path.dirname(local_path(url)) if is_local(url) else posixpath.dirname(url.rstrip("/"))


def redact(url: str) -> str:
    """A URL safe for logs and metric labels: credentials and query strings removed."""
    url = re.sub(r"//[^/@]*@", "//", url)
    return url.split("?", 1)[0]


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Never leave a half-written file visible: temp + rename locally; object stores publish whole objects."""
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
