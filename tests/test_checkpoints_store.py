"""Checkpoint storage without DeepSpeed: upload + commit protocol, failures, discovery,
fallback, retention, the `checkpoints list` verb. Real files, a real killed process, and
the GCS emulator for gs://."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pretrain import storage
from checkpoints.discovery import latest_committed, list_checkpoints, resolve
from checkpoints.layout import MANIFEST, Manifest, marker_name, step_dir
from checkpoints.restore import check_compatible, download
from checkpoints.retention import apply_retention, plan_deletions
from checkpoints import upload
from checkpoints.upload import AsyncUploader, UploadJob
from pretrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def random_bytes(n: int) -> bytes:
    """Random bytes that do not end in CR or LF: the GCS emulator parses multipart uploads
    with Python's email parser, which drops such a final byte (the stored object is one byte
    short; our commit check rightly refuses it). Real GCS and torch.save's zip files (they
    end with the zip trailer) are not affected."""
    return os.urandom(n - 1) + b"\x00"


def stage_files(root: Path, rank: int, step: int, size: int = 1000) -> str:
    """A rank's local files for one step, like DeepSpeed + run state would leave them."""
    folder = root / f"local-r{rank}-s{step}"
    (folder / "run_state").mkdir(parents=True)
    (folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(random_bytes(size))
    (folder / "run_state" / f"rank_{rank:05d}.pt").write_bytes(random_bytes(64))
    if rank == 0:
        (folder / "mp_rank_00_model_states.pt").write_bytes(random_bytes(size // 2))
    return str(folder)


def uploaders(uri: str, world: int, attempt: str = "a1", **kw) -> list[AsyncUploader]:
    kw.setdefault("retry_base_delay", 0.01)
    return [AsyncUploader(uri, rank=r, world_size=world, attempt=attempt, **kw) for r in range(world)]


def save_step(ups: list[AsyncUploader], root: Path, step: int) -> None:
    for up in ups:
        fields = {"world_size": len(ups), "zero_stage": 2, "model_config": {"dim": 8}} if up.rank == 0 else {}
        up.submit(UploadJob(step, stage_files(root, up.rank, step), fields))
    for up in ups:
        assert up.wait(30) == []


def test_commit_needs_every_rank_and_lists_all_files(tmp_path):
    uri = str(tmp_path / "ck")
    r0, r1 = uploaders(uri, 2)
    r0.submit(UploadJob(100, stage_files(tmp_path, 0, 100), {"world_size": 2, "zero_stage": 2}))
    time.sleep(0.5)
    info = list_checkpoints(uri)[0]
    assert not info.committed and "no commit record" in info.problems[0]
    assert latest_committed(uri) is None
    r1.submit(UploadJob(100, stage_files(tmp_path, 1, 100)))
    assert r1.wait(30) == [] and r0.wait(30) == []
    info = latest_committed(uri)
    assert info.step == 100 and info.loadable and info.world_size == 2
    assert set(info.manifest.files) == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt", "run_state/rank_00000.pt",
        "run_state/rank_00001.pt"}
    # Local staging copies are gone once uploaded.
    assert not any(p.name.startswith("local-") for p in tmp_path.iterdir())


def test_commit_waits_for_the_before_commit_gate(tmp_path):
    """The training loop gates commits on its metrics reaching MLflow (see pretrain.train.checkpoint_hook)."""
    import threading

    uri = str(tmp_path / "ck")
    gate = threading.Event()
    (r0,) = uploaders(uri, 1)
    r0.submit(UploadJob(7, stage_files(tmp_path, 0, 7), {"world_size": 1, "zero_stage": 2},
                        before_commit=lambda: gate.wait(30)))
    time.sleep(1.0)
    info = list_checkpoints(uri)[0]
    assert info.step == 7 and not info.committed     # files and marker are up, no commit
    gate.set()
    assert r0.wait(30) == []
    assert latest_committed(uri).step == 7


def test_stale_marker_of_another_attempt_is_not_counted(tmp_path):
    uri = str(tmp_path / "ck")
    fs, root = storage.filesystem(uri)
    folder = f"{root}/{step_dir(5)}"
    stale = {"rank": 1, "step": 5, "attempt": "old", "files": {}}
    storage.write_atomic(fs, f"{folder}/{marker_name(1)}", json.dumps(stale).encode())
    (r0,) = [AsyncUploader(uri, rank=0, world_size=2, attempt="new", commit_timeout_s=1.0,
                           retry_base_delay=0.01)]
    r0.submit(UploadJob(5, stage_files(tmp_path, 0, 5), {"world_size": 2, "zero_stage": 2}))
    failed = r0.wait(30)
    assert failed and "ranks [1] never finished" in failed[0].error
    assert latest_committed(uri) is None


def test_transient_errors_are_retried(tmp_path, monkeypatch):
    real = upload.put
    calls = {"n": 0}

    def flaky(fs, src, dst):
        calls["n"] += 1
        if calls["n"] <= 3:
            raise ConnectionError("connection reset by peer")
        return real(fs, src, dst)

    monkeypatch.setattr(upload, "put", flaky)
    uri = str(tmp_path / "ck")
    save_step(uploaders(uri, 1, retries=5), tmp_path, 10)
    assert latest_committed(uri).step == 10


def test_permanent_failure_leaves_no_loadable_checkpoint(tmp_path, monkeypatch):
    uri = str(tmp_path / "ck")
    save_step(uploaders(uri, 1), tmp_path, 10)
    real = upload.put

    def broken(fs, src, dst):
        if "optim_states" in dst:
            raise ConnectionError("storage unavailable")
        return real(fs, src, dst)

    monkeypatch.setattr(upload, "put", broken)
    (up,) = uploaders(uri, 1, retries=2)
    up.submit(UploadJob(20, stage_files(tmp_path, 0, 20), {"world_size": 1, "zero_stage": 2}))
    failed = up.wait(30)
    assert failed and failed[0].step == 20 and "storage unavailable" in failed[0].error
    assert latest_committed(uri).step == 10


def test_back_pressure_bounds_uploads_in_flight(tmp_path, monkeypatch):
    real = upload.put

    def slow(fs, src, dst):
        time.sleep(0.3)
        return real(fs, src, dst)

    monkeypatch.setattr(upload, "put", slow)
    (up,) = uploaders(str(tmp_path / "ck"), 1, max_in_flight=1, threads=4)
    folders = {s: stage_files(tmp_path, 0, s) for s in (1, 2, 3)}   # staged before timing
    waited = [up.submit(UploadJob(s, folders[s], {"world_size": 1, "zero_stage": 2}))
              for s in (1, 2, 3)]
    assert up.wait(30) == []
    # With one slot, each later save waits until the previous upload (>= 0.3 s) is done;
    # the margins leave room for a loaded machine.
    assert waited[0] < 0.15 and waited[1] >= 0.15 and waited[2] >= 0.15
    assert [i.step for i in list_checkpoints(str(tmp_path / "ck")) if i.loadable] == [1, 2, 3]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from checkpoints import upload
    from checkpoints.upload import AsyncUploader, UploadJob
    real = upload.put
    def put_then_hang(fs, src, dst):
        real(fs, src, dst)
        print("UPLOADED", flush=True)
        time.sleep(3600)
    upload.put = put_then_hang
    up = AsyncUploader({uri!r}, rank=0, world_size=1, attempt="k", threads=1)
    up.submit(UploadJob(30, {folder!r}, {{"world_size": 1, "zero_stage": 2}}))
    up.wait()
""")


def test_process_killed_mid_upload_never_yields_a_loadable_checkpoint(tmp_path):
    uri = str(tmp_path / "ck")
    save_step(uploaders(uri, 1), tmp_path, 20)
    folder = stage_files(tmp_path, 0, 30)
    script = KILL_SCRIPT.format(repo=str(REPO), uri=uri, folder=folder)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "UPLOADED"  # one file is in storage
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    infos = {i.step: i for i in list_checkpoints(uri)}
    assert not infos[30].committed and infos[30].size_bytes > 0
    assert latest_committed(uri).step == 20
    assert resolve(uri).step == 20
    with pytest.raises(UserError, match="no commit record"):
        resolve(infos[30].uri)


@pytest.mark.parametrize("damage, message", [
    ("delete", "missing file zero_pp_rank_0"),
    ("truncate", "bytes, manifest says"),
    ("manifest", "corrupt COMMIT.json"),
])
def test_damaged_newest_falls_back_with_a_warning(tmp_path, caplog, damage, message):
    uri = str(tmp_path / "ck")
    ups = uploaders(uri, 1)
    save_step(ups, tmp_path, 1)
    save_step(ups, tmp_path, 2)
    newest = tmp_path / "ck" / step_dir(2)
    target = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    else:
        (newest / MANIFEST).write_text('{"step": 2, "files": ')
    with caplog.at_level(logging.WARNING, logger="checkpoints"):
        info = latest_committed(uri)
    assert info.step == 1
    assert message in caplog.text and str(newest) in caplog.text


def test_checkpoint_deleted_while_being_listed_is_skipped_not_an_error(tmp_path, monkeypatch):
    """Retention in one process may delete a checkpoint between another process listing its
    folder and reading its manifest; the reader must see it as gone, not crash (seen in the
    killed-worker test: a save failed reading an old step's COMMIT.json)."""
    from fsspec.implementations.local import LocalFileSystem

    uri = str(tmp_path / "ck")
    ups = uploaders(uri, 1)
    save_step(ups, tmp_path, 1)
    save_step(ups, tmp_path, 2)
    real_cat = LocalFileSystem.cat_file

    def cat_file(self, path, *args, **kwargs):
        if step_dir(1) in str(path) and str(path).endswith(MANIFEST):
            raise FileNotFoundError(path)   # deleted just after the listing saw it
        return real_cat(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", cat_file)
    infos = list_checkpoints(uri)
    assert [(i.step, i.loadable) for i in infos] == [(1, False), (2, True)]
    assert "deleted by retention" in infos[0].problems[0]
    assert latest_committed(uri).step == 2


def test_checksum_mismatch_found_when_asked_and_on_download(tmp_path, caplog):
    uri = str(tmp_path / "ck")
    ups = uploaders(uri, 1)
    save_step(ups, tmp_path, 1)
    save_step(ups, tmp_path, 2)
    target = tmp_path / "ck" / step_dir(2) / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF  # same size, different bytes
    target.write_bytes(bytes(data))
    assert latest_committed(uri, verify="size").step == 2  # sizes only: not noticed
    with caplog.at_level(logging.WARNING, logger="checkpoints"):
        assert latest_committed(uri, verify="full").step == 1
    assert "fails its sha256 checksum" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="checkpoints"):
        assert latest_committed(uri).step == 1   # the default check reads the content too
    assert "fails its crc32c checksum" in caplog.text and step_dir(2) in caplog.text
    with pytest.raises(UserError, match="mp_rank_00_model_states.pt fails its crc32c checksum"):
        download(latest_committed(uri, verify="size"), str(tmp_path / "dl"))
    assert not (tmp_path / "dl" / step_dir(2)).exists()  # no partial download left visible


def test_retention_rules(tmp_path):
    uri = str(tmp_path / "ck")
    ups = uploaders(uri, 1)
    for step in (100, 200, 300, 400, 500):
        save_step(ups, tmp_path, step)
    # A crashed attempt's leftover (older than newest committed) and an upload in progress.
    for step, in_progress in ((250, False), (600, True)):
        d = tmp_path / "ck" / step_dir(step)
        d.mkdir()
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    deleted = apply_retention(uri, keep_last=2, keep_every=200, in_progress={600})
    assert deleted == [100, 250, 300]
    assert [(i.step, i.loadable) for i in list_checkpoints(uri)] == [
        (200, True), (400, True), (500, True), (600, False)]


def test_retention_never_deletes_the_newest_committed(tmp_path):
    uri = str(tmp_path / "ck")
    ups = uploaders(uri, 1)
    save_step(ups, tmp_path, 1)
    infos = list_checkpoints(uri)
    assert plan_deletions(infos, keep_last=1, keep_every=0) == []
    # A newer but uncommitted folder does not make the committed one deletable.
    d = tmp_path / "ck" / step_dir(2)
    d.mkdir()
    (d / "x").write_bytes(b"x")
    assert plan_deletions(list_checkpoints(uri), keep_last=1, keep_every=0) == []
    # With nothing committed nothing is deleted at all.
    assert plan_deletions([i for i in list_checkpoints(uri) if not i.loadable], 1, 0) == []


def test_incompatible_model_config_names_the_keys():
    saved = {"dim": 192, "depth": 12, "heads": 3, "drop_path_rate": 0.1}
    check_compatible(saved, {**saved, "drop_path_rate": 0.2}, "gs://b/step_1")  # fine
    with pytest.raises(UserError) as err:
        check_compatible(saved, {**saved, "dim": 384, "heads": 6}, "gs://b/step_1")
    msg = str(err.value)
    assert "dim: checkpoint 192, now 384" in msg and "heads: checkpoint 3, now 6" in msg
    assert "depth" not in msg


def test_checkpoint_of_another_model_family_is_refused_naming_both():
    """ViViT's variants share config keys, so the architecture dicts alone say little (or
    nothing): the families of the runs' model.name are compared first, as the registry
    defines them."""
    from pretrain.model.registry import model_config

    fsa, vivit = model_config("vivit-fsa-s").to_dict(), model_config("vivit-s").to_dict()
    for now in (vivit, fsa):   # differing keys or none at all: the family is what is named
        with pytest.raises(UserError) as err:
            check_compatible(fsa, now, "gs://b/step_1", saved_name="vivit-fsa-s", current_name="vivit-s")
        msg = str(err.value)
        for part in ("gs://b/step_1", "vivit-fsa model (model.name=vivit-fsa-s)",
                     "vivit model (model.name=vivit-s)", "Resume with model.name=vivit-fsa-s",
                     "vivit-fsa-b", "checkpoint.uri"):
            assert part in msg, (part, msg)
        assert "differing model config keys" not in msg
    # another size of the same family, its dims overridden to the checkpoint's: accepted
    dims = {k: fsa[k] for k in ("dim", "depth", "heads", "mlp_dim")}
    check_compatible(fsa, model_config("vivit-fsa-b", **dims).to_dict(), "u",
                     saved_name="vivit-fsa-s", current_name="vivit-fsa-b")
    # an older manifest without model.name (or a name no family registers): the keys only
    check_compatible(fsa, fsa, "u", saved_name=None, current_name="vivit-s")
    check_compatible(fsa, fsa, "u", saved_name="vivit-fsa-xl", current_name="vivit-s")
    with pytest.raises(UserError, match="differing model config keys: class_token"):
        check_compatible(fsa, vivit, "u", saved_name=None, current_name="vivit-s")


def test_model_names_come_from_the_run_configs_that_build_from_them():
    from checkpoints.restore import built_from_name, run_model_name

    assert built_from_name({"model": {"name": "vivit-s"}}) == "vivit-s"
    assert built_from_name({}) is None and built_from_name(None) is None     # older manifests
    # a model from a file has the file's architecture, whatever model.name says
    assert built_from_name({"model": {"name": "vivit-s", "init_from": "m.safetensors"}}) is None
    bootstrapped = {"model": {"name": "tubevit-b"}, "bootstrap": {"init_from": "b.safetensors"}}
    assert built_from_name(bootstrapped) is None
    assert run_model_name({"model": {"name": "vivit-s", "init_from": "m.safetensors"}}) == "vivit-s"


def test_resume_point_compares_the_families_before_ray_starts(monkeypatch):
    """The driver's check (orchestration/driver.py resume_point) names the manifest's family."""
    from types import SimpleNamespace

    import checkpoints.discovery
    from orchestration import driver
    from pretrain.model.registry import model_config

    arch = model_config("vivit-fsa-s").to_dict()
    saved = Manifest(step=1, attempt="a", world_size=1, zero_stage=2, files={}, model_config=arch,
                     config={"model": {"name": "vivit-fsa-s"}})
    info = SimpleNamespace(uri="gs://b/ck/step_00000001", manifest=saved)
    monkeypatch.setattr(checkpoints.discovery, "resume_candidates", lambda uri, resume_from: iter([info]))
    monkeypatch.setattr(driver, "expected_model_config", lambda cfg, data_info=None: arch)

    def cfg(name):
        return SimpleNamespace(checkpoint=SimpleNamespace(uri="gs://b/ck", resume=True, resume_from=None),
                               model=SimpleNamespace(name=name))

    assert driver.resume_point(cfg("vivit-fsa-b")) is info    # another size of the family
    with pytest.raises(UserError, match=r"step_00000001 was saved from a vivit-fsa model.*a vivit model"):
        driver.resume_point(cfg("vivit-s"))
    saved.config = {}                                         # an older manifest: keys only
    assert driver.resume_point(cfg("vivit-s")) is info


def test_manifest_parse_errors_are_descriptive():
    with pytest.raises(ValueError, match="lacks world_size"):
        Manifest.from_json(b'{"step": 1, "zero_stage": 2, "files": {}}')
    with pytest.raises(ValueError, match="not valid JSON"):
        Manifest.from_json(b"\x00garbage")


def test_cli_list_json_and_text(tmp_path, capsys):
    from orchestration.cli import main

    uri = str(tmp_path / "ck")
    ups = uploaders(uri, 2)
    save_step(ups, tmp_path, 7)
    d = tmp_path / "ck" / step_dir(8)
    d.mkdir()
    (d / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert main(["checkpoints", "list", uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["step"]: r for r in out["checkpoints"]}
    assert rows[7]["committed"] and rows[7]["world_size"] == 2 and rows[7]["zero_stage"] == 2
    assert rows[7]["size_bytes"] > 0 and rows[7]["time"] > 0
    assert not rows[8]["committed"] and out["latest_committed"].endswith(step_dir(7))
    assert main(["checkpoints", "list", uri]) == 0
    text = capsys.readouterr().out
    assert "no commit record" in text and "latest committed" in text


@pytest.mark.slow
def test_gs_upload_commit_discover_download(gcs_bucket, tmp_path):
    uri = f"{gcs_bucket}/run1"
    ups = uploaders(uri, 2)
    save_step(ups, tmp_path, 3)
    r0, r1 = ups
    r0.submit(UploadJob(4, stage_files(tmp_path, 0, 4), {"world_size": 2, "zero_stage": 2}))
    # Rank 1 has not uploaded step 4 yet: whatever rank 0 has done, only step 3 is visible.
    assert [i.step for i in list_checkpoints(uri) if i.loadable] == [3]
    info = resolve(uri)
    assert info.uri == f"{uri}/{step_dir(3)}" and info.world_size == 2
    local = download(info, str(tmp_path / "dl"))
    for name, rec in info.manifest.files.items():
        assert storage.sha256_file(os.path.join(local, name)) == rec.sha256
    r1.submit(UploadJob(4, stage_files(tmp_path, 1, 4)))
    assert r1.wait(30) == [] and r0.wait(30) == []
    assert latest_committed(uri).step == 4
