"""A full staging disk is found before a save writes anything (checkpoints.disk_space), and
one that fills up during a write is reported the same way. Fast: fake engines, one process;
tests/test_checkpoints_faults.py runs both faults on two real DeepSpeed ranks."""
from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pytest
import torch

from checkpoints import disk_space
from checkpoints.config import CheckpointConfig
from checkpoints.disk_space import Room, is_disk_full, needed_bytes, shortfall, state_bytes
from checkpoints.manager import CheckpointManager, CheckpointSaveError
from checkpoints.upload import describe_failure


def fake_engine(*, module_file: bool, zero_file: bool, wrapped: bool = True):
    """What state_bytes reads of a DeepSpeed engine: the module, the (ZeRO-wrapped) torch
    optimizer after one step, and which files this rank writes."""
    model = torch.nn.Linear(100, 10)                    # 1010 fp32 parameters: 4040 bytes
    flat = torch.nn.Parameter(torch.zeros(505))         # a rank's flat fp32 partition: 2020
    opt = torch.optim.AdamW([flat] if zero_file else model.parameters())
    params = opt.param_groups[0]["params"]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()                                          # exp_avg, exp_avg_sq (+ a step tensor)
    return SimpleNamespace(module=model, optimizer=SimpleNamespace(optimizer=opt) if wrapped else opt,
                           save_non_zero_checkpoint=module_file, save_zero_checkpoint=zero_file)


def test_state_bytes_counts_what_each_rank_writes():
    moments = 2 * 505 * 4 + 4            # exp_avg, exp_avg_sq of the partition, fp32 step
    # ZeRO, rank 0: model-states file and its optimizer partition (fp32 master + moments)
    assert state_bytes(fake_engine(module_file=True, zero_file=True)) == 4040 + 2020 + moments
    # ZeRO, another rank: its partition only
    assert state_bytes(fake_engine(module_file=False, zero_file=True)) == 2020 + moments
    # no ZeRO: the model-states file holds the module and the optimizer's moments, and the
    # optimizer's parameters are the module's (not counted twice)
    assert state_bytes(fake_engine(module_file=True, zero_file=False, wrapped=False)) == \
        4040 + 2 * 1010 * 4 + 2 * 4
    assert needed_bytes(10_000_000) == 11_000_000 + (1 << 20)


def room(rank, free, need, host="a", device=1):
    return Room(rank, host, device, "/stage", free, need)


def test_ranks_on_one_disk_add_up_and_every_rank_reaches_the_same_verdict():
    # two ranks on one disk: each fits alone, not together
    ranks, free, need = shortfall([room(1, 100, 60), room(0, 100, 60)])
    assert [r.rank for r in ranks] == [0, 1] and (free, need) == (100, 120)
    # the same ranks on two disks (or two hosts) fit
    assert shortfall([room(0, 100, 60), room(1, 100, 60, device=2)]) is None
    assert shortfall([room(0, 100, 60), room(1, 100, 60, host="b")]) is None
    # the short disk is found wherever it is
    ranks, free, need = shortfall([room(0, 10**9, 60), room(1, 50, 60, host="b")])
    assert [r.rank for r in ranks] == [1] and (free, need) == (50, 60)


def test_a_full_disk_is_recognised_in_torchs_words_too():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                     "2368 vs 2256"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))


def test_a_write_that_fills_the_disk_is_named_like_the_check(tmp_path):
    text = describe_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected "
                                         "pos 2368 vs 2256"), str(tmp_path / "save" / "step_1"))
    assert f"no space left on the device holding {tmp_path}" in text
    assert f"the staging folder {tmp_path} (checkpoint.local_dir) has" in text and "free" in text
    assert "point checkpoint.local_dir at a bigger one" in text
    assert describe_failure(ValueError("bad"), str(tmp_path)) == "ValueError: bad"


def test_guarded_writer_keeps_the_error_until_deepspeeds_save_returned(tmp_path):
    pytest.importorskip("deepspeed")
    from checkpoints.snapshot import GuardedCheckpointEngine

    written = []

    class Inner:   # the second file hits a full disk half-way
        def save(self, state, path):
            with open(path, "wb") as f:
                f.write(b"x" * 100)
            if len(written) == 1:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
            written.append(path)

    guard = GuardedCheckpointEngine(Inner())
    for name in ("a.pt", "b.pt", "c.pt"):    # DeepSpeed goes on (its barriers) after a failure
        guard.save({}, str(tmp_path / name))
    assert written == [str(tmp_path / "a.pt")]
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]    # the partial file is gone, c not written
    with pytest.raises(RuntimeError, match="unexpected pos"):
        guard.raise_error()


class InFlight:
    """An uploader with one checkpoint still uploading; `wait` finishes it."""

    def __init__(self, on_wait):
        self.pending, self.stats, self.on_wait = {4}, [], on_wait

    def pending_steps(self):
        return set(self.pending)

    def failed_in_a_row(self):
        return []

    def wait(self, timeout=None):
        self.pending.clear()
        self.on_wait()

    def close(self):
        pass


@pytest.mark.parametrize("freed", [True, False])
def test_save_waits_for_uploads_in_flight_then_stops_before_writing(tmp_path, monkeypatch, freed):
    free = {"bytes": 1000}
    monkeypatch.setattr(disk_space, "free_bytes", lambda folder: free["bytes"])
    local = tmp_path / "local"
    mgr = CheckpointManager(CheckpointConfig(uri="memory://disk-space-test/ck", local_dir=str(local)))
    mgr._uploader = InFlight(lambda: free.update(bytes=10**9 if freed else 1000))
    engine = fake_engine(module_file=True, zero_file=True)
    need = needed_bytes(state_bytes(engine))
    if freed:   # the uploads freed their staged files: the check passes (the fake engine
        mgr._check_room(8, engine)   # cannot save, so the check is called on its own)
        assert not mgr._uploader.pending
        return
    with pytest.raises(CheckpointSaveError) as stopped:
        mgr.save(8, engine)
    text = str(stopped.value)
    assert text.startswith("checkpoint step 8 was not saved: the staging folder "
                           f"{local} (checkpoint.local_dir) has 1.0 kB free and this save needs "
                           f"about {disk_space.human(need)} there (rank 0 on host ")
    assert "Nothing of it was written. The run stops here; every committed checkpoint is " \
           "intact (newest: none)" in text
    assert not mgr._uploader.pending           # it waited for the upload in flight first
    assert not local.exists()                  # nothing written
    mgr.close()


def test_the_next_save_needs_what_the_last_one_staged(tmp_path):
    mgr = CheckpointManager(CheckpointConfig(uri="memory://disk-space-test/ck2",
                                             local_dir=str(tmp_path)))
    engine = fake_engine(module_file=True, zero_file=True)
    assert mgr._expected_bytes(engine) == state_bytes(engine)      # first save: the tensors
    mgr._uploader = InFlight(lambda: None)
    mgr._uploader.stats = [SimpleNamespace(finished=True, bytes=5000),
                           SimpleNamespace(finished=True, bytes=0),   # failed: not measured
                           SimpleNamespace(finished=False, bytes=0)]
    assert mgr._expected_bytes(engine) == 5000
