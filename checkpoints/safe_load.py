"""Reading checkpoint files back without running code from them.

A pickle can name any importable callable, so `torch.load(weights_only=False)` on a file
from a bucket runs whatever its writer wanted. Everything the project reads back goes
through `torch.load(weights_only=True)`, which rebuilds tensors, containers and plain
values only, plus the few classes listed here:

- DeepSpeed's own checkpoint files hold three small classes besides tensors (a ZeRO stage
  enum, the loss-scaler settings, the addresses of parameter fragments);
- run-state files written before this module (checkpoint format 1) hold numpy's RNG state
  as a numpy array; new ones store it as a tensor.

DeepSpeed's engine reads its files through its checkpoint engine, swapped during a load
for `MmapCheckpointEngine` (weights_only, memory-mapped: tensors are copied once, into the
model and optimizer, not first into a loaded copy). Its other loaders call
`torch.load(..., weights_only=False)` themselves; inside
`weights_only_loads()` the environment variable TORCH_FORCE_WEIGHTS_ONLY_LOAD makes torch
treat every such call as weights_only=True, with this allow-list. The universal-format
conversion runs in a child process under the same rule (`TOOL_BOOTSTRAP`).
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import threading
from typing import Any, Callable, Iterator

import torch

from pretrain.errors import UserError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def allowed_globals() -> list[Any]:
    """The classes (beyond tensors and plain containers) checkpoint files may name."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        reconstruct = np._core.multiarray._reconstruct
    except AttributeError:   # numpy < 2
        reconstruct = np.core.multiarray._reconstruct
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address,
            reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_installed = False


def allow() -> None:
    """Add the allow-list to torch's process-wide list of safe globals (once). Not a
    `torch.serialization.safe_globals` block: nested blocks remove the list on the inner
    exit, and these classes are safe to allow for every weights_only load anyway."""
    global _installed
    if not _installed:
        torch.serialization.add_safe_globals(allowed_globals())
        _installed = True


def load(path: str, **kwargs) -> Any:
    """torch.load of a checkpoint file with weights_only=True and the allow-list."""
    kwargs.setdefault("map_location", "cpu")
    allow()
    with refused_as_user_error(path):
        return torch.load(path, weights_only=True, **kwargs)


def load_buffer(buffer: torch.Tensor, what: str) -> Any:
    """`load` of a checkpoint file held in memory as a uint8 tensor (a download that never
    went to disk, checkpoints.restore), its tensors views into `buffer`: no copy.

    torch.load(mmap=True) makes a file's tensors views into one storage mapped from the file
    (torch.serialization._load's `overall_storage`); this hands that same private function
    the buffer's storage instead, with the same weights_only unpickler and allow-list. A
    file-like object given to torch.load instead would copy every tensor out of it."""
    allow()
    reader = torch._C.PyTorchFileReader(_MemoryFile(memoryview(buffer.numpy()).cast("B")))
    with refused_as_user_error(what):
        return torch.serialization._load(reader, "cpu", torch._weights_only_unpickler,
                                         overall_storage=buffer.untyped_storage(),
                                         weights_only=True)


class _MemoryFile(io.RawIOBase):
    """A read-only file over a memoryview: what torch's zip reader reads the headers and
    the pickle through (the tensors' bytes are not read through it, see load_buffer)."""

    def __init__(self, view: memoryview):
        self.view, self.pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.view)}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), len(self.view) - self.pos))
        b[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n


@contextlib.contextmanager
def refused_as_user_error(what: str) -> Iterator[None]:
    """A file naming a class outside the allow-list is refused in one paragraph."""
    try:
        yield
    except pickle.UnpicklingError as exc:
        # torch's message also advises weights_only=False: keep only what was refused.
        lines = [ln.strip() for ln in str(exc).splitlines()
                 if "GLOBAL" in ln or "Unsupported" in ln or "WeightsUnpickler error" in ln]
        reason = lines[0].split("WeightsUnpickler error:", 1)[-1].strip() if lines else "unpickling refused"
        raise UserError(f"{what} was refused: it asks to run or build something other than "
                        f"tensors and plain data ({reason}). Checkpoint files are loaded as data "
                        "only (README, Trust model); this one was not written by this project "
                        "or was tampered with. Resume from another checkpoint "
                        "(checkpoint.resume_from).") from None


class MmapCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine for one load: files are read with `load` above,
    memory-mapped, unless `prefetched(path)` already holds what that file loads to (read the
    same way, checkpoints.restore.Prefetch); everything else goes to the wrapped engine."""

    def __init__(self, inner, prefetched: Callable[[str], Any | None] | None = None):
        self.inner = inner
        self.prefetched = prefetched

    def load(self, path: str, map_location=None):
        state = self.prefetched(path) if self.prefetched is not None else None
        if state is not None:
            return state
        return load(path, map_location=map_location or "cpu", mmap=True)

    def __getattr__(self, name):
        return getattr(self.inner, name)


_env_lock = threading.Lock()


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load in this process (DeepSpeed's included) is weights_only inside."""
    with _env_lock:
        before = os.environ.get(FORCE_ENV)
        os.environ[FORCE_ENV] = "1"
    allow()
    try:
        yield
    finally:
        with _env_lock:
            if before is None:
                os.environ.pop(FORCE_ENV, None)
            else:
                os.environ[FORCE_ENV] = before


# `python -c TOOL_BOOTSTRAP MODULE ARGS...`: run a tool module (DeepSpeed's
# ds_to_universal) with the allow-list in place; FORCE_ENV=1 must be in its environment.
TOOL_BOOTSTRAP = (
    "import runpy, sys; from checkpoints.safe_load import allow; allow(); "
    "mod = sys.argv[1]; sys.argv = [mod] + sys.argv[2:]; "
    "runpy.run_module(mod, run_name='__main__', alter_sys=True)")
