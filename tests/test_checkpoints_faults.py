"""Faults injected into checkpointing, with real files, real DeepSpeed engines and the GCS
emulator: same-size corruption of the newest checkpoint, two jobs on one checkpoint URI,
uploads that keep failing, a full staging disk (found before the save, or injected ENOSPC
and torch's "unexpected pos" during it), re-saving a step.

Each fault must end in one of two ways: the run goes on from a checkpoint that verifies,
or it stops with one clear paragraph; never a committed checkpoint lost or a corrupt one
loaded. The fast tests work on the storage layer; `test_faults_with_real_engines` runs the
manager on two DeepSpeed ranks (one spawn for all its faults, to keep the suite short)."""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints import upload
from checkpoints.discovery import latest_committed, list_checkpoints, resume_candidates
from checkpoints.layout import MANIFEST, step_dir
from checkpoints.lease import LEASE, Lease, LeaseHeld, LeaseRecord
from checkpoints.retention import apply_retention
from checkpoints.upload import UploadJob
from pretrain.errors import UserError
from tests.fixtures.ranks import run_ranks
from tests.test_checkpoints_store import save_step, stage_files, uploaders


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Same-size corruption: one byte changed in the middle of the file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- same-size corruption ------------------------------------------------------------------

def test_same_size_corruption_of_the_newest_is_skipped_everywhere(tmp_path, caplog):
    """Discovery, retention (keep_last=1), `resume_from` and `checkpoints list` all see it."""
    from orchestration.cli import main

    uri = str(tmp_path / "ck")
    ups = uploaders(uri, 1)
    save_step(ups, tmp_path, 1)
    save_step(ups, tmp_path, 2)
    flip_byte(tmp_path / "ck" / step_dir(2) / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with caplog.at_level(logging.WARNING, logger="checkpoints"):
        assert latest_committed(uri).step == 1
    assert caplog.text.count(step_dir(2)) == 1 and "crc32c" in caplog.text
    # keep_last=1 keeps the only good checkpoint, not the corrupt newest one.
    assert apply_retention(uri, keep_last=1, keep_every=0) == []
    assert [(i.step, i.loadable) for i in list_checkpoints(uri)] == [(1, True), (2, False)]
    # An explicit choice of the damaged step is an error naming it, never a silent fallback.
    with pytest.raises(UserError, match="step_00000002 cannot be loaded.*crc32c"):
        list(resume_candidates(uri, 2))
    assert [i.step for i in resume_candidates(uri, 1)] == [1]
    assert [i.step for i in resume_candidates(uri, f"{uri}/{step_dir(1)}")] == [1]
    assert [i.step for i in resume_candidates(uri, None)] == [1]
    with pytest.raises(UserError, match="no committed checkpoint"):
        list(resume_candidates(uri, str(tmp_path / "elsewhere")))
    # The CLI: content checked by default; --sizes-only does not notice; --verify (sha256) does.
    for flags, ok, problem in (([], False, "crc32c"), (["--sizes-only"], True, None),
                               (["--verify"], False, "sha256")):
        capsys_out = _cli_json(main, ["checkpoints", "list", uri, "--json", *flags])
        row = {r["step"]: r for r in capsys_out["checkpoints"]}[2]
        assert row["loadable"] is ok, flags
        if problem:
            assert problem in row["problems"][0]


def _cli_json(main, argv: list[str]) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def test_retention_leaves_recent_uploads_of_others_alone(tmp_path):
    uri = str(tmp_path / "ck")
    ups = uploaders(uri, 1)
    save_step(ups, tmp_path, 1)
    save_step(ups, tmp_path, 3)
    partial = tmp_path / "ck" / step_dir(2)     # another process's upload, still being written
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    assert apply_retention(uri, keep_last=5, keep_every=0, quiet_s=60) == []
    old = time.time() - 120
    os.utime(partial / "mp_rank_00_model_states.pt", (old, old))
    assert apply_retention(uri, keep_last=5, keep_every=0, quiet_s=60) == [2]


# -- uploads that fail, a full staging disk --------------------------------------------------

def test_failures_in_a_row_and_a_full_staging_disk(tmp_path, monkeypatch):
    uri = str(tmp_path / "ck")
    (up,) = uploaders(uri, 1, retries=0)
    real = upload.put

    def run(step: int, broken: bool = False, prepare=None) -> None:
        def failing(fs, src, dst):
            raise ConnectionError("bucket unreachable (injected)")

        monkeypatch.setattr(upload, "put", failing if broken else real)
        up.submit(UploadJob(step, stage_files(tmp_path, 0, step), {"world_size": 1, "zero_stage": 2},
                            prepare=prepare))
        up.wait(30)

    run(1)
    run(2, broken=True)
    assert [s.step for s in up.failed_in_a_row()] == [2]
    run(3)
    assert up.failed_in_a_row() == []          # one failure followed by a good upload: fine

    def disk_full() -> dict:   # the background write of the snapshot hits ENOSPC half-way
        path = tmp_path / "local-r0-s4" / "big.pt"
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    run(4, prepare=disk_full)
    run(5, broken=True)
    streak = up.failed_in_a_row()
    assert [s.step for s in streak] == [4, 5]
    assert "no space left on the device holding" in streak[0].error
    # a local URI stages inside its own folder: checkpoint.uri places the disk
    assert f"the staging folder {tmp_path / 'local-r0-s4'} (checkpoint.uri) has" in streak[0].error
    assert not (tmp_path / "local-r0-s4").exists()           # partial staging files removed
    assert [i.step for i in list_checkpoints(uri) if i.loadable] == [1, 3]
    assert not (tmp_path / "ck" / step_dir(4) / MANIFEST).exists()


# -- ownership: a lease on the checkpoint URI --------------------------------------------------

def _lease(uri: str, attempt: str, **kw) -> Lease:
    kw.setdefault("timeout_s", 30.0)
    return Lease(uri, attempt=attempt, settle_s=0.05, **kw)


def lease_scenario(uri: str) -> None:
    """Refusal, same-job restart, stale and dead holders, explicit take-over, release."""
    first = _lease(uri, "a", job="ray:01")
    first.acquire()
    with pytest.raises(LeaseHeld) as refused:
        _lease(uri, "b", job="ray:02").acquire()
    text = str(refused.value)
    assert first.holder in text and "in use by another job" in text
    assert "checkpoint.take_over_lease=true" in text and "lease_timeout_s" in text
    # A restarted worker group of the same launcher job takes it over at once.
    again = _lease(uri, "a2", job="ray:01")
    again.acquire()
    first.release()                     # not the holder any more: leaves the lease alone
    assert again.read().holder == again.holder
    again.release()
    assert again.read() is None
    # A holder that stopped renewing long ago (another machine): taken over.
    fs, holder_path = first.fs, first.path
    stale = LeaseRecord("gone:1:x", "ray:09", "elsewhere", 1, 0.0, time.time() - 600, 30.0)
    fs.pipe_file(holder_path, stale.to_json())
    taker = _lease(uri, "c", job="ray:03")
    taker.acquire()
    taker.release()
    # Explicit take-over of a live lease: the old holder notices at its next renewal.
    live = _lease(uri, "d", job="ray:04", timeout_s=0.4)
    live.acquire()
    forced = _lease(uri, "e", job="ray:05", take_over=True)
    forced.acquire()
    deadline = time.monotonic() + 10
    while live.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.lost is not None and forced.holder in live.lost_message()
    live.release()
    assert forced.read().holder == forced.holder
    forced.release()


def test_lease_on_a_local_uri(tmp_path):
    uri = str(tmp_path / "ck")
    lease_scenario(uri)
    # A holder on this machine whose process is gone is taken over without waiting.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    record = LeaseRecord(f"{socket.gethostname()}:{dead}:x", "", socket.gethostname(), int(dead),
                         time.time(), time.time(), 300.0)
    (tmp_path / "ck" / LEASE).write_bytes(record.to_json())
    taker = _lease(uri, "f")
    taker.acquire()
    taker.release()


