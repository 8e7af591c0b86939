"""Shard downloads through fsspec, so gs:// works against real GCS and the GCS emulator.

mosaicml-streaming's own gs:// downloader insists on Google default credentials (or HMAC
keys), so it cannot talk to an emulator. `FsspecStream` is a streaming `Stream` whose
downloads go through fsspec instead (gcsfs for gs://, configured by `pretrain.storage.filesystem`:
anonymous against STORAGE_EMULATOR_HOST, default credentials against real GCS). Schemes
streaming handles natively and fsspec may lack a backend for (s3://, oci://, ...) keep
streaming's downloader.
"""
from __future__ import annotations

import hashlib
import os

from streaming.base.storage.download import DOWNLOADER_MAPPINGS, CloudDownloader
from streaming.base.stream import Stream

from pretrain import storage

FSSPEC_SCHEMES = {"gs", "gcs", "file", "memory"}


def uses_fsspec(uri: str) -> bool:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return scheme in FSSPEC_SCHEMES or (scheme and scheme not in DOWNLOADER_MAPPINGS)


class FsspecDownloader(CloudDownloader):
    """streaming's downloader interface backed by fsspec (atomic: temp file then rename)."""

    @staticmethod
    def _client_identifier() -> str:
        return "fsspec"

    def _validate_remote_path(self, remote: str) -> None:
        pass  # any fsspec URI

    def clean_up(self) -> None:
        pass

    def _download_file_impl(self, remote: str, local: str, timeout: float) -> None:
        storage.download(remote, local)


class FsspecStream(Stream):
    """A Stream whose remote files are fetched with fsspec (see module docstring)."""

    def __init__(self, *, remote: str, local: str, **kwargs) -> None:
        # Stream.__init__ picks a downloader by scheme and rejects schemes it does not know,
        # so construct without the remote and attach it after.
        super().__init__(remote=None, local=local, **kwargs)
        self.remote = remote
        self._downloader = FsspecDownloader()

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        # os.path.join would mangle nothing here, but be explicit about URI joining.
        remote = storage.join(self.remote, self.split, from_basename) if self.split else \
            storage.join(self.remote, from_basename)
        local = os.path.join(self.local, self.split, to_basename or from_basename)
        if not os.path.exists(local):
            storage.with_retries(f"downloading {remote}", lambda: storage.download(remote, local),
                                 self.download_retry or 0)
        return local


def cache_dir_for(uri: str, cache_dir: str) -> str:
    """Per-URI cache folder, so two datasets never share (streaming requires that)."""
    key = hashlib.blake2s(uri.encode(), digest_size=10).hexdigest()
    return os.path.join(os.path.expanduser(cache_dir), key)


def make_stream(uri: str, cache_dir: str) -> Stream:
    """A Stream over a prepared dataset: local folders are read in place (no copy); remote
    URIs are cached under cache_dir."""
    if not storage.is_remote(uri):
        return Stream(local=storage.local_path(uri))
    local = cache_dir_for(uri, cache_dir)
    os.makedirs(local, exist_ok=True)
    if uses_fsspec(uri):
        return FsspecStream(remote=uri, local=local)
    return Stream(remote=uri, local=local)
