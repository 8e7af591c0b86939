"""CheckpointManager: what the training loop calls to save and resume.

It implements the loop's checkpoint seam (pretrain.train.checkpoint_hook.CheckpointHook):

    mgr = CheckpointManager(cfg.checkpoint, zero_stage=cfg.train.zero_stage,
                            run_config=to_dict(cfg))
    mgr.claim()                                                   # collective, before the build
    start_step, extra = mgr.maybe_resume(engine, loader)          # collective
    mgr.maybe_save(step, engine, loader, extra_state)             # collective, every step
    last_uri = mgr.finish(step, engine, loader, extra_state)      # collective, at the end

and the lower-level calls behind it: `save`, `wait`, `restore`. Every method that touches
the engine is collective (all ranks, same step): DeepSpeed's save and load are.

Ownership: before it saves anything or loads a checkpoint into the engine, rank 0 takes
the lease on the URI (checkpoints.lease). It claims it as early as it can (`claim`, before
the model is built; else when the resume starts) and confirms it once the settle time has
passed: meanwhile the model builds, or the checkpoint downloads. Another job's live lease
refuses this one with a UserError on every rank.
Failures stop the run at the next save, on every rank together: when
`max_failed_uploads` checkpoints in a row could not be uploaded, another job took the
lease over, or the staging disk has no room for the save (checked before anything is
written: checkpoints.disk_space). Resume tries the checkpoints newest first and loads the
first that verifies (or exactly `resume_from`); one found damaged while being fetched gets
one warning naming it and the next older one is tried.

Saving blocks only while DeepSpeed gathers its state and we copy it to host memory
(checkpoints.snapshot; with snapshot_in_memory=false: DeepSpeed's write to `local_dir`) plus
a small run-state file; serialising, hashing, uploading, the per-rank markers and rank 0's
commit happen in background threads (checkpoints.upload).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pretrain import storage
from pretrain.errors import UserError

from . import disk_space
from . import restore as _restore
from . import safe_load
from .config import CheckpointConfig
from .discovery import CheckpointInfo, list_checkpoints, resume_candidates
from .lease import Lease, LeaseHeld
from .layout import MANIFEST, Manifest, run_state_name, step_dir
from .restore import CheckpointDamaged
from .retention import apply_retention
from .rng import capture_rng, restore_rng
from .upload import AsyncUploader, UploadJob, describe_failure

log = logging.getLogger("checkpoints")


class CheckpointSaveError(UserError):
    """Checkpoints could not be uploaded/committed (they stay invisible); the run stops."""


@dataclass
class ResumeState:
    step: int
    extra: dict[str, Any]
    loader_state: Any
    mlflow_run_id: str | None
    source: str                    # URI of the step folder loaded
    resharded: bool                # went through the universal conversion
    rng_restored: bool
    manifest: Manifest = field(repr=False)


def model_config_of(module) -> dict[str, Any]:
    """The architecture config of a model as a plain dict (TubeViT: model.config)."""
    module = getattr(module, "module", module)
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_json"):
        return json.loads(cfg.to_json())
    if dataclasses.is_dataclass(cfg):
        return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return dict(cfg) if isinstance(cfg, dict) else {}


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _broadcast(obj: Any) -> Any:
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, *, rank: int | None = None,
                 world_size: int | None = None, zero_stage: int | None = None,
                 model_config: dict[str, Any] | None = None,
                 run_config: dict[str, Any] | None = None, job: str = ""):
        if not cfg.uri:
            raise UserError("checkpoint.uri is not set; give a folder or fsspec URI to save "
                            "checkpoints to (or do not create a CheckpointManager)")
        dist = _dist()
        self.cfg = cfg
        self.uri = str(cfg.uri).rstrip("/")
        self.rank = rank if rank is not None else (dist.get_rank() if dist else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if dist else 1)
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.zero_stage = zero_stage
        self.job = job   # the launcher's job id (Ray job, torchrun run): same job, same owner
        self.model_config = model_config
        self.run_config = run_config or {}
        self.last_committed: str | None = None
        # Rank 0: called at each save; the checkpoint commits only once the returned event
        # is set (the training loop hands in its metric logger's `mark`).
        self.commit_gate: Callable[[], threading.Event] | None = None
        self.blocked_s: list[float] = []     # per save: time the training loop was held
        self._attempt: str | None = None
        self._uploader: AsyncUploader | None = None
        self._saved: set[int] = set()
        self._resumed_step: int | None = None
        self._lease: Lease | None = None     # rank 0: claimed, then held (Lease.claim/confirm)
        self._lease_phase = "none"           # every rank: "none" -> "claimed" -> "done"

    # -- identity shared by the ranks of this attempt ------------------------------------

    def _attempt_id(self) -> str:
        """Id of this run attempt, the same on every rank (one broadcast, at first use)."""
        if self._attempt is None:
            self._attempt = _broadcast(f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")
        return self._attempt

    def _ensure_lease(self, *, confirm: bool = True) -> None:
        """Rank 0 takes the lease on the URI (once); every rank raises if it is refused
        (collective).

        `confirm=False` does only the first half (Lease.claim: a live lease of another job
        refuses this one at once) and a later call finishes it (Lease.confirm: what is left
        of the settle time, then the read-back that may still refuse it). `restore` claims,
        finds and downloads its checkpoint (read-only) while the lease settles, and confirms
        before anything reaches the engine or is written."""
        if self._lease_phase == "done":
            return
        attempt = self._attempt_id()
        error = None
        if self._lease_phase == "none":
            if self.rank == 0:
                self._lease = Lease(self.uri, attempt=attempt, job=self.job,
                                    timeout_s=self.cfg.lease_timeout_s,
                                    take_over=self.cfg.take_over_lease)
                try:
                    self._lease.claim()
                except LeaseHeld as exc:
                    error = str(exc)
            error = _broadcast(error)
            self._lease_phase = "claimed"
        if error is None and confirm:
            if self.rank == 0:
                try:
                    self._lease.confirm()
                except LeaseHeld as exc:
                    error = str(exc)
                if error is None and not storage.is_remote(self.uri):
                    _remove_stale_staging(os.path.join(storage.local_path(self.uri), ".staging"),
                                          attempt, self.cfg.lease_timeout_s)
            error = _broadcast(error)
            self._lease_phase = "done"
        if error:
            self._lease_phase, self._lease = "done", None
            raise LeaseHeld(error)

    def _check_health(self) -> None:
        """Stop every rank together when checkpoints keep failing or the lease was lost
        (collective: called at each save, on every rank)."""
        mine = None
        streak = self._uploader.failed_in_a_row() if self._uploader is not None else []
        if len(streak) >= self.cfg.max_failed_uploads:
            last = self.last_committed or "none"
            mine = (f"{len(streak)} checkpoints in a row could not be saved to {self.uri} "
                    f"(steps {', '.join(str(s.step) for s in streak)}; last error: "
                    f"{streak[-1].error}). The run stops here rather than train on without "
                    f"checkpoints (checkpoint.max_failed_uploads={self.cfg.max_failed_uploads}). "
                    f"Check that the location is reachable and writable (credentials, quota, "
                    f"free disk for checkpoint.local_dir), then run again: it resumes from the "
                    f"newest committed checkpoint ({last}).")
        elif self._lease is not None:
            mine = self._lease.lost_message()
        errors = _gather_errors(mine, raw=True)
        if errors:
            raise CheckpointSaveError(errors[0])

    def _stage_root(self) -> str:
        """Where this rank writes a checkpoint before it is uploaded. A local target gets it
        inside the checkpoint URI, so that the "upload" is a rename, not a copy."""
        if not storage.is_remote(self.uri):
            return os.path.join(storage.local_path(self.uri), ".staging", self._attempt_id(),
                                f"rank_{self.rank:05d}")
        return os.path.join(self.cfg.local_dir, "save", self._attempt_id(), f"rank_{self.rank:05d}")

    def _get_uploader(self) -> AsyncUploader:
        if self._uploader is None:
            c = self.cfg
            self._uploader = AsyncUploader(
                self.uri, rank=self.rank, world_size=self.world_size, attempt=self._attempt_id(),
                max_in_flight=c.max_uploads_in_flight, retries=c.upload_retries,
                threads=c.upload_threads, commit_timeout_s=c.commit_timeout_s,
                on_commit=self._on_commit)
        return self._uploader

    def _on_commit(self, manifest: Manifest, uri: str) -> None:
        if self.last_committed is None or manifest.step >= _step_of(self.last_committed):
            self.last_committed = uri
        pending = self._uploader.pending_steps() - {manifest.step} if self._uploader else set()
        apply_retention(self.uri, self.cfg.keep_last, self.cfg.keep_every, pending,
                        quiet_s=self.cfg.lease_timeout_s)

    # -- save -----------------------------------------------------------------------------

    def save(self, step: int, engine, *, loader=None, extra: dict[str, Any] | None = None) -> str:
        """Write this rank's state for `step` locally and queue its upload (collective).

        Returns the URI the checkpoint will have once committed."""
        t0 = time.perf_counter()
        self._ensure_lease()
        self._check_health()
        self._check_room(step, engine)
        tag = step_dir(step)
        if self.rank == 0:
            self._uncommit(step)
        _barrier()   # no rank uploads a file of `step` while an old COMMIT.json still lists it
        stage_root = self._stage_root()
        local = os.path.join(stage_root, tag)
        # DeepSpeed's writer, wrapped: a write error is kept until save_checkpoint returned
        # on every rank (raising out of its middle would hang the others in its barriers).
        from .snapshot import GuardedCheckpointEngine, SnapshotCheckpointEngine   # DeepSpeed

        wrapper = SnapshotCheckpointEngine if self.cfg.snapshot_in_memory else GuardedCheckpointEngine
        writer = wrapper(engine.checkpoint_engine)
        error = None
        try:
            shutil.rmtree(local, ignore_errors=True)
            os.makedirs(stage_root, exist_ok=True)
            engine.checkpoint_engine = writer
            try:
                engine.save_checkpoint(stage_root, tag=tag, save_latest=False)
            finally:
                engine.checkpoint_engine = writer.inner
            writer.raise_error()
            extra = dict(extra or {})
            run_state = {"step": step, "rank": self.rank, "world_size": self.world_size,
                         "rng": capture_rng(), "extra": extra,
                         "loader": loader.state_dict() if hasattr(loader, "state_dict") else None}
            os.makedirs(os.path.join(local, "run_state"), exist_ok=True)
            torch.save(run_state, os.path.join(local, run_state_name(self.rank)))
        except Exception as exc:   # every rank stops, with the reason (a full disk named)
            shutil.rmtree(local, ignore_errors=True)
            error = (f"checkpoint step {step} could not be written locally: "
                     f"{describe_failure(exc, local, self._staging_disk()[1])}")
        errors = _gather_errors(error, raw=True)
        if errors:   # given up on every rank: the ranks that wrote theirs free the disk too
            shutil.rmtree(local, ignore_errors=True)
            raise CheckpointSaveError(errors[0] + self._stop_note())
        fields = {}
        if self.rank == 0:
            fields = {"world_size": self.world_size, "zero_stage": self._stage(engine),
                      "model_config": self._model_config(engine), "config": self.run_config,
                      "mlflow_run_id": extra.get("mlflow_run_id")}
        gate = self.commit_gate() if self.commit_gate is not None and self.rank == 0 else None
        in_memory = isinstance(writer, SnapshotCheckpointEngine)
        self._get_uploader().submit(UploadJob(step, local, fields,
                                              prepare=writer.write_all if in_memory else None,
                                              before_commit=_waiter(gate, step) if gate else None))
        self._saved.add(step)
        self.blocked_s.append(time.perf_counter() - t0)
        return f"{self.uri}/{tag}"

    def _staging_disk(self) -> tuple[str, str]:
        """The folder a user knows the staging disk by, and the setting that places it."""
        if not storage.is_remote(self.uri):
            return storage.local_path(self.uri), "checkpoint.uri"
        return self.cfg.local_dir, "checkpoint.local_dir"

    def _expected_bytes(self, engine) -> int:
        """What this rank's next save will stage: its files of the newest save whose upload
        finished, else (first save, or none finished yet) the bytes of its state's tensors."""
        if self._uploader is not None:
            done = [s.bytes for s in self._uploader.stats if s.finished and s.bytes]
            if done:
                return done[-1]
        return disk_space.state_bytes(engine)

    def _check_room(self, step: int, engine) -> None:
        """Stop every rank together, before anything is written, when the staging disk has
        no room for this save (collective; see checkpoints.disk_space for why it stops).
        When it is short while checkpoints are still uploading, those are waited for first:
        their staged files are removed once uploaded."""
        need = disk_space.needed_bytes(self._expected_bytes(engine))
        folder, setting = self._staging_disk()
        stage = self._stage_root()
        for last_try in (False, True):
            rooms = _all_gather(disk_space.Room.measure(self.rank, stage, need))
            short = disk_space.shortfall(rooms)
            if short is None:
                return
            in_flight = _all_gather(bool(self.uploading()))
            if last_try or not any(in_flight):
                break
            log.warning("checkpoint step %d: the staging disk is short of space; waiting for "
                        "the checkpoints still uploading to free theirs", step)
            if self._uploader is not None:
                self._uploader.wait()
        ranks, free, need = short
        raise CheckpointSaveError(
            f"checkpoint step {step} was not saved: "
            + disk_space.full_disk_message(folder, free, need, setting=setting,
                                           ranks=[r.rank for r in ranks], host=ranks[0].host)
            + ". Nothing of it was written" + self._stop_note())

    def _stop_note(self) -> str:
        """How a stop at a save leaves the checkpoints (collective: rank 0 knows the newest)."""
        newest = _broadcast(self.last_committed)
        return (f". The run stops here; every committed checkpoint is intact (newest: "
                f"{newest or 'none'}) and the next run resumes from it.")

    def _uncommit(self, step: int) -> None:
        """Rank 0, before saving `step` again (a resumed run passes a step an earlier attempt
        saved): its old COMMIT.json goes first, so the old manifest never lists new files."""
        fs, root = storage.filesystem(self.uri)
        manifest = f"{root}/{step_dir(step)}/{MANIFEST}"
        try:
            if fs.exists(manifest):
                fs.rm_file(manifest)
                fs.invalidate_cache()
                log.info("checkpoint step %d is being saved again: removed its old %s", step,
                         MANIFEST)
        except FileNotFoundError:
            pass

    def uploading(self) -> set[int]:
        """Steps this rank saved whose upload (rank 0: commit) has not finished yet."""
        return self._uploader.pending_steps() if self._uploader is not None else set()

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until queued uploads are done (rank 0: committed).

        Raises when the newest checkpoint could not be saved (the run's final state would be
        lost); an earlier failure followed by a good checkpoint was already logged and is
        not an error. Returns the newest committed checkpoint URI known to this rank."""
        if self._uploader is not None:
            self._uploader.wait(timeout)
            streak = self._uploader.failed_in_a_row()
            if streak:
                raise CheckpointSaveError(
                    f"the last checkpoint(s) could not be saved to {self.uri}: " +
                    "; ".join(f"step {s.step}: {s.error}" for s in streak) +
                    f". The newest committed checkpoint is {self.last_committed or 'none'}.")
        return self.last_committed

    def close(self) -> None:
        if self._uploader is not None:
            self._uploader.close()
            if not self._uploader.pending_steps():
                _remove_staging(self._stage_root())
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def _stage(self, engine) -> int:
        if self.zero_stage is None:
            self.zero_stage = int(engine.zero_optimization_stage())
        return self.zero_stage

    def _model_config(self, engine) -> dict[str, Any]:
        if self.model_config is None:
            self.model_config = model_config_of(engine)
        return self.model_config

    # -- resume ---------------------------------------------------------------------------

    def restore(self, engine, loader=None, info: CheckpointInfo | None = None) -> ResumeState | None:
        """Load a checkpoint into engine (collective): `info`, else checkpoint.resume_from,
        else the newest one that verifies. Returns None when there is nothing to resume from.

        The lease is claimed first and confirmed only once the checkpoint is downloaded
        (`_load`), so its settle time overlaps the download; a refusal discards what was
        downloaded and is the error raised, whatever else went wrong meanwhile."""
        self._ensure_lease(confirm=False)
        try:
            state = self._find_and_load(engine, loader, info)
        except LeaseHeld:
            raise
        except Exception:
            self._ensure_lease()   # no-op once confirmed; a refusal replaces this error
            raise
        self._ensure_lease()       # nothing to resume from: the URI is still ours to save to
        return state

    def _find_and_load(self, engine, loader, info: CheckpointInfo | None) -> ResumeState | None:
        explicit = info is not None or self.cfg.resume_from not in (None, "")
        candidates = None
        if self.rank == 0:
            candidates = iter([info]) if info is not None else None
        damaged: list[str] = []     # the same on every rank (fetch errors are gathered)
        while True:
            pick, error = None, None
            if self.rank == 0:
                try:
                    if candidates is None:
                        candidates = resume_candidates(self.uri, self.cfg.resume_from)
                    pick = next(candidates, None)
                    if pick is None and (damaged or any(
                            i.committed for i in list_checkpoints(self.uri, verify="size"))):
                        found = damaged or ["see the warnings above for each one"]
                        error = CheckpointDamaged(
                            f"no checkpoint under {self.uri} verifies against its manifest "
                            f"({'; '.join(found)}). Resume from another location with "
                            "checkpoint.resume_from=URI, or start afresh with "
                            "checkpoint.resume=false and a new checkpoint.uri.")
                except UserError as exc:
                    error = exc
            pick, error = _broadcast((pick, error))
            if error is not None:
                raise error
            if pick is None:
                return None
            try:
                return self._load(engine, loader, pick)
            except CheckpointDamaged as exc:
                if explicit:
                    raise CheckpointDamaged(
                        f"{exc}. It was chosen explicitly (checkpoint.resume_from="
                        f"{self.cfg.resume_from}), so no other checkpoint is tried; choose "
                        "another step (see `pretrain checkpoints list`) or leave "
                        "checkpoint.resume_from unset to take the newest one that verifies."
                    ) from None
                damaged.append(str(exc))
                if self.rank == 0:
                    log.warning("checkpoint step %d cannot be resumed from, %s; trying the next "
                                "older one", pick.step, exc)

    def _load(self, engine, loader, info: CheckpointInfo) -> ResumeState:
        manifest = info.manifest
        _restore.check_compatible(manifest.model_config, self._model_config(engine), info.uri,
                                  saved_name=_restore.built_from_name(manifest.config),
                                  current_name=_restore.built_from_name(self.run_config))
        stage = self._stage(engine)
        root = os.path.join(self.cfg.local_dir, "restore", self._attempt_id())
        in_place = not storage.is_remote(info.uri)
        folder = storage.local_path(info.uri) if in_place else os.path.join(root, step_dir(info.step))
        convert = _restore.needs_conversion(manifest, self.world_size, stage)
        # the rank that downloads reads its own files while the rest arrives (not for a
        # conversion, which reads the whole download in another process)
        prefetch = (_restore.Prefetch(self.rank, _local_world_size(self.world_size))
                    if self.local_rank == 0 and not convert else None)
        error = None
        if self.local_rank == 0:
            try:
                _restore.fetch(info, root, self.cfg.verify_checksums, self.cfg.upload_threads,
                               self.cfg.upload_retries, prefetch)
                if convert:
                    log.warning("checkpoint %s was saved with %d ranks at ZeRO stage %d; converting "
                                "it through DeepSpeed's universal format for %d ranks at stage %d",
                                info.uri, manifest.world_size, manifest.zero_stage,
                                self.world_size, stage)
                    _restore.convert_to_universal(folder, root)
            except Exception as exc:  # every rank must learn about it, not hang in the barrier
                error = exc
        errors = _gather_errors(error)
        if errors:
            if any(e.startswith("CheckpointDamaged: ") for e in errors):
                text = next(e for e in errors if e.startswith("CheckpointDamaged: "))
                raise CheckpointDamaged(text[len("CheckpointDamaged: "):])
            if isinstance(error, Exception):
                raise error
            raise RuntimeError(f"restoring {info.uri} failed on another rank: {errors[0]}")
        # Up to here only reads of the URI and local scratch files: the lease has settled
        # meanwhile. Confirm it before the engine gets anything; refused, the download goes.
        try:
            self._ensure_lease()
        except LeaseHeld:
            if prefetch is not None:
                prefetch.clear()
            if self.local_rank == 0:
                shutil.rmtree(root, ignore_errors=True)
            raise
        if convert:
            _restore.load_into_engine(engine, os.path.join(root, f"universal-{step_dir(info.step)}"),
                                      step_dir(info.step), universal=True)
        else:
            _restore.load_into_engine(engine, os.path.dirname(folder), step_dir(info.step),
                                      universal=False, prefetch=prefetch)
        own = run_state_name(self.rank)
        name = own if own in manifest.files else run_state_name(0)
        state = safe_load.load(os.path.join(folder, name))
        _barrier()
        if self.local_rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        rng_restored = name == own
        if rng_restored:
            restore_rng(state["rng"])
        if loader is not None and state.get("loader") is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state["loader"])
        self._resumed_step = info.step
        self.last_committed = info.uri
        extra = state.get("extra") or {}
        return ResumeState(step=int(state["step"]), extra=extra, loader_state=state.get("loader"),
                           mlflow_run_id=extra.get("mlflow_run_id", manifest.mlflow_run_id),
                           source=info.uri, resharded=convert, rng_restored=rng_restored,
                           manifest=manifest)

    # -- the training loop's seam (pretrain.train.checkpoint_hook.CheckpointHook) -------

    def claim(self) -> None:
        """Claim the URI's lease now, before the model and engine are built (collective):
        another job's live lease refuses this one here, before anything is built, and the
        settle time (Lease.confirm) passes while they build, so neither a resume nor a first
        save waits for it. The lease is ours once confirmed, before anything is loaded into
        the engine or written."""
        self._ensure_lease(confirm=False)

    def maybe_resume(self, engine, loader) -> tuple[int, dict[str, Any]]:
        if not self.cfg.resume:
            self._ensure_lease()
            return 0, {}
        state = self.restore(engine, loader)
        if state is None:
            return 0, {}
        log.info("resumed from %s at step %d%s", state.source, state.step,
                 " (resharded)" if state.resharded else "")
        return state.step, state.extra

    def maybe_save(self, step: int, engine, loader,
                   extra_state: Callable[[], dict[str, Any]]) -> str | None:
        if step % self.cfg.every_steps:
            return None
        return self.save(step, engine, loader=loader, extra=extra_state())

    def finish(self, step: int, engine, loader,
               extra_state: Callable[[], dict[str, Any]], timeout: float | None = None) -> str | None:
        """Save the final step (unless already saved or just resumed), wait for uploads."""
        if step not in self._saved and step != self._resumed_step and step > 0:
            self.save(step, engine, loader=loader, extra=extra_state())
        try:
            self.wait(timeout)
        finally:
            self.last_committed = _broadcast(self.last_committed)
            self.close()
        return self.last_committed


def _local_world_size(world_size: int) -> int | None:
    """How many ranks run on this node, as the launcher says (Ray Train, torchrun and our
    launcher set LOCAL_WORLD_SIZE); None when nothing says and the world has several."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local:
        return int(local)
    return 1 if world_size == 1 else None