@pytest.mark.slow
def test_lease_on_gcs(gcs_bucket):
    lease_scenario(f"{gcs_bucket}/run")


# -- the manager on two DeepSpeed ranks ---------------------------------------------------------

class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def fault_worker(rank, world, uri, local) -> dict:
    """One rank: every fault in order against one checkpoint URI (see the test)."""
    import dataclasses

    import torch.distributed as dist

    from checkpoints import disk_space, snapshot
    from checkpoints.config import CheckpointConfig
    from checkpoints.integrity import HashingWriter
    from checkpoints.manager import CheckpointManager, CheckpointSaveError
    from tests.test_checkpoints_engine import full_state, make_engine, train_step

    out: dict = {"errors": {}}
    captured = _Capture()
    logging.getLogger("checkpoints").addHandler(captured)
    engine = make_engine(2, world)
    cfg = CheckpointConfig(uri=uri, every_steps=1, local_dir=local, keep_last=10,
                           max_failed_uploads=2, upload_retries=0, commit_timeout_s=30)
    real_put = upload.put
    root = Path(uri)

    def broken(fs, src, dst):
        raise ConnectionError("bucket unreachable (injected)")

    class FullDisk(HashingWriter):     # the staging disk fills up half-way through a file
        def write(self, data):
            if self.digests.size > 2048:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def save(mgr, step, put=real_put, writer=HashingWriter):
        upload.put, snapshot.HashingWriter = put, writer
        try:
            train_step(engine, step, rank)
            mgr.save(step, engine)
            mgr._get_uploader().wait(60)   # failures count once they are finished
        finally:
            upload.put, snapshot.HashingWriter = real_put, HashingWriter

    def expect(what, fn, exc_type):
        try:
            fn()
        except exc_type as exc:
            out["errors"][what] = str(exc)

    mgr = CheckpointManager(cfg, job="job-A")
    save(mgr, 1)
    out["staged_1"] = mgr._get_uploader().stats[0].bytes  # what this rank's files took
    out["estimated_1"] = disk_space.state_bytes(engine)   # what a first save's check assumes
    out["state_1"] = full_state(engine)
    save(mgr, 2, put=broken)
    save(mgr, 3)                                  # one failure, then good: the run goes on
    # Rank 1 sees no room on the staging disk: every rank stops before writing anything.
    real_free = disk_space.free_bytes
    disk_space.free_bytes = (lambda folder: 1000) if rank == 1 else real_free
    try:
        expect("no_room", lambda: mgr.save(4, engine), CheckpointSaveError)
    finally:
        disk_space.free_bytes = real_free
    # Rank 0's disk fills up inside DeepSpeed's own write (snapshot_in_memory=false): the
    # ranks get through DeepSpeed's barriers and all stop, naming the disk.
    direct = engine.checkpoint_engine
    if rank == 0:
        def full(state, path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        direct.save = full
    mgr.cfg = dataclasses.replace(cfg, snapshot_in_memory=False)
    try:
        expect("filled_up", lambda: mgr.save(4, engine), CheckpointSaveError)
    finally:
        mgr.cfg = cfg
        vars(direct).pop("save", None)
    dist.barrier()   # every rank has cleaned up after the stop (the check spans all ranks)
    out["staged_after_stops"] = sorted(p.name for p in (root / ".staging").rglob("step_00000004"))
    save(mgr, 4, writer=FullDisk)                 # ENOSPC while staging
    dist.barrier()   # every rank's uploader has given step 4 up (the check spans all ranks)
    out["staged_4"] = sorted(p.name for p in (root / ".staging").rglob("step_00000004"))
    save(mgr, 5, put=broken)
    expect("stopped", lambda: save(mgr, 6), CheckpointSaveError)   # 2 in a row: stop
    # A second job on the URI is refused while this one holds it.
    other = CheckpointManager(cfg, job="job-B")
    expect("refused", lambda: other.maybe_resume(engine, None), UserError)
    mgr.close()
    out["committed"] = [i.step for i in list_checkpoints(uri, verify="size") if i.loadable]
    dist.barrier()   # every rank has listed before rank 0 rewrites a file of step 3 below

    # Same-size corruption of the newest (step 3): the next job resumes from step 1.
    if rank == 0:
        flip_byte(root / step_dir(3) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    dist.barrier()
    captured.lines.clear()
    engine = make_engine(2, world)                # a new job: a fresh engine
    resumed = CheckpointManager(cfg, job="job-C")
    out["start"], _ = resumed.maybe_resume(engine, None)
    out["state_after"] = full_state(engine)
    out["warnings"] = list(captured.lines)
    # Saving step 3 again: its old COMMIT.json is gone before any of its files is replaced.
    seen: list[bool] = []

    def checking(fs, src, dst):
        seen.append((root / step_dir(3) / MANIFEST).exists())
        return real_put(fs, src, dst)

    save(resumed, 3, put=checking)
    out["old_commit_seen"] = seen
    out["last"] = resumed.finish(3, engine, None, lambda: {})
    # Asked for a damaged step explicitly: an error naming it, on every rank.
    if rank == 0:
        flip_byte(root / step_dir(1) / "mp_rank_00_model_states.pt")
    dist.barrier()
    pinned = CheckpointManager(dataclasses.replace(cfg, resume_from=1), job="job-D")
    expect("pinned", lambda: pinned.maybe_resume(engine, None), UserError)
    pinned.close()
    return out


@pytest.mark.slow
def test_faults_with_real_engines(tmp_path):
    uri = str(tmp_path / "ck")
    results = run_ranks(fault_worker, 2, uri, str(tmp_path / "local"), timeout=400)
    for rank, out in enumerate(results):
        errors = out["errors"]
        # Uploads failing twice in a row (steps 4: disk full, 5: bucket) stop every rank together.
        stopped = errors["stopped"]
        assert "2 checkpoints in a row could not be saved" in stopped and "steps 4, 5" in stopped
        assert "checkpoint.max_failed_uploads=2" in stopped and "step_00000003" in stopped
        assert out["staged_4"] == []
        # A staging disk without room: all ranks stop together, before writing; and one that
        # fills up inside DeepSpeed's save is named the same way, without a hang.
        no_room = errors["no_room"]
        assert no_room.startswith("checkpoint step 4 was not saved: the staging folder ")
        assert "has 1.0 kB free and this save needs about" in no_room
        assert "(ranks 0, 1 on host" in no_room      # one disk: the two ranks' needs add up
        assert "newest: " + f"{uri}/{step_dir(3)}" in no_room
        filled = errors["filled_up"]
        assert filled.startswith("checkpoint step 4 could not be written locally: no space left")
        assert "(checkpoint.uri) has" in filled and "The run stops here" in filled
        assert out["staged_after_stops"] == []
        # the first save's estimate from the state's tensors is close to the files written
        assert 0.9 <= out["estimated_1"] / out["staged_1"] <= 1.05, (out["estimated_1"], out["staged_1"])
        refused = errors["refused"]
        assert "is in use by another job" in refused and "checkpoint.take_over_lease" in refused
        assert out["committed"] == [1, 3]
        # Newest corrupt at the same size: resumed from step 1, exactly its state.
        assert out["start"] == 1
        for name, (w, m, v) in out["state_1"].items():
            a, b, c = out["state_after"][name]
            assert w.equal(a) and m.equal(b) and v.equal(c), name
        assert out["old_commit_seen"] and not any(out["old_commit_seen"])
        assert out["last"] == f"{uri}/{step_dir(3)}"
        assert "step_00000001 cannot be loaded" in errors["pinned"] and "crc32c" in errors["pinned"]
    warnings = [w for w in results[0]["warnings"] if step_dir(3) in w]
    assert len(warnings) == 1 and "falling back to an older one" in warnings[0]
    assert "crc32c" in warnings[0]
    assert latest_committed(uri).step == 3


def test_resume_from_is_checked_with_the_config():
    from checkpoints.config import CheckpointConfig

    with pytest.raises(UserError, match="checkpoint.resume is false"):
        CheckpointConfig(uri="/x", resume=False, resume_from=100).validate()
    with pytest.raises(UserError, match="resume_from=-1 is negative"):
        CheckpointConfig(uri="/x", resume_from=-1).validate()
    CheckpointConfig(uri="/x", resume_from="gs://b/run/step_00000100").validate()


# -- safe loading -------------------------------------------------------------------------------

class _Payload:
    """Unpickling this would run `touch` (what a tampered checkpoint file could do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow   # imports DeepSpeed (its classes are on the allow-list): seconds
def test_checkpoint_files_are_loaded_as_data_only(tmp_path):
    import torch

    from checkpoints import safe_load
    from checkpoints.rng import capture_rng

    marker = tmp_path / "code-ran"
    evil = tmp_path / "rank_00000.pt"
    torch.save({"step": 3, "rng": _Payload(str(marker))}, evil)
    with pytest.raises(UserError, match="asks to run or build something other than tensors"):
        safe_load.load(str(evil))
    # DeepSpeed's own loads ask for weights_only=False: forced to weights_only inside.
    with pytest.raises(UserError, match=r"posix\.system|os\.system|system"):
        with safe_load.weights_only_loads(), safe_load.refused_as_user_error(str(evil)):
            torch.load(evil, weights_only=False)
    assert not marker.exists()
    assert os.environ.get(safe_load.FORCE_ENV) is None     # restored afterwards
    # What the project writes itself loads (a run-state file with RNG states, loader position).
    good = tmp_path / "good.pt"
    torch.save({"step": 3, "rng": capture_rng(), "loader": {"version": 1, "step": 3}}, good)
    assert safe_load.load(str(good))["step"] == 3
