"""Checksums of checkpoint files: computed once, while a file is written, and checked cheaply.

Every file in a manifest carries its size, sha256 and (since format 2) crc32c. Checking a
checkpoint has three levels:

- "size": the sizes in the listing match the manifest (no reads);
- "checksum" (the default for discovery, retention and resume): also the content. Object
  stores that keep a crc32c of every object (GCS) report it in the listing, so the check
  reads nothing; elsewhere (local disk, or a manifest written before crc32c was recorded)
  the file is read once and hashed (crc32c runs at several GB/s; a local file already
  checked in this process is not read again while its size and mtime are unchanged);
- "full": read every byte and compare sha256 (`pretrain checkpoints list --verify`).

Hashing while writing: `HashingWriter` sits between `torch.save` and the file, so the
background upload knows a staged file's digests without reading it back.
"""
from __future__ import annotations

import base64
import hashlib
import threading
from typing import BinaryIO

import google_crc32c

from pretrain.storage import is_local

LEVELS = ("size", "checksum", "full")
CHUNK = 8 << 20


class Digests:
    """sha256 and crc32c of a byte stream, fed chunk by chunk. A reader that compares one
    of them computes only that one (`sha256=False`: sha256 runs at a quarter of crc32c's
    speed); the one not computed reads as ""."""

    def __init__(self, *, sha256: bool = True, crc32c: bool = True) -> None:
        self._sha = hashlib.sha256() if sha256 else None
        self._crc = google_crc32c.Checksum() if crc32c else None
        self.size = 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        if self._sha is not None:
            self._sha.update(view)
        if self._crc is not None:
            if isinstance(data, bytes):
                self._crc.update(data)
            else:   # google_crc32c takes bytes only: copy in slices, not the whole tensor at once
                for i in range(0, view.nbytes, CHUNK):
                    self._crc.update(bytes(view[i:i + CHUNK]))
        self.size += view.nbytes

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest() if self._sha is not None else ""

    @property
    def crc32c(self) -> str:
        """base64 of the big-endian crc32c, the form GCS reports for its objects."""
        return base64.b64encode(self._crc.digest()).decode("ascii") if self._crc is not None else ""


class HashingWriter:
    """A write-only binary file that hashes what passes through it (for torch.save)."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.digests = Digests()

    def write(self, data) -> int:
        self.digests.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def digest_stream(src: BinaryIO, *, sha256: bool = True, crc32c: bool = True) -> Digests:
    d = Digests(sha256=sha256, crc32c=crc32c)
    while chunk := src.read(CHUNK):
        d.update(chunk)
    return d


def digest_file(path: str) -> Digests:
    with open(path, "rb") as f:
        return digest_stream(f)


def crc32c_of(data: bytes) -> str:
    d = Digests()
    d.update(data)
    return d.crc32c


# Local files already read and found to match, by (path, size, mtime): retention and the
# resume path check the same checkpoints again and again.
_checked: dict[tuple[str, int, float], tuple[str, str]] = {}
_checked_lock = threading.Lock()


def content_problem(fs, path: str, name: str, info: dict, rec, level: str) -> str | None:
    """Why file `name` at `path` (listing entry `info`) does not match its FileRecord `rec`
    at this level, or None when it does. Sizes are checked by the caller."""
    if level == "size":
        return None
    stored_crc = info.get("crc32c")
    if level == "checksum" and rec.crc32c and stored_crc:
        return None if stored_crc == rec.crc32c else f"{name} fails its crc32c checksum (content changed)"
    use_sha = level == "full" or not rec.crc32c    # the one digest compared: only it is computed
    cacheable = is_local(fs) and bool(info.get("mtime"))
    key = (path, int(info.get("size") or 0), float(info["mtime"])) if cacheable else None
    with _checked_lock:
        known = _checked.get(key, ("", "")) if cacheable else ("", "")
    if not known[0 if use_sha else 1]:
        with fs.open(path, "rb", block_size=CHUNK) as f:
            d = digest_stream(f, sha256=use_sha, crc32c=not use_sha)
        known = (d.sha256 or known[0], d.crc32c or known[1])
    sha, crc = known
    ok = sha == rec.sha256 if use_sha else crc == rec.crc32c
    if ok and cacheable:
        with _checked_lock:
            _checked[key] = known
    if ok:
        return None
    return f"{name} fails its {'sha256' if use_sha else 'crc32c'} checksum (content changed)"
