"""Lifetime of mosaicml-streaming's shared-memory blocks in our processes.

Streaming (0.13) registers every `SharedMemory` it opens with `atexit`, which keeps the
object, its file descriptor and its mapping alive until the process exits. Each new
StreamingDataset first probes every existing block prefix on the node (live or left behind
by killed processes), and each probe is such an object, so a process that builds loaders
repeatedly, or runs on a node with many stale prefixes, collects descriptors until it hits
`EMFILE` ("Too many open files"; streaming issue #457). Blocks of processes that die without
running `atexit` (SIGKILL, Ray tearing down its workers) stay in /dev/shm and make every
later probe longer.

`install()` changes two things, nothing else:
- a block whose Python object is no longer referenced is closed by the garbage collector
  (the builtin SharedMemory's own finaliser), instead of being held until exit; the block's
  *name* stays until exit, exactly as before, so other processes attaching by name (the
  loader workers reading the resume state) are not affected;
- names this process created are unlinked at its exit (what streaming's handler did).

`release(dataset)` is the explicit end of one dataset: the loaders' `close()` calls it, so
a run that ends normally leaves nothing in /dev/shm even when its process is then killed.

`install()` also makes the choice of a dataset's block prefix one at a time on the node
(`_one_registration_at_a_time`). Streaming has every rank scan /dev/shm for the lowest
free prefix, then the node's leader creates it: two jobs starting together on one machine
could pick the same one, and one then failed (`FileExistsError: '/00NNNN_locals'`) or its
other ranks waited on the other job's block. Our leaders now hold a node-wide lock from
before their ranks scan until the block exists.
"""
from __future__ import annotations

import atexit
import fcntl
import functools
import os
import tempfile
from multiprocessing.shared_memory import SharedMemory as _Block

import streaming.base.dataset as _streaming_dataset
from streaming.base.shared.memory import SharedMemory

# name -> pid of the process that created it (forked loader workers inherit this table; only
# the creating process unlinks).
_created: dict[str, int] = {}


def install() -> None:
    """Patch streaming's SharedMemory once per process (idempotent)."""
    if getattr(SharedMemory, "_tubevit_weak_cleanup", False):
        return
    original = SharedMemory.__init__

    @functools.wraps(original)
    def __init__(self, name=None, create=None, size=0, auto_cleanup=True):
        original(self, name, create, size, auto_cleanup=False)
        if auto_cleanup:
            for block in self.created_shms:
                _created[block.name] = os.getpid()

    SharedMemory.__init__ = __init__
    SharedMemory._tubevit_weak_cleanup = True
    atexit.register(_unlink_created)
    _streaming_dataset.get_shm_prefix = _one_registration_at_a_time(
        _streaming_dataset.get_shm_prefix)


# Beside the blocks it orders: /dev/shm is what every process of the node shares.
PREFIX_LOCK = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                           "tubevit-streaming-prefix.lock")


def _one_registration_at_a_time(get_shm_prefix):
    """streaming's get_shm_prefix, with the node's leader holding PREFIX_LOCK from before any
    of its ranks scans for a free prefix until its block is created (the call returns after
    streaming's own barrier that follows the creation). The other ranks of the node start
    scanning once the leader holds the lock (one more barrier), so all agree on the prefix."""
    import torch.distributed as dist

    @functools.wraps(get_shm_prefix)
    def registered(streams_local, streams_remote, world, *args, **kwargs):
        lock = None
        if world.is_local_leader:
            # read-only: another user's processes can open (and lock) the file one user made
            lock = os.open(PREFIX_LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            return get_shm_prefix(streams_local, streams_remote, world, *args, **kwargs)
        finally:
            if lock is not None:
                os.close(lock)   # releases the lock
    return registered


def _unlink_created() -> None:
    me = os.getpid()
    for name, pid in list(_created.items()):
        if pid == me:
            _unlink(name)


def _unlink(name: str) -> None:
    _created.pop(name, None)
    try:
        block = _Block(name, create=False)
    except (FileNotFoundError, OSError):
        return
    try:
        block.close()
        block.unlink()
    except (FileNotFoundError, OSError, BufferError):
        pass


def _held_by(dataset) -> list[SharedMemory]:
    """The SharedMemory wrappers a StreamingDataset keeps (directly or in its shared arrays,
    scalars and barrier)."""
    held = []
    for value in vars(dataset).values():
        for obj in (value, getattr(value, "arr", None), getattr(value, "_arr", None)):
            shm = obj if isinstance(obj, SharedMemory) else getattr(obj, "shm", None)
            if isinstance(shm, SharedMemory) and shm not in held:
                held.append(shm)
    return held


def release(dataset) -> None:
    """Close this process's handles on `dataset`'s blocks and unlink the ones it created.

    Call it when the dataset is done on this process (all ranks of the node are finished
    with it); it is safe to call twice."""
    iteration = getattr(dataset, "_iterator", None)
    if iteration is not None:   # an epoch read in this process: its threads use the blocks
        iteration.exit()
    for shm in _held_by(dataset):
        for block in shm.opened_shms + shm.created_shms:
            _close(block)
    # Every block this process made under the dataset's prefix, including ones whose objects
    # are gone (each epoch start replaces the resume-state block's object).
    prefix = getattr(dataset, "_shm_prefix_int", None)
    if prefix is not None:
        me = os.getpid()
        for name, pid in list(_created.items()):
            if pid == me and name.lstrip("/").startswith(f"{prefix:06}_"):
                _unlink(name)


def _close(block: _Block) -> None:
    try:
        block.close()
    except BufferError:  # a numpy view still exports the buffer; the GC closes it later
        pass
