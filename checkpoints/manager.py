"""CheckpointManager: what the training loop calls to save and resume.

It implements the loop's checkpoint seam (pretrain.train.checkpoint_hook.CheckpointHook):

    mgr = CheckpointManager(cfg.checkpoint, zero_stage=cfg.train.zero_stage,
                            run_config=to_dict(cfg))
    start_step, extra = mgr.maybe_resume(engine, loader)          # collective
    mgr.maybe_save(step, engine, loader, extra_state)             # collective, every step
    last_uri = mgr.finish(step, engine, loader, extra_state)      # collective, at the end

and the lower-level calls behind it: `save`, `wait`, `restore`. Every method that touches
the engine is collective (all ranks, same step): DeepSpeed's save and load are.

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

from pretrain.errors import UserError

from . import restore as _restore
from .config import CheckpointConfig
from .discovery import CheckpointInfo, latest_committed
from .layout import Manifest, run_state_name, step_dir
from .retention import apply_retention
from .rng import capture_rng, restore_rng
from .upload import AsyncUploader, UploadJob

log = logging.getLogger("checkpoints")


class CheckpointSaveError(RuntimeError):
    """One or more checkpoints could not be uploaded/committed (they stay invisible)."""


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
                 run_config: dict[str, Any] | None = None):
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

    # -- identity shared by the ranks of this attempt ------------------------------------

    def _attempt_id(self) -> str:
        """Id of this run attempt, the same on every rank (one broadcast, at first use)."""
        if self._attempt is None:
            self._attempt = _broadcast(f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")
        return self._attempt

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
        apply_retention(self.uri, self.cfg.keep_last, self.cfg.keep_every, pending)

    # -- save -----------------------------------------------------------------------------

    def save(self, step: int, engine, *, loader=None, extra: dict[str, Any] | None = None) -> str:
        """Write this rank's state for `step` locally and queue its upload (collective).

        Returns the URI the checkpoint will have once committed."""
        t0 = time.perf_counter()
        attempt = self._attempt_id()
        tag = step_dir(step)
        stage_root = os.path.join(self.cfg.local_dir, "save", attempt, f"rank_{self.rank:05d}")
        local = os.path.join(stage_root, tag)
        shutil.rmtree(local, ignore_errors=True)
        os.makedirs(stage_root, exist_ok=True)
        writer = None
        if self.cfg.snapshot_in_memory:
            from .snapshot import SnapshotCheckpointEngine

            writer = SnapshotCheckpointEngine(engine.checkpoint_engine)
            engine.checkpoint_engine = writer
        try:
            engine.save_checkpoint(stage_root, tag=tag, save_latest=False)
        finally:
            if writer is not None:
                engine.checkpoint_engine = writer.inner
        extra = dict(extra or {})
        run_state = {"step": step, "rank": self.rank, "world_size": self.world_size,
                     "rng": capture_rng(), "extra": extra,
                     "loader": loader.state_dict() if hasattr(loader, "state_dict") else None}
        os.makedirs(os.path.join(local, "run_state"), exist_ok=True)
        torch.save(run_state, os.path.join(local, run_state_name(self.rank)))
        fields = {}
        if self.rank == 0:
            fields = {"world_size": self.world_size, "zero_stage": self._stage(engine),
                      "model_config": self._model_config(engine), "config": self.run_config,
                      "mlflow_run_id": extra.get("mlflow_run_id")}
        gate = self.commit_gate() if self.commit_gate is not None and self.rank == 0 else None
        self._get_uploader().submit(UploadJob(step, local, fields,
                                              prepare=writer.write_all if writer else None,
                                              before_commit=_waiter(gate, step) if gate else None))
        self._saved.add(step)
        self.blocked_s.append(time.perf_counter() - t0)
        return f"{self.uri}/{tag}"

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until queued uploads are done (rank 0: committed); raise if any failed.

        Returns the newest committed checkpoint URI known to this rank."""
        if self._uploader is not None:
            failed = self._uploader.wait(timeout)
            if failed:
                raise CheckpointSaveError(
                    "checkpoint(s) could not be saved to " + self.uri + ": " +
                    "; ".join(f"step {s.step}: {s.error}" for s in failed))
        return self.last_committed

    def close(self) -> None:
        if self._uploader is not None:
            self._uploader.close()

    def _stage(self, engine) -> int:
        if self.zero_stage is None:
            self.zero_stage = int(engine.zero_optimization_stage())
        return self.zero_stage

    def _model_config(self, engine) -> dict[str, Any]:
        if self.model_config is None:
            self.model_config = model_config_of(engine)
        return self.model_config

    # -- resume ---------------------------------------------------------------------------

    def find_latest(self) -> CheckpointInfo | None:
        """Rank 0 picks the newest loadable checkpoint; every rank gets the same answer."""
        info = latest_committed(self.uri) if self.rank == 0 else None
        return _broadcast(info)

    def restore(self, engine, loader=None, info: CheckpointInfo | None = None) -> ResumeState | None:
        """Load the newest committed checkpoint (or `info`) into engine (collective).

        Returns None when there is nothing to resume from."""
        info = info if info is not None else self.find_latest()
        if info is None:
            return None
        manifest = info.manifest
        _restore.check_compatible(manifest.model_config, self._model_config(engine), info.uri)
        stage = self._stage(engine)
        root = os.path.join(self.cfg.local_dir, "restore", self._attempt_id())
        folder = os.path.join(root, step_dir(info.step))
        convert = _restore.needs_conversion(manifest, self.world_size, stage)
        error = None
        if self.local_rank == 0:
            try:
                _restore.download(info, root, self.cfg.verify_checksums, self.cfg.upload_threads * 2,
                                  self.cfg.upload_retries)
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
            if isinstance(error, Exception):
                raise error
            raise RuntimeError(f"restoring {info.uri} failed on another rank: {errors[0]}")
        if convert:
            _restore.load_into_engine(engine, os.path.join(root, f"universal-{step_dir(info.step)}"),
                                      step_dir(info.step), universal=True)
        else:
            _restore.load_into_engine(engine, root, step_dir(info.step), universal=False)
        own = run_state_name(self.rank)
        name = own if own in manifest.files else run_state_name(0)
        state = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False)
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

    def maybe_resume(self, engine, loader) -> tuple[int, dict[str, Any]]:
        if not self.cfg.resume:
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


COMMIT_GATE_TIMEOUT_S = 120.0


def _waiter(gate: threading.Event, step: int) -> Callable[[], None]:
    def wait() -> None:
        if not gate.wait(COMMIT_GATE_TIMEOUT_S):
            log.warning("checkpoint step %d: metrics logged before it were still not sent after "
                        "%.0f s; committing anyway", step, COMMIT_GATE_TIMEOUT_S)
    return wait


def _gather_errors(error: Exception | None) -> list[str]:
    """Every rank's error message (collective); empty when all went fine."""
    dist = _dist()
    mine = None if error is None else f"{type(error).__name__}: {error}"
    if dist is None:
        return [mine] if mine else []
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [m for m in out if m]


def _step_of(uri: str) -> int:
    from .layout import parse_step_dir

    return parse_step_dir(uri) or -1
