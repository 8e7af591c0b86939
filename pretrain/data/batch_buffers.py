"""Video batch buffers that a loader process reuses instead of allocating one per batch.

A training video batch is large (8 clips of 32 x 224 x 224 x 3: 38.5 MB). A new
shared-memory block per batch, which torch's collate makes and this loader made too, costs
the kernel allocating and zeroing every page of it (torch fallocates shared blocks) and
hands its descriptor to the training process over a socket with an authentication
handshake. On a 2-core machine that was ~4 ms of CPU per clip beside a ~20 ms decode
(benchmarks/data_pipeline.py's ratio). Here each loader process keeps a pool of buffers:

- A buffer is one block: a 64-byte header whose first byte says "the training process still
  holds this batch", then the pixels (64-byte aligned). The loader process writes clips
  straight into a free buffer (`BufferPool.take`, which sets the byte) and hands it over.
- Hand-over (`handoff`): the first time a buffer goes to the training process, its block
  travels as a tensor (torch passes the descriptor; the training process maps it once and
  keeps the mapping in `_received`); afterwards only its key travels. Batches are received
  in the order they were sent, so a key always arrives after its block.
- The training process gets the pixels as a tensor whose storage holds a numpy array of its
  own; a finalizer on that array clears the header byte when the last tensor or view of the
  batch is gone, and only then may the loader process write into the buffer again. A batch
  the trainer keeps is therefore never overwritten: the pool grows instead (a new buffer
  when none is free) and keeps its buffers until the loader closes (`forget`).
- Without worker processes (data.num_workers 0) the same buffers are plain memory and the
  collate returns the guarded tensor directly.

The byte is written by one process and read by the other without a lock: the loader process
only reads it to pick a buffer, and the training process clears it after its last read of
the batch (a finalizer runs after the tensor is gone, so no read of it can follow).
"""
from __future__ import annotations

import math
import os
import uuid
import weakref

import numpy as np
import torch

HEADER = 64  # bytes before the pixels: the busy byte, padded so that pixels stay aligned

# Training process: loader id -> {(pool, index): (whole block as uint8 tensor, busy byte)}.
_received: dict[str, dict[tuple[str, int], tuple[torch.Tensor, np.ndarray]]] = {}


def new_loader_id() -> str:
    """An id for one loader's buffers in the training process (see `forget`)."""
    return uuid.uuid4().hex


def shared_block(nbytes: int) -> torch.Tensor:
    """uint8 tensor of nbytes, in shared memory inside a loader worker (as torch's collate
    allocates), plain memory in the training process itself."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).new(storage)


class Buffer:
    """One reusable batch buffer of a loader process."""

    def __init__(self, pool: "BufferPool", index: int) -> None:
        self.pool, self.key = pool, (pool.uid, index)
        self.shape = pool.shape
        self.block = shared_block(HEADER + math.prod(pool.shape))
        self.busy = self.block[:1].numpy()       # the header byte, shared with the trainer
        self.pixels = self.block[HEADER:].view(pool.shape)
        self.sent = False                        # has the block crossed once already

    def release(self) -> None:
        """Free again without a hand-over (its batch was stacked elsewhere or never ended)."""
        self.busy[0] = 0


class BufferPool:
    """The buffers of one loader process for batches of `shape` (uint8)."""

    def __init__(self, loader_id: str, shape: tuple[int, ...]) -> None:
        self.loader_id, self.shape = loader_id, tuple(shape)
        self.pid = os.getpid()        # a pool serves the process that made it (not a fork)
        self.uid = uuid.uuid4().hex   # keys differ across worker processes and restarts
        self.buffers: list[Buffer] = []

    def take(self) -> Buffer:
        for buffer in self.buffers:
            if buffer.busy[0] == 0:
                break
        else:
            buffer = Buffer(self, len(self.buffers))
            self.buffers.append(buffer)
        buffer.busy[0] = 1
        return buffer


def handoff(buffer: Buffer):
    """What the collate returns for a batch that fills `buffer`: inside a loader worker a
    picklable `_Handoff` that becomes the guarded tensor in the training process; without
    workers the guarded tensor itself."""
    if torch.utils.data.get_worker_info() is None:
        return _guarded(buffer.block, buffer.busy, buffer.shape)
    block = None if buffer.sent else buffer.block
    buffer.sent = True
    return _Handoff(buffer.pool.loader_id, buffer.key, block, buffer.shape)


class _Handoff:
    def __init__(self, loader_id: str, key: tuple[str, int], block: torch.Tensor | None,
                 shape: tuple[int, ...]) -> None:
        self.args = (loader_id, key, block, shape)

    def __reduce__(self):
        return _receive, self.args


def _receive(loader_id: str, key: tuple[str, int], block: torch.Tensor | None,
             shape: tuple[int, ...]) -> torch.Tensor:
    """Unpickling in the training process: the batch's pixels as a guarded tensor."""
    blocks = _received.setdefault(loader_id, {})
    if block is not None:
        blocks[key] = (block, block[:1].numpy())
    block, busy = blocks[key]
    return _guarded(block, busy, shape)


def _guarded(block: torch.Tensor, busy: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """The pixels of `block` as a tensor that frees the buffer (clears `busy`) when the last
    tensor or view of it is gone: torch.from_numpy keeps its array alive exactly that long."""
    holder = block.numpy()   # a new array object per batch, watched by the finalizer
    weakref.finalize(holder, _clear, busy)
    return torch.from_numpy(holder[HEADER:]).view(shape)


def _clear(busy: np.ndarray) -> None:
    busy[0] = 0


def forget(loader_id: str) -> None:
    """The training process's mappings of a closed loader's buffers (batches still held keep
    their own memory alive)."""
    _received.pop(loader_id, None)
