"""Local paths and fsspec URIs behind one small API.

gcsfs is told about the GCS emulator explicitly: when STORAGE_EMULATOR_HOST is set it talks
to that endpoint with anonymous credentials; otherwise it uses Google default credentials,
as real GCS needs. Everything else goes through fsspec's own resolution.
"""
from __future__ import annotations

import os
from pathlib import Path

import fsspec

from pretrain.errors import UserError


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """A local folder for a local path or file:// URI (user ~ expanded)."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return str(Path(os.path.expanduser(uri)).absolute())


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), local_path(uri)
    protocol = uri.split("://", 1)[0]
    kwargs = {}
    if protocol in ("gs", "gcs"):
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            if not emulator.startswith("http"):
                emulator = "http://" + emulator
            kwargs = {"token": "anon", "endpoint_url": emulator, "project": "emulator"}
    try:
        fs = fsspec.filesystem(protocol, **kwargs)
    except (ImportError, ValueError) as exc:
        raise UserError(f"storage URI '{uri}' uses protocol '{protocol}', which fsspec cannot open "
                        f"here ({exc}); use a local path, file://, gs:// or another installed "
                        "fsspec protocol") from None
    return fs, fs._strip_protocol(uri)


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.exists(path)
    except FileNotFoundError:
        return False


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def download(uri: str, local: str) -> None:
    """Copy one remote file to a local path, atomically (a partial file is never visible)."""
    fs, path = filesystem(uri)
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    tmp = f"{local}.part{os.getpid()}"
    try:
        fs.get_file(path, tmp)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def upload_folder(local_dir: str, uri: str) -> list[str]:
    """Copy every file under local_dir to uri, skipping files already there with the same size.

    Returns the names uploaded. Used by `prepare` so that an interrupted upload resumes.
    """
    fs, root = filesystem(uri)
    uploaded = []
    names = sorted(str(p.relative_to(local_dir)) for p in Path(local_dir).rglob("*") if p.is_file())
    for name in names:
        src = os.path.join(local_dir, name)
        dst = f"{root.rstrip('/')}/{name}"
        try:
            if fs.exists(dst) and fs.size(dst) == os.path.getsize(src):
                continue
        except FileNotFoundError:
            pass
        parent = dst.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        fs.put_file(src, dst)
        uploaded.append(name)
    fs.invalidate_cache()
    return uploaded
