"""The seam between the training loop and checkpointing.

The loop only ever talks to a `CheckpointHook`:

    start_step, extra = hook.maybe_resume(engine, loader)     # before the first step
    hook.maybe_save(step, engine, loader, extra_state)       # after every optimizer step
    last_uri = hook.finish(step, engine, loader, extra_state) # after the last step (saves if
                                                              # the last step is not saved yet,
                                                              # waits for pending uploads)
    hook.last_committed                                       # URI of the newest committed one

`extra_state` is a zero-argument callable returning a small dict the loop needs to continue
exactly (the open loss window, the MLflow run id); call it only when actually saving (it
runs a collective, so on every rank at the same step). The hook stores the dict next to
the engine state and hands it back from `maybe_resume`. Every method is called on every rank at the same step (DeepSpeed's save and
load are collective).

`make_checkpoint_hook` picks the implementation. The one here is the simple version:
DeepSpeed's own `save_checkpoint` into a local folder (`latest` pointer written by
DeepSpeed after a save). The checkpoints package replaces it with committed manifests,
async upload and resharding.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Protocol

from pretrain.errors import UserError
from pretrain.train.config import ExperimentConfig, to_dict


class CheckpointHook(Protocol):
    last_committed: str | None

    def maybe_resume(self, engine, loader) -> tuple[int, dict[str, Any]]: ...

    def maybe_save(self, step: int, engine, loader, extra_state: Callable[[], dict[str, Any]]) -> str | None: ...

    def finish(self, step: int, engine, loader, extra_state: Callable[[], dict[str, Any]]) -> str | None: ...


class NoCheckpoints:
    """checkpoint.uri is null: train from scratch, save nothing."""
    last_committed = None

    def maybe_resume(self, engine, loader):
        return 0, {}

    def maybe_save(self, step, engine, loader, extra_state):
        return None

    def finish(self, step, engine, loader, extra_state):
        return None


class LocalDeepSpeedCheckpoints:
    """`engine.save_checkpoint` into a local folder every `every_steps` and at the end."""

    def __init__(self, cfg: ExperimentConfig):
        uri = cfg.checkpoint.uri or ""
        if "://" in uri and not uri.startswith("file://"):
            raise UserError(f"checkpoint.uri '{uri}' is remote; this build saves checkpoints "
                            "to local folders only (give a path)")
        self.dir = Path(uri.removeprefix("file://")).resolve()
        self.every = cfg.checkpoint.every_steps
        self.resume = getattr(cfg.checkpoint, "resume", True)
        self.config = to_dict(cfg)
        self.last_committed: str | None = None
        self._last_saved_step = -1

    def maybe_resume(self, engine, loader):
        if not self.resume or not (self.dir / "latest").is_file():
            return 0, {}
        path, client = engine.load_checkpoint(str(self.dir))
        if path is None:
            return 0, {}
        if hasattr(loader, "load_state_dict") and client.get("loader") is not None:
            loader.load_state_dict(client["loader"])
        self.last_committed = path
        self._last_saved_step = int(client["step"])
        return int(client["step"]), client.get("extra", {})

    def maybe_save(self, step, engine, loader, extra_state):
        if self.every and step % self.every == 0:
            return self._save(step, engine, loader, extra_state)
        return None

    def finish(self, step, engine, loader, extra_state):
        if step != self._last_saved_step:
            self._save(step, engine, loader, extra_state)
        return self.last_committed

    def _save(self, step, engine, loader, extra_state):
        tag = f"step_{step:08d}"
        client = {"step": step, "extra": extra_state(), "config": self.config,
                  "loader": loader.state_dict() if hasattr(loader, "state_dict") else None}
        os.makedirs(self.dir, exist_ok=True)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client)
        self._last_saved_step = step
        self.last_committed = str(self.dir / tag)
        return self.last_committed


def make_checkpoint_hook(cfg: ExperimentConfig, rank: int, world_size: int) -> CheckpointHook:
    if not cfg.checkpoint.uri:
        return NoCheckpoints()
    return LocalDeepSpeedCheckpoints(cfg)
