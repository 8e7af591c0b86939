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
from checkpoints.layout import MANIFEST
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
                      ready=lambda rel, path, buffer: handed.append((rel, Path(path).read_bytes())))
    names = [rel for rel, _ in handed]
    assert sorted(names) == sorted(checkpoint.manifest.files) and len(set(names)) == len(names)
    assert names[0] == "mp_rank_00_model_states.pt"     # what DeepSpeed's load reads first
    for rel, data in handed:                           # whole, as the manifest has it
        assert data == (Path(folder) / rel).read_bytes() == (Path(checkpoint.uri) / rel).read_bytes()


def test_files_only_this_rank_reads_are_downloaded_into_memory_not_to_disk(
        checkpoint, tmp_path, monkeypatch):
    """Rank 0 with other ranks on its node keeps only its own shard in memory: handed on as
    a buffer holding the file, an empty placeholder on disk (never zeros that would load),
    and no manifest in the folder (it is not a complete copy to reuse); a changed byte in
    the memory-only file is still found."""
    out_of_order(monkeypatch)
    prefetch = restore.Prefetch(rank=0, local_world_size=2)
    own = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert [n for n in checkpoint.manifest.files if prefetch.in_memory(n)] == [own]
    handed: dict[str, object] = {}
    folder = download(checkpoint, str(tmp_path / "dl"), threads=3, retries=0,
                      ready=lambda rel, path, buffer: handed.__setitem__(rel, buffer),
                      in_memory=prefetch.in_memory)
    source = Path(checkpoint.uri)
    assert bytes(handed[own].numpy()) == (source / own).read_bytes()
    assert (Path(folder) / own).stat().st_size == 0
    assert not (Path(folder) / MANIFEST).exists()
    for name in checkpoint.manifest.files:
        if name != own:
            assert handed[name] is None
            assert (Path(folder) / name).read_bytes() == (source / name).read_bytes()

    data = bytearray((source / own).read_bytes())
    data[-1] ^= 0xFF
    (source / own).write_bytes(bytes(data))
    with pytest.raises(CheckpointDamaged, match=f"{own} fails its crc32c checksum"):
        download(checkpoint, str(tmp_path / "dl2"), threads=2, retries=0,
                 in_memory=prefetch.in_memory)


def test_which_files_a_rank_keeps_in_memory():
    """Alone on its node a rank keeps every file its engine reads; with others there (or
    when nothing says how many) only its own ZeRO shards, since they read the rest."""
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "zero_pp_rank_0_mp_rank_00_optim_states.pt", "run_state/rank_00001.pt"]
    alone, shared, unknown = (restore.Prefetch(rank=1, local_world_size=n) for n in (1, 4, None))
    assert [n for n in names if alone.in_memory(n)] == names[:2]
    assert [n for n in names if shared.in_memory(n)] == [names[1]]
    assert [n for n in names if unknown.in_memory(n)] == [names[1]]


def test_a_file_loaded_from_memory_is_views_into_its_bytes_and_code_is_refused():
    import io

    import torch

    from checkpoints.safe_load import load_buffer
    from pretrain.errors import UserError

    def in_memory(obj) -> torch.Tensor:
        out = io.BytesIO()
        torch.save(obj, out)
        return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)

    state = {"module": {"w": torch.randn(300, 7), "b": torch.arange(5).to(torch.bfloat16)},
             "step": 3, "groups": [{"lr": 0.1}]}
    buffer = in_memory(state)
    got = load_buffer(buffer, "a test file")
    assert got["step"] == 3 and got["groups"] == [{"lr": 0.1}]
    for key in ("w", "b"):
        assert torch.equal(got["module"][key], state["module"][key])
        ptr = got["module"][key].data_ptr()
        assert buffer.data_ptr() <= ptr < buffer.data_ptr() + buffer.numel()   # no copy
    with pytest.raises(UserError, match="a test file was refused: it asks to run or build"):
        load_buffer(in_memory({"module": os.system}), "a test file")


def test_a_damaged_file_is_never_handed_on(checkpoint, tmp_path, monkeypatch):
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path = Path(checkpoint.uri) / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                         # the last byte: caught only once the file is in
    path.write_bytes(bytes(data))
    handed: list[str] = []
    with pytest.raises(CheckpointDamaged, match=f"{name} fails its crc32c checksum"):
        download(checkpoint, str(tmp_path / "dl"), threads=2, retries=0,
                 ready=lambda rel, *_: handed.append(rel))
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
