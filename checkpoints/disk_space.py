"""Will the next checkpoint fit on the staging disk? Asked before a save writes anything.

Why before, not after: DeepSpeed's save is collective. A rank whose `torch.save` runs out of
space raises out of the middle of `engine.save_checkpoint` (torch says only "[enforce fail
at inline_container.cc] unexpected pos") and skips the barriers the other ranks then wait
in, so catching it afterwards is too late: the ranks hang. So every rank measures, the
ranks exchange what they measured (`Room`, one all-gather) and each computes the same
verdict from the same list: all save, or all stop, before any byte is written.

What a rank needs: the size of its files in its previous save (they differ between saves
only by a few bytes of run state), or for the first save the bytes of the tensors its
DeepSpeed save will write (`state_bytes`); plus MARGIN for serialisation overhead. Ranks
staging on the same disk of the same host add up (two ranks on one node share one
`checkpoint.local_dir`).

Why a full disk stops the run rather than skipping the save: the check waits first for
the checkpoints still uploading (their staged files are removed once uploaded), so
a disk that is still too small holds nothing of ours that will go away; every later save
would be refused the same way, and a run that trains on without checkpoints loses all that
work at the next crash (issue 14 item 3's reason for `max_failed_uploads`). Stopping before
writing leaves every committed checkpoint as it was, and the run resumes from the newest
once there is room.

A full disk can still slip past the check: something else fills it during the save, or an
in-memory snapshot of the previous save (checkpoint.snapshot_in_memory) is still being
written in the background, so its bytes were not on the disk yet when it was measured.
`is_disk_full` recognises torch's error for it as well as ENOSPC, so the places that can
catch it safely report it with `full_disk_message` like the check does: the guarded
DeepSpeed writer (checkpoints.snapshot; the save stops on every rank) and the background
upload (a failed upload, counted towards checkpoint.max_failed_uploads).
"""
from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import Any

MARGIN = 1.10            # torch.save's zip headers and alignment, run state that grows
MARGIN_BYTES = 1 << 20   # and a floor for tiny states


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (dicts, lists, tuples)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def state_bytes(engine) -> int:
    """Bytes of the tensors this rank's `engine.save_checkpoint` writes: the module's state
    on the ranks that write the model-states file, and this rank's optimizer partition
    (ZeRO: the fp32 master partition and its moments; no ZeRO: the optimizer state, saved
    in the model-states file). Used for the first save, before any file was measured. Adam
    makes its moments at its first step, so a save before any step is estimated without
    them (a run saves after `checkpoint.every_steps` steps)."""
    total = 0
    writes_module = getattr(engine, "save_non_zero_checkpoint", True)
    writes_zero = getattr(engine, "save_zero_checkpoint", False)
    if writes_module:
        total += tensor_bytes(engine.module.state_dict())
    optimizer = getattr(engine, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)   # DeepSpeed's ZeRO wraps the torch one
    if inner is not None and (writes_zero or writes_module):
        total += tensor_bytes(list(getattr(inner, "state", {}).values()))
        if writes_zero:   # ZeRO saves its flat fp32 partitions; without ZeRO they are the module's
            total += sum(tensor_bytes(g["params"]) for g in getattr(inner, "param_groups", []))
    return total


def needed_bytes(expected: int) -> int:
    return int(expected * MARGIN) + MARGIN_BYTES


def existing_parent(folder: str) -> str:
    """`folder`, or its nearest ancestor that exists (a staging folder is made at the save)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(folder: str) -> int:
    st = os.statvfs(existing_parent(folder))
    return st.f_bavail * st.f_frsize


@dataclass
class Room:
    """One rank's view of its staging disk before a save."""
    rank: int
    host: str
    device: int          # st_dev of the staging folder: ranks on one disk share its space
    folder: str
    free: int
    need: int

    @classmethod
    def measure(cls, rank: int, folder: str, need: int) -> "Room":
        return cls(rank, socket.gethostname(), os.stat(existing_parent(folder)).st_dev, folder,
                   free_bytes(folder), need)


def shortfall(rooms: list[Room]) -> tuple[list[Room], int, int] | None:
    """The first disk (by lowest rank) whose ranks together need more than it has free:
    (its ranks' rooms, free bytes, bytes needed); None when every disk has room. Every rank
    computes this from the same gathered list, so all reach the same verdict."""
    disks: dict[tuple[str, int], list[Room]] = {}
    for room in sorted(rooms, key=lambda r: r.rank):
        disks.setdefault((room.host, room.device), []).append(room)
    for ranks in disks.values():
        need = sum(r.need for r in ranks)
        free = min(r.free for r in ranks)
        if need > free:
            return ranks, free, need
    return None


def human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def full_disk_message(folder: str, free: int, need: int | None, *, setting: str,
                      ranks: list[int] | None = None, host: str | None = None) -> str:
    """The staging disk is too small: where, how much is free and needed, what would work.
    `setting`: the config key that places `folder` (checkpoint.local_dir, or checkpoint.uri
    when a local checkpoint stages inside its own folder). `need` None: the disk filled up
    during a write, so what the save needed is not known."""
    if need is None:
        return (f"the staging folder {folder} ({setting}) has {human(free)} free after the disk "
                f"filled up while writing. Free space on that disk, or point {setting} at a "
                "bigger one; checkpoints still uploading stay staged there until uploaded "
                "(checkpoint.max_uploads_in_flight=1 keeps at most one)")
    who = ""
    if ranks:
        who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        who += f" on host {host}: " if host else ": "
    return (f"the staging folder {folder} ({setting}) has {human(free)} free and this save "
            f"needs about {human(need)} there ({who}each rank's files of its previous save, or "
            f"its state's tensors for the first one, plus {round((MARGIN - 1) * 100)}% and "
            f"{human(MARGIN_BYTES)}). Free space on that disk, or point {setting} at a disk with "
            f"at least {human(need)} free")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, or torch's report of a short write while serialising (PyTorchStreamWriter
    says "unexpected pos" when the file stopped growing: a full disk or a quota)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("unexpected pos" in text
                                              or "No space left on device" in text)
