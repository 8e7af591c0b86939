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
    digest = _InOrderDigest(Digests(sha256=True, crc32c=True), lambda: freed.append(1), 1000)
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


def test_each_file_is_handed_on_once_complete_and_verified_model_states_first(
        checkpoint, tmp_path, monkeypatch):
    out_of_order(monkeypatch)
    handed: list[tuple[str, bytes]] = []
    folder = download(checkpoint, str(tmp_path / "dl"), threads=3, retries=0,
                      ready=lambda rel, path: handed.append((rel, Path(path).read_bytes())))
    names = [rel for rel, _ in handed]
    assert sorted(names) == sorted(checkpoint.manifest.files) and len(set(names)) == len(names)
    assert names[0] == "mp_rank_00_model_states.pt"     # what DeepSpeed's load reads first
    for rel, data in handed:                           # whole, as the manifest has it
        assert data == (Path(folder) / rel).read_bytes() == (Path(checkpoint.uri) / rel).read_bytes()


def test_a_damaged_file_is_never_handed_on(checkpoint, tmp_path, monkeypatch):
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path = Path(checkpoint.uri) / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                         # the last byte: caught only once the file is in
    path.write_bytes(bytes(data))
    handed: list[str] = []
    with pytest.raises(CheckpointDamaged, match=f"{name} fails its crc32c checksum"):
        download(checkpoint, str(tmp_path / "dl"), threads=2, retries=0,
                 ready=lambda rel, _: handed.append(rel))
    assert name not in handed


def test_prefetch_reads_this_ranks_engine_files_and_the_engine_reader_serves_them(tmp_path):
    import torch

    from checkpoints.safe_load import MmapCheckpointEngine

    prefetch = restore.Prefetch(rank=1)
    assert prefetch.wants("mp_rank_00_model_states.pt")
    assert prefetch.wants("zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert prefetch.wants("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert not prefetch.wants("zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert not prefetch.wants("zero_pp_rank_11_mp_rank_00_optim_states.pt")
    assert not prefetch.wants("run_state/rank_00001.pt") and not prefetch.wants("COMMIT.json")

    state = {"module": {"w": torch.arange(5000, dtype=torch.float32)}, "step": 3}
    own = tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    other = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(state, own)
    torch.save({"module": {"w": torch.zeros(3)}}, other)
    prefetch.ready(own.name, str(own))
    prefetch.ready(other.name, str(other))
    assert prefetch.get(other.name) is None            # another rank's shard: not read here
    got = prefetch.get(own.name)
    assert got["step"] == 3 and torch.equal(got["module"]["w"], state["module"]["w"])

    class Inner:                                       # stands in for DeepSpeed's engine
        def load(self, path, map_location=None):
            raise AssertionError("read from disk")

    reader = MmapCheckpointEngine(Inner(), lambda path: prefetch.get(os.path.basename(path)))
    assert reader.load(str(own)) is got                # served, not read again
    assert torch.equal(reader.load(str(other))["module"]["w"], torch.zeros(3))  # from disk


def test_prefetch_refuses_a_file_that_asks_for_code(tmp_path):
    import torch

    from pretrain.errors import UserError

    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": os.system}, evil)            # a global outside the allow-list
    with pytest.raises(UserError, match="mp_rank_00_model_states.pt was refused: it asks to "
                                        "run or build something"):
        restore.Prefetch(rank=0).ready(evil.name, str(evil))