def _remove_staging(stage_root: str) -> None:
    """This rank's staging folder, then its attempt's and `.staging` if they are empty."""
    shutil.rmtree(stage_root, ignore_errors=True)
    parent = os.path.dirname(stage_root)
    for folder in (parent, os.path.dirname(parent)):
        try:
            os.rmdir(folder)
        except OSError:   # not empty (other ranks, other attempts) or already gone
            return


def _remove_stale_staging(staging: str, attempt: str, quiet_s: float) -> None:
    """Rank 0, holding the lease: staging folders of crashed attempts inside a local
    checkpoint URI, untouched for `quiet_s`."""
    try:
        entries = os.listdir(staging)
    except FileNotFoundError:
        return
    now = time.time()
    for name in entries:
        path = os.path.join(staging, name)
        try:
            newest = max((os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(path)
                          for f in fs), default=os.path.getmtime(path))
        except OSError:
            continue
        if name != attempt and now - newest >= quiet_s:
            shutil.rmtree(path, ignore_errors=True)


COMMIT_GATE_TIMEOUT_S = 120.0


def _waiter(gate: threading.Event, step: int) -> Callable[[], None]:
    def wait() -> None:
        if not gate.wait(COMMIT_GATE_TIMEOUT_S):
            log.warning("checkpoint step %d: metrics logged before it were still not sent after "
                        "%.0f s; committing anyway", step, COMMIT_GATE_TIMEOUT_S)
    return wait


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, by rank (collective)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _gather_errors(error: Exception | str | None, raw: bool = False) -> list[str]:
    """Every rank's error message (collective); empty when all went fine. `raw`: `error`
    is the message itself (no exception type in front)."""
    if error is None:
        mine = None
    else:
        mine = str(error) if raw else f"{type(error).__name__}: {error}"
    return [m for m in _all_gather(mine) if m]


def _step_of(uri: str) -> int:
    from .layout import parse_step_dir

    return parse_step_dir(uri) or -1
