"""The seam between the training loop and checkpointing.

The loop only ever talks to a `CheckpointHook`:

    hook.claim()                                             # before the model is built
    start_step, extra = hook.maybe_resume(engine, loader)     # before the first step
    hook.maybe_save(step, engine, loader, extra_state)       # after every optimizer step
    last_uri = hook.finish(step, engine, loader, extra_state) # after the last step (saves if
                                                              # the last step is not saved yet,
                                                              # waits for pending uploads)
    hook.close()                                              # instead of finish, when the run
                                                              # fails: lets go of the URI
    hook.last_committed                                       # URI of the newest committed one
    hook.commit_gate = logger.mark                            # rank 0, optional: see below

`extra_state` is a zero-argument callable returning a small dict the loop needs to continue
exactly (the open loss window, the MLflow run id); call it only when actually saving (it
runs a collective, so on every rank at the same step). The hook stores the dict next to
the engine state and hands it back from `maybe_resume`. Every method is called on every rank at the same step (DeepSpeed's save and
load are collective).

`commit_gate`, when set, is called on rank 0 at each save and returns an event; the
checkpoint commits only after it is set. The loop uses it so that the metrics of every step
up to a committed checkpoint are in MLflow: a run restarted from that checkpoint never
trains those steps again, so metrics lost with a killed worker would be lost for good.

`claim` comes first, before the model and engine are built: the hook may start taking
ownership of its location then (CheckpointManager claims the URI's lease, whose settle
time then passes while the model builds), so that a second job on the location is refused
before it builds anything and a resume does not wait for the settle. A run that fails
calls `close` instead of `finish`, so that what it claimed does not hold up the next
attempt until the lease times out.

`make_checkpoint_hook` picks the implementation: nothing when checkpoint.uri is null, else
checkpoints.manager.CheckpointManager (sharded DeepSpeed state snapshotted to host memory,
uploaded in the background to any fsspec URI, committed by a manifest written last,
resumed from the newest committed checkpoint, resharded through DeepSpeed's universal
format when the worker count or ZeRO stage changed).
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable, Protocol

from pretrain.train.config import ExperimentConfig, to_dict


class CheckpointHook(Protocol):
    last_committed: str | None
    commit_gate: Callable[[], threading.Event] | None

    def claim(self) -> None: ...

    def maybe_resume(self, engine, loader) -> tuple[int, dict[str, Any]]: ...

    def maybe_save(self, step: int, engine, loader, extra_state: Callable[[], dict[str, Any]]) -> str | None: ...

    def finish(self, step: int, engine, loader, extra_state: Callable[[], dict[str, Any]]) -> str | None: ...

    def close(self) -> None: ...


class NoCheckpoints:
    """checkpoint.uri is null: train from scratch, save nothing."""
    last_committed = None
    commit_gate = None

    def claim(self):
        return None

    def maybe_resume(self, engine, loader):
        return 0, {}

    def maybe_save(self, step, engine, loader, extra_state):
        return None

    def finish(self, step, engine, loader, extra_state):
        return None

    def close(self):
        return None


LAUNCH_RUN_ID_ENV = "PRETRAIN_LAUNCH_RUN_ID"   # the job id pretrain.train.launch gives its ranks


def make_checkpoint_hook(cfg: ExperimentConfig, rank: int, world_size: int) -> CheckpointHook:
    if not cfg.checkpoint.uri:
        return NoCheckpoints()
    from checkpoints.manager import CheckpointManager

    return CheckpointManager(cfg.checkpoint, rank=rank, world_size=world_size,
                             zero_stage=cfg.train.zero_stage, run_config=to_dict(cfg),
                             job=launcher_job_id())


def launcher_job_id() -> str:
    """The id of the launcher job this process belongs to ("" when none): a restarted
    worker group of the same job takes the checkpoint URI's lease over at once, another
    job has to wait for it to go stale (checkpoints.lease). Ray is asked only when this
    process already runs under it (the worker must run without Ray too)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        # a job id is unique within one cluster only: every embedded cluster (each local
        # `pretrain run`) numbers its first job 01000000, so the cluster is part of the id
        context = ray.get_runtime_context()
        return f"ray:{context.gcs_address}/{context.get_job_id()}"
    ours = os.environ.get(LAUNCH_RUN_ID_ENV)   # set by python -m pretrain.train.launch
    if ours:
        return f"launch:{ours}"
    # torchrun's default --rdzv-id is "none", shared by every job not given one: no job id
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun:{elastic}" if elastic and elastic != "none" else ""
