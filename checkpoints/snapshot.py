"""Take DeepSpeed's checkpoint state out of the training loop's way.

DeepSpeed's `save_checkpoint` hands each file's state dict to its checkpoint engine, which
normally serialises it to disk there and then (the slow part of a save). While our save runs,
the engine's checkpoint engine is swapped for `SnapshotCheckpointEngine`: it only copies the
tensors (device -> host, or a host memcpy; the live tensors change with the next step) and
remembers the target path; the background upload thread serialises the copies with
`torch.save`, hashing the bytes on their way to disk (so they are not read back to hash),
before uploading them. Cost: host RAM for one copy of the rank's
state per checkpoint in flight (bounded by checkpoint.max_uploads_in_flight).
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


class SnapshotCheckpointEngine(CheckpointEngine):
    def __init__(self, inner: CheckpointEngine):
        super().__init__()
        self.inner = inner
        self.name = "SnapshotCheckpointEngine"
        self.pending: list[tuple[Any, str]] = []

    def create(self, info):
        return self.inner.create(info)

    def save(self, state_dict, path: str):
        self.pending.append((snapshot(state_dict), path))

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location)

    def commit(self, info):
        return self.inner.commit(info)

    def makedirs(self, path, exist_ok=False):
        return self.inner.makedirs(path, exist_ok=exist_ok)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

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
