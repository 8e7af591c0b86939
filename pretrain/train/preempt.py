"""Stopping a run early but cleanly: every rank stops at the same step, after which the
loop writes a final checkpoint and returns.

Reasons to stop, any rank may see one first:
- SIGTERM to this process (a preempted VM, `kill`, torchrun forwarding it) -> `STOP` is set
  by the handler that `install_sigterm_handler` put on the process's main thread;
- an external request polled through `external()` (under Ray: the driver's stop flag, set
  when `pretrain run` itself gets SIGTERM);
- `checkpoint.stop_after_step` reached (train in slices; deterministic on every rank; a
  run resumed past that step is not stopped again).

`StopAgreement.__call__` runs once per optimizer step on every rank and all-reduces the
local verdicts (MAX over a tiny CPU tensor; a side gloo group when the main backend is NCCL,
so the check never syncs the accelerator stream): all ranks break out at the same step
boundary, which DeepSpeed's collective save needs.

Ray's node-drain notice (a spot VM about to be reclaimed) does not stop the run: every
`train.preemption_poll_steps` steps the loop asks Ray Train for it and, on a new notice,
writes a checkpoint at once and trains on until the node goes; Ray Train then restarts the
worker group, which resumes from that checkpoint (pretrain/train/preemption_poll.py).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable

import torch
import torch.distributed as dist

STOP = threading.Event()     # set by the SIGTERM handler (main thread), read by the loop
ACTIVE = threading.Event()   # a train() is running in this process (see `training`)
_previous = None             # the handler ours replaced: SIGTERM outside train() goes there


def _on_sigterm(signum, frame) -> None:
    if not ACTIVE.is_set():   # e.g. Ray tearing the worker down after training: exit as before
        if callable(_previous):
            return _previous(signum, frame)
        if _previous == signal.SIG_IGN:
            return None
        raise SystemExit(128 + signum)
    if not STOP.is_set():
        print("SIGTERM received: stopping at the next step with a final checkpoint",
              file=sys.stderr, flush=True)
    STOP.set()


def install_sigterm_handler() -> bool:
    """Route SIGTERM to `STOP` (main thread only); returns False elsewhere."""
    global _previous
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    if previous is not _on_sigterm:
        _previous = previous
    return True


@contextlib.contextmanager
def training():
    """Marks the span in which SIGTERM means "stop cleanly" rather than "exit now"."""
    STOP.clear()
    ACTIVE.set()
    try:
        yield
    finally:
        ACTIVE.clear()


class StopAgreement:
    def __init__(self, world_size: int, external: Callable[[], bool] | None = None,
                 stop_after_step: int = 0):
        self.world = world_size
        self.external = external
        self.stop_after = stop_after_step
        self.group = None
        if world_size > 1 and dist.is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")   # collective: every rank builds it

    def local(self, step: int) -> bool:
        if STOP.is_set() or (self.stop_after and step == self.stop_after):
            return True
        return bool(self.external and self.external())

    def __call__(self, step: int) -> bool:
        """True on every rank when any rank wants to stop after `step` (collective)."""
        flag = torch.tensor([1 if self.local(step) else 0], dtype=torch.int32)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
