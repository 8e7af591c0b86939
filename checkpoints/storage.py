"""Object storage access for checkpoints: one place that turns a URI into a filesystem.

Local paths, file://, gs://, s3://, ... all go through fsspec, built by the same helper the
data pipeline uses (gs:// honours STORAGE_EMULATOR_HOST with anonymous credentials; without
it gcsfs uses Google's default credentials as usual).

Also here: retries with exponential back-off for transient errors, atomic small writes
(the commit record must appear whole or not at all), and sha256 of local files.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import time
import uuid
from typing import BinaryIO, Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pretrain.data.storage import filesystem as _data_filesystem

log = logging.getLogger("checkpoints")

T = TypeVar("T")
_CHUNK = 8 << 20


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or fsspec URI.

    Delegates to pretrain.data.storage so data and checkpoints agree on how a URI (and the
    GCS emulator) is reached; trailing slashes are dropped so joins are predictable.
    """
    fs, path = _data_filesystem(str(uri))
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URI a user can paste back (gs://bucket/x instead of bucket/x)."""
    if is_local(fs):
        return path
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{path}"


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network hiccups, timeouts, 5xx/408/429 — not missing files or 4xx."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, FileExistsError)):
        return False
    if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError)):
        return False
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(code, int) and 400 <= code < 500 and code not in (408, 429):
        return False
    return True


def with_retries(what: str, fn: Callable[[], T], retries: int, base_delay: float = 0.5,
                 max_delay: float = 30.0) -> T:
    """Run fn, retrying transient failures with jittered exponential back-off."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # classified below; non-transient ones propagate at once
            if attempt >= retries or not is_transient(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** attempt) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__,
                        exc, attempt + 1, retries, delay)
            time.sleep(delay)
            attempt += 1


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _replace_local(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write a local file through a temporary name, then rename it into place: a reader sees
    the whole file or none of it, and a failed write leaves nothing behind."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def put_file(fs: fsspec.AbstractFileSystem, local: str, remote: str) -> None:
    """Copy one local file to remote; a reader never sees a torn file on a local target."""
    if is_local(fs):
        def copy(dst: BinaryIO) -> None:
            with open(local, "rb") as src:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
        _replace_local(remote, copy)
    else:
        # Object stores publish an object only when its upload completes.
        fs.put_file(local, remote)


def get_file(fs: fsspec.AbstractFileSystem, remote: str, local: str) -> str:
    """Download remote to local, returning the sha256 of the bytes read."""
    h = hashlib.sha256()
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with fs.open(remote, "rb", block_size=_CHUNK) as src, open(local, "wb") as dst:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            dst.write(chunk)
    return h.hexdigest()


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small object so that readers see all of it or nothing."""
    if is_local(fs):
        _replace_local(path, lambda f: f.write(data))
    else:
        fs.pipe_file(path, data)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)
