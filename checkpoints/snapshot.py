"""DeepSpeed's checkpoint engine, wrapped for the duration of our saves.

`GuardedCheckpointEngine` writes as DeepSpeed would, but an error while writing a file (a
disk that filled up after checkpoints.disk_space's check) is kept instead of raised:
DeepSpeed's save is collective, and a rank that raised out of its middle would skip the
barriers the other ranks wait in. The manager raises the kept error once `save_checkpoint`
returned on every rank, and all ranks stop together. Later files of that save are skipped.

`SnapshotCheckpointEngine` (checkpoint.snapshot_in_memory, the default) takes the state
out of the training loop's way. DeepSpeed's `save_checkpoint` hands each file's state dict
to its checkpoint engine, which normally serialises it to disk there and then (the slow
part of a save). This one only copies the tensors (device -> host, or a host memcpy; the
live tensors change with the next step) and remembers the target path; the background
upload thread serialises the copies with `torch.save`, hashing the bytes on their way to
disk (so they are not read back to hash), before uploading them. Cost: host RAM for one
copy of the rank's state per checkpoint in flight (bounded by
checkpoint.max_uploads_in_flight).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from .integrity import Digests, HashingWriter


def snapshot(obj: Any) -> Any:
    """A copy of a (nested) state dict whose tensors no longer alias live training state."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, snapshot(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields") and type(obj) is tuple:
        return tuple(snapshot(v) for v in obj)
    return obj  # scalars, strings, torch.Size, configs: not changed by training


class GuardedCheckpointEngine(CheckpointEngine):
    """DeepSpeed's own engine (`inner`), whose write errors wait for `raise_error`."""

    def __init__(self, inner: CheckpointEngine):
        super().__init__()
        self.inner = inner
        self.name = type(self).__name__
        self.error: BaseException | None = None

    def save(self, state_dict, path: str):
        if self.error is not None:
            return   # the save already failed: write nothing more, let DeepSpeed finish
        try:
            self._save(state_dict, path)
        except Exception as exc:
            self.error = exc
            try:
                os.remove(path)   # a partial file frees its space; the save is given up
            except OSError:
                pass

    def _save(self, state_dict, path: str):
        self.inner.save(state_dict, path)

    def raise_error(self) -> None:
        """Call after `save_checkpoint` returned (on every rank): the first write error."""
        if self.error is not None:
            raise self.error

    def create(self, info):
        return self.inner.create(info)

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location)

    def commit(self, info):
        return self.inner.commit(info)

    def makedirs(self, path, exist_ok=False):
        return self.inner.makedirs(path, exist_ok=exist_ok)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self):
        return self.inner.is_decoupled()

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()


class SnapshotCheckpointEngine(GuardedCheckpointEngine):
    """Copies the state at the save; `write_all` serialises it later, in the upload thread."""

    def __init__(self, inner: CheckpointEngine):
        super().__init__(inner)
        self.pending: list[tuple[Any, str]] = []

    def _save(self, state_dict, path: str):
        self.pending.append((snapshot(state_dict), path))

    def preserves_storage_sharing(self):
        return False  # snapshot() already copies each tensor compactly

    def write_all(self) -> dict[str, Digests]:
        """Serialise the snapshots (runs in the upload thread); returns each file's digests."""
        digests = {}
        while self.pending:
            state, path = self.pending.pop(0)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                writer = HashingWriter(f)
                torch.save(state, writer)
            digests[path] = writer.digests
        return digests
