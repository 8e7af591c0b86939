"""A resume downloads its checkpoint while the lease on the URI settles
(CheckpointManager.restore: Lease.claim, download, Lease.confirm, then the engine): a lease
another job won meanwhile discards the download and is the error raised; a lease held
restores the saved bytes. Fast: a remote (memory://) store without DeepSpeed, the engine
load replaced by a recorder."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from checkpoints import manager as manager_module
from checkpoints.config import CheckpointConfig
from checkpoints.lease import LEASE, LeaseHeld, LeaseRecord
from checkpoints.manager import CheckpointManager
from checkpoints.rng import capture_rng
from checkpoints.upload import AsyncUploader, UploadJob
from pretrain import storage

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture
def saved(tmp_path) -> tuple[str, dict]:
    """A committed one-rank step 7 on a fresh memory:// URI, and the states saved in it."""
    uri = f"memory://ck-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "stage"
    (folder / "run_state").mkdir(parents=True)
    states = {MODEL: {"module": {"w": torch.arange(3000, dtype=torch.float32)}},
              OPTIM: {"optimizer_state_dict": {"exp_avg": torch.full((2000,), 0.5)}}}
    for name, state in states.items():
        torch.save(state, folder / name)
    torch.save({"step": 7, "rank": 0, "world_size": 1, "rng": capture_rng(), "extra": {},
                "loader": None}, folder / "run_state" / "rank_00000.pt")
    up = AsyncUploader(uri, rank=0, world_size=1, attempt="saver", retry_base_delay=0.01)
    up.submit(UploadJob(7, str(folder), {"world_size": 1, "zero_stage": 2,
                                         "model_config": {"dim": 8}}))
    assert up.wait(30) == []
    return uri, states


def resumer(uri: str, tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(uri=uri, local_dir=str(tmp_path / "local")),
                             rank=0, world_size=1, zero_stage=2, model_config={"dim": 8})


def watch(monkeypatch, mgr: CheckpointManager, during_fetch=None) -> dict:
    """Record what the restore does: whether the lease was confirmed when the download ran,
    the Prefetch it filled, and what the engine was handed (the engine load is a recorder)."""
    seen: dict = {"engine": None}
    real_fetch = manager_module._restore.fetch

    def fetch(info, root, *args):
        seen["confirmed_before_download"] = mgr._lease._thread is not None
        seen["prefetch"] = args[-1]
        folder = real_fetch(info, root, *args)
        if during_fetch is not None:
            during_fetch()
        return folder

    def load_into_engine(engine, load_dir, tag, universal, prefetch=None):
        seen["engine"] = {name: prefetch.get(name) for name in (MODEL, OPTIM)}

    monkeypatch.setattr(manager_module._restore, "fetch", fetch)
    monkeypatch.setattr(manager_module._restore, "load_into_engine", load_into_engine)
    return seen


def test_a_held_lease_restores_the_saved_bytes_downloaded_while_it_settled(saved, tmp_path,
                                                                           monkeypatch):
    uri, states = saved
    mgr = resumer(uri, tmp_path)
    seen = watch(monkeypatch, mgr)
    state = mgr.restore(engine=None)
    try:
        assert state is not None and state.step == 7
        assert seen["confirmed_before_download"] is False     # downloaded while settling
        assert mgr._lease._thread is not None                 # held (renewed) afterwards
        for name, saved_state in states.items():
            got = seen["engine"][name]
            key = next(iter(saved_state))
            for k, tensor in saved_state[key].items():
                assert torch.equal(got[key][k], tensor)
        assert not (tmp_path / "local" / "restore").exists() or \
            not any((tmp_path / "local" / "restore").iterdir())
    finally:
        mgr.close()
    assert mgr._lease is None or mgr._lease.read() is None    # released at close


def test_a_lease_lost_while_downloading_discards_the_download_and_is_raised(saved, tmp_path,
                                                                            monkeypatch):
    uri, _ = saved
    mgr = resumer(uri, tmp_path)
    fs, root = storage.filesystem(uri)
    rival = LeaseRecord("elsewhere:42:rival", "ray:99", "elsewhere", 42, 0.0, 0.0, 300.0)

    def rival_writes_last() -> None:   # another job started at the same moment and wrote later
        import time

        rival.renewed = rival.acquired = time.time()
        fs.pipe_file(storage.join(root, LEASE), rival.to_json())

    seen = watch(monkeypatch, mgr, during_fetch=rival_writes_last)
    with pytest.raises(LeaseHeld, match="elsewhere:42:rival"):
        mgr.restore(engine=None)
    assert seen["confirmed_before_download"] is False
    assert seen["engine"] is None                             # nothing reached the engine
    assert seen["prefetch"].get(MODEL) is None and seen["prefetch"].get(OPTIM) is None
    restore_root = tmp_path / "local" / "restore"
    assert not restore_root.exists() or not any(restore_root.rglob("*.pt"))
    mgr.close()
    assert LeaseRecord.from_json(fs.cat_file(storage.join(root, LEASE))).holder == rival.holder


def test_a_live_lease_of_another_job_refuses_before_anything_is_downloaded(saved, tmp_path,
                                                                            monkeypatch):
    import time

    uri, _ = saved
    fs, root = storage.filesystem(uri)
    now = time.time()
    fs.pipe_file(storage.join(root, LEASE),
                 LeaseRecord("elsewhere:42:live", "ray:98", "elsewhere", 42, now, now, 300.0).to_json())
    mgr = resumer(uri, tmp_path)
    seen = watch(monkeypatch, mgr)
    with pytest.raises(LeaseHeld, match="in use by another job"):
        mgr.restore(engine=None)
    assert "prefetch" not in seen and seen["engine"] is None


def test_a_lease_claimed_before_the_build_has_settled_when_the_restore_starts(saved, tmp_path,
                                                                              monkeypatch):
    """The trainer claims before it builds the model (CheckpointManager.claim): by the time
    the restore runs the settle time has passed, so it downloads without waiting for it and
    confirms before the engine gets anything."""
    import time

    uri, states = saved
    mgr = resumer(uri, tmp_path)
    mgr.claim()
    claimed = mgr._lease
    time.sleep(claimed.settle_s)                              # the model builds meanwhile
    seen = watch(monkeypatch, mgr)
    try:
        state = mgr.restore(engine=None)
        assert state is not None and state.step == 7
        assert mgr._lease is claimed                          # the one claim, not a second
        assert seen["confirmed_before_download"] is False
        assert claimed.settle_wait_s == 0.0 and claimed._thread is not None
        assert torch.equal(seen["engine"][MODEL]["module"]["w"], states[MODEL]["module"]["w"])
    finally:
        mgr.close()


def test_a_lease_confirmed_long_after_its_claim_is_renewed_at_once(tmp_path):
    """A model slow to build leaves its claim's record old by the time it is confirmed: the
    confirmation renews it, so that no other job takes it for a dead holder's."""
    import time

    from checkpoints.lease import Lease

    lease = Lease(str(tmp_path / "ck"), attempt="slow", timeout_s=0.4, settle_s=0.05)
    (tmp_path / "ck").mkdir()
    lease.claim()
    claimed = lease.read().renewed
    time.sleep(0.15)                                          # > timeout_s / 4
    lease.confirm()
    try:
        assert lease.read().renewed > claimed + 0.1
    finally:
        lease.release()
