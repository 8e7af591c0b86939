"""The verified download of a checkpoint (checkpoints.restore.download): ranges fetched in
parallel, hashed on arrival in file order, nothing read back; a damaged or missing range
is found. Fast: local files cut into many small ranges."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from checkpoints import restore
from checkpoints.discovery import latest_committed
from checkpoints.integrity import Digests
from checkpoints.restore import CheckpointDamaged, _InOrderDigest, download
from tests.test_checkpoints_store import save_step, uploaders


def test_ranges_arriving_in_any_order_are_hashed_in_file_order():
    data = os.urandom(1000)
    freed = []
    digest = _InOrderDigest(Digests(sha256=True, crc32c=True), lambda: freed.append(1))
    starts = list(range(0, 1000, 100))
    for start in reversed(starts[1:]):       # everything but the first: nothing hashed yet
        digest.add(start, data[start:start + 100])
    assert freed == [] and digest.digests.size == 0
    digest.add(0, data[:100])
    whole = Digests()
    whole.update(data)
    assert len(freed) == 10 and digest.digests.size == 1000
    assert (digest.digests.sha256, digest.digests.crc32c) == (whole.sha256, whole.crc32c)
    only_crc = Digests(sha256=False)         # a reader comparing crc32c computes only that
    only_crc.update(data)
    assert only_crc.crc32c == whole.crc32c and only_crc.sha256 == ""


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A committed two-rank step of 1000-byte files, downloaded in 100-byte ranges."""
    uri = str(tmp_path / "ck")
    save_step(uploaders(uri, 2), tmp_path, 1)
    monkeypatch.setattr(restore, "RANGE_BYTES", 100)
    return latest_committed(uri, verify="size")


def out_of_order(monkeypatch, fail_at: tuple[str, int] | None = None):
    """Every file's first range comes back only after its second one (so ranges arrive out
    of order); `fail_at` (file name, start) fails for good."""
    real = LocalFileSystem.cat_file
    second_in: dict[str, threading.Event] = {}
    lock = threading.Lock()

    def cat_file(self, path, start=None, end=None, **kw):
        name = os.path.basename(path)
        with lock:
            event = second_in.setdefault(name, threading.Event())
        if fail_at == (name, start):
            raise ConnectionError("range lost (injected)")
        if start == 0 and end < os.path.getsize(path):
            event.wait(10)
        data = real(self, path, start=start, end=end, **kw)
        if start == restore.RANGE_BYTES:
            event.set()
        return data

    monkeypatch.setattr(LocalFileSystem, "cat_file", cat_file)


def test_download_hashes_out_of_order_ranges_and_matches(checkpoint, tmp_path, monkeypatch):
    out_of_order(monkeypatch)
    folder = download(checkpoint, str(tmp_path / "dl"), threads=3, retries=0)
    source = Path(checkpoint.uri)
    for name in checkpoint.manifest.files:
        assert (Path(folder) / name).read_bytes() == (source / name).read_bytes()


@pytest.mark.parametrize("manifest_format", [2, 1])
def test_download_finds_a_changed_byte_in_a_middle_range(checkpoint, tmp_path, monkeypatch,
                                                         manifest_format):
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    path = Path(checkpoint.uri) / name
    data = bytearray(path.read_bytes())
    data[550] ^= 0xFF                        # same size, inside the sixth range
    path.write_bytes(bytes(data))
    if manifest_format == 1:                 # sha256 only: that is what gets compared
        for rec in checkpoint.manifest.files.values():
            rec.crc32c = ""
    out_of_order(monkeypatch)
    algorithm = "crc32c" if manifest_format == 2 else "sha256"
    with pytest.raises(CheckpointDamaged, match=f"{name} fails its {algorithm} checksum"):
        download(checkpoint, str(tmp_path / "dl"), threads=3, retries=0)
    assert not (tmp_path / "dl").exists() or os.listdir(tmp_path / "dl") == []


def test_a_range_that_cannot_be_fetched_fails_the_download_without_a_hang(checkpoint, tmp_path,
                                                                          monkeypatch):
    out_of_order(monkeypatch, fail_at=("zero_pp_rank_0_mp_rank_00_optim_states.pt", 200))
    with pytest.raises(ConnectionError, match="range lost"):
        download(checkpoint, str(tmp_path / "dl"), threads=2, retries=0)
    assert not (tmp_path / "dl").exists() or os.listdir(tmp_path / "dl") == []
