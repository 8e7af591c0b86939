"""Bringing a committed checkpoint back: download, verify, reshard if needed, load.

A checkpoint on the local disk is loaded where it is (checked against its manifest, not
copied); a remote one is downloaded, hashed on the way: into memory for the files only this
rank reads, to the staging folder for the others. While the rest downloads, each file that
is in and verified is already read for the engine (`Prefetch`: weights_only; tensors are
views into the downloaded bytes or into the memory-mapped file), so what is left once the
last byte is in is mostly the copies into the model and optimizer.
Same world size and ZeRO stage as saved -> DeepSpeed's native load. Anything else (2 ranks
-> 1, stage 2 -> 3, ...) -> the checkpoint is converted to DeepSpeed's universal format
(`deepspeed.checkpoint.ds_to_universal`) in the local staging folder and loaded with the
engine's universal-checkpoint switch on; no manual step for the user.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from pretrain import storage
from pretrain.errors import UserError
from pretrain.process_env import cpu_tool_env

from . import safe_load
from .discovery import CheckpointInfo, inspect
from .integrity import Digests
from .layout import MANIFEST, Manifest

log = logging.getLogger("checkpoints")

# Regularisation settings do not change the parameters: resuming with another value is fine.
NON_STRUCTURAL_KEYS = ("drop_rate", "attn_drop_rate", "drop_path_rate")


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: str,
                     ignore: tuple[str, ...] = NON_STRUCTURAL_KEYS, *, saved_name: str | None = None,
                     current_name: str | None = None) -> None:
    """UserError when the checkpoint's model family differs from this run's (`saved_name`,
    `current_name`: the runs' model.name, see built_from_name; None skips this) or listing
    every differing model-config key (beyond `ignore`).

    Why the family first: ViViT, its factorised variants and TimeSformer share their config
    keys, so a checkpoint of one and a model of another with the same dims differ in a key
    or two that do not say what is wrong (vivit-fsa against vivit: class_token only), or in
    none, and then DeepSpeed's strict load fails later, naming tensors."""
    check_same_family(saved_name, current_name, where)
    if not saved or not current:
        return
    keys = sorted((set(saved) | set(current)) - set(ignore))
    diff = [k for k in keys if saved.get(k) != current.get(k)]
    if diff:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in diff)
        raise UserError(f"checkpoint {where} was saved from a different model and cannot be loaded "
                        f"into this one; differing model config keys: {shown}. Resume with the "
                        "checkpoint's model settings, or point checkpoint.uri at a fresh folder "
                        "to start a new run.")


def run_model_name(run_config: dict[str, Any] | None) -> str | None:
    """model.name of a run config as manifests store it (Manifest.config); None in manifests
    written before they held it."""
    return ((run_config or {}).get("model") or {}).get("name")


def built_from_name(run_config: dict[str, Any] | None) -> str | None:
    """The model.name a run config builds its model from: None when it has none, or when its
    model comes from a file (model.init_from, bootstrap.init_from), whose architecture is the
    file's whatever model.name says (pretrain/train/worker.py build_model)."""
    run_config = run_config or {}
    if ((run_config.get("model") or {}).get("init_from")
            or (run_config.get("bootstrap") or {}).get("init_from")):
        return None
    return run_model_name(run_config)


def check_same_family(saved_name: str | None, current_name: str | None, where: str) -> None:
    """UserError when the model names of checkpoint `where` and of this run belong to
    different families (the registry's: vivit-s and vivit-b are one family, vivit and
    vivit-fsa two). Skipped when either name is None or no family registers it (an older
    manifest), since then only the architecture keys can be compared."""
    from pretrain.model.registry import family_named   # torch and the models: only when asked

    saved, current = family_named(saved_name), family_named(current_name)
    if saved is None or current is None or saved.key == current.key:
        return
    raise UserError(f"checkpoint {where} was saved from a {saved.key} model (model.name={saved_name}) "
                    f"and this run builds a {current.key} model (model.name={current_name}); a "
                    "checkpoint loads only into its own family's layers. Resume with model.name="
                    f"{saved_name} (or another {saved.key} size with the checkpoint's dims: "
                    f"{', '.join(saved.sizes)}), or point checkpoint.uri at a fresh folder to start "
                    "a new run.")


class CheckpointDamaged(UserError):
    """A committed checkpoint whose files no longer match its manifest."""


def fetch(info: CheckpointInfo, dest_root: str, verify_checksums: bool = True,
          threads: int = 8, retries: int = 5, prefetch: Prefetch | None = None) -> str:
    """A local folder holding the files of `info`, checked against its manifest: the
    checkpoint's own folder when it is on the local disk (no copy), else a download into
    dest_root, whose verified files are handed to `prefetch` as they complete (those it
    keeps in memory are only placeholders in the folder). Raises CheckpointDamaged when a
    file does not match."""
    fs, src = storage.filesystem(info.uri)
    if not storage.is_local(fs):
        return download(info, dest_root, verify_checksums, threads, retries,
                        ready=prefetch.ready if prefetch is not None else None,
                        in_memory=prefetch.in_memory if prefetch is not None else None)
    fs.invalidate_cache()
    checked = inspect(fs, src, "checksum" if verify_checksums else "size")
    if not checked.loadable:
        raise CheckpointDamaged(f"checkpoint {info.uri} is damaged: {'; '.join(checked.problems)}")
    return src


RANGE_BYTES = 16 << 20   # one request's share of a large file (parallel streams)
PAGE = 4096


def _engine_file(rel: str) -> bool:
    """A file DeepSpeed's load reads: the .pt files at the top of the step folder (the run
    state lives in run_state/)."""
    return rel.endswith(".pt") and "/" not in rel


def _read_order(rel: str) -> tuple[int, str]:
    """Download order: DeepSpeed's load reads the model states before the optimizer shards,
    so those come first and are read while the shards still download."""
    engine_file = _engine_file(rel)
    return (0 if engine_file and "model_states" in rel else 1 if engine_file else 2, rel)


class Prefetch:
    """The files one rank's engine will load, read as soon as the download verified them.

    A download worker that completes a file calls `ready`; if this rank's engine reads it,
    the worker loads it there and then (weights_only, as the engine would), then goes back
    to downloading. Later, `load_into_engine` serves these objects instead of reading the
    files, so the unpickling overlaps the rest of the download instead of following it.
    Every object here comes from a file that matched its manifest digest before it was
    opened.

    Where no other process on this node reads a file (`in_memory`: this rank's own ZeRO
    shards, or every file when this rank is alone on its node), the download keeps it in
    memory instead of writing it to the staging disk, and its tensors are views into the
    downloaded bytes (safe_load.load_buffer): on the 2-core machine writing tubevit-s's
    378 MB into the page cache and mapping it back cost more CPU than the raw read itself.
    The others are written and memory-mapped, their pages mapped in here.
    """

    def __init__(self, rank: int, local_world_size: int | None = None):
        self.rank = rank
        self.local_world_size = local_world_size   # None: unknown, assume other ranks here
        self._loaded: dict[str, Any] = {}

    def _own_shard(self, rel: str) -> int | None:
        owner = re.search(r"zero_pp_rank_(\d+)_", rel)
        return None if owner is None else int(owner.group(1))

    def wants(self, rel: str) -> bool:
        """DeepSpeed's files in the step folder, except other ranks' ZeRO shards."""
        if not _engine_file(rel):
            return False
        owner = self._own_shard(rel)
        return owner is None or owner == self.rank

    def in_memory(self, rel: str) -> bool:
        """A file only this rank reads: downloaded into memory, never written to disk."""
        return self.wants(rel) and (self.local_world_size == 1 or self._own_shard(rel) == self.rank)

    def ready(self, rel: str, path: str, buffer=None) -> None:
        """`buffer`: the file's bytes when the download kept it in memory (a uint8 tensor)."""
        if not self.wants(rel):
            return
        if buffer is not None:
            self._loaded[rel] = safe_load.load_buffer(buffer, f"{rel} of the checkpoint")
        else:
            state = safe_load.load(path, mmap=True)   # a refused file: UserError naming it
            _map_in(state, set())
            self._loaded[rel] = state

    def get(self, rel: str) -> Any | None:
        return self._loaded.get(rel)

    def clear(self) -> None:
        self._loaded.clear()


def _map_in(obj: Any, seen: set[int]) -> None:
    """Fault in the pages of the memory-mapped tensors in `obj` (one byte read per page), so
    the copies into the engine later do not stop on a page fault every 4 KiB."""
    import torch

    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            torch.empty(0, dtype=torch.uint8).set_(storage)[::PAGE].sum()
    elif isinstance(obj, dict):
        for value in obj.values():
            _map_in(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _map_in(value, seen)


class _InOrderDigest:
    """The digest of one file whose byte ranges arrive in any order (parallel streams): a
    range is hashed as soon as every range before it is in, so hashing runs while the rest
    downloads and nothing is read back. A range that came early waits in memory; `hashed`
    is called with each range once it is hashed (it frees the range's slot)."""

    def __init__(self, digests: Digests | None, hashed: Callable[[], None], size: int):
        self.digests = digests      # None: no checksum wanted, only the order is kept
        self.hashed = hashed
        self.size = size
        self._next = 0
        self._early: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def add(self, start: int, data: bytes) -> bool:
        """True for the one call after which every byte of the file is hashed."""
        with self._lock:
            done_before = self._next >= self.size
            self._early[start] = data
            while self._next in self._early:
                chunk = self._early.pop(self._next)
                if self.digests is not None:
                    self.digests.update(chunk)
                self._next += len(chunk)
                self.hashed()
            return not done_before and self._next >= self.size


def download(info: CheckpointInfo, dest_root: str, verify_checksums: bool = True,
             threads: int = 8, retries: int = 5,
             ready: Callable[..., None] | None = None,
             in_memory: Callable[[str], bool] | None = None) -> str:
    """Copy the manifest's files of `info` to dest_root/<step folder>; returns that folder.

    Every file is fetched as byte ranges of RANGE_BYTES, all files' ranges in parallel (one
    stream per object is what limits a single reader on a real object store), each written
    at its offset and hashed on arrival, in file order (_InOrderDigest): the checksum the
    manifest will be compared with (crc32c; sha256 for format-1 manifests) is ready when the
    last byte is in, with no second pass over the files. At most 2 x `threads` ranges are
    in memory (fetched, not yet hashed). Everything lands in a temporary folder renamed into
    place only when every file matches, so a reader never sees a partial download.

    Files go in the order the engine reads them (model states first: `_read_order`), and
    `ready(name, path, buffer)` is called for each file once all of it is in and it matched
    its manifest (path: inside the temporary folder; the file keeps its inode through the
    rename), so its reading can start while the rest downloads. A file for which
    `in_memory(name)` is true is downloaded into a uint8 tensor (`buffer`; None for the
    others) and left on disk as an empty placeholder, which DeepSpeed's checks for the
    files' existence find and nothing reads (an empty file fails to load, it never loads as
    zeros); such a download writes no manifest into the folder, so it is never taken for a
    complete copy of the checkpoint.
    """
    manifest = info.manifest
    assert manifest is not None, "download needs a committed checkpoint"
    fs, src = storage.filesystem(info.uri)
    name = src.rsplit("/", 1)[-1]
    final = os.path.join(dest_root, name)
    if os.path.isfile(os.path.join(final, MANIFEST)):
        with open(os.path.join(final, MANIFEST), "rb") as f:
            if Manifest.from_json(f.read()).attempt == manifest.attempt:
                return final  # already here (another rank on this node fetched it)
    tmp = f"{final}.partial-{uuid.uuid4().hex[:8]}"

    def damaged(rel: str, what: str) -> CheckpointDamaged:
        return CheckpointDamaged(f"checkpoint {info.uri} is damaged: {rel} {what}")

    # Submitted in file order, each range takes a slot first and gives it back once hashed.
    # So the earliest range not yet hashed always holds a slot (it was submitted before the
    # ones waiting for it): the ranges in memory stay bounded and never wait on each other.
    slots = threading.Semaphore(2 * threads)
    hashers: dict[str, _InOrderDigest] = {}
    order = sorted(manifest.files, key=_read_order)
    for rel in order:
        rec = manifest.files[rel]
        wanted = Digests(sha256=not rec.crc32c, crc32c=bool(rec.crc32c)) if verify_checksums else None
        hashers[rel] = _InOrderDigest(wanted, slots.release, rec.size)

    buffers: dict[str, Any] = {}      # name -> uint8 tensor: the files kept in memory

    def fetch_range(rel: str, start: int, end: int) -> None:
        data = storage.with_retries(f"downloading {rel}",
                                    lambda: fs.cat_file(storage.join(src, rel), start=start, end=end),
                                    retries)
        if len(data) != end - start:
            raise damaged(rel, f"is shorter than the {manifest.files[rel].size} bytes its "
                               "manifest says")
        path = os.path.join(tmp, rel)
        if rel in buffers:
            # a copy that lets go of the GIL (a memoryview's would hold it ~5 ms per range,
            # stalling the HTTP client's event loop)
            ctypes.memmove(buffers[rel].data_ptr() + start, data, len(data))
        else:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, start)
            finally:
                os.close(fd)
        if hashers[rel].add(start, data):
            check(rel, manifest.files[rel])
            if ready is not None:
                ready(rel, path, buffers.get(rel))

    def check(rel: str, rec) -> None:
        size = buffers[rel].numel() if rel in buffers else os.path.getsize(os.path.join(tmp, rel))
        if size != rec.size:
            raise damaged(rel, f"has {size} bytes, its manifest says {rec.size}")
        d = hashers[rel].digests
        if d is None:
            return
        if rec.crc32c and d.crc32c != rec.crc32c:
            raise damaged(rel, "fails its crc32c checksum (content changed)")
        if not rec.crc32c and d.sha256 != rec.sha256:
            raise damaged(rel, "fails its sha256 checksum (content changed)")

    tasks = []
    for rel in order:
        rec = manifest.files[rel]
        path = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            if in_memory is not None and rec.size and in_memory(rel):
                import torch

                buffers[rel] = torch.empty(rec.size, dtype=torch.uint8)
            else:
                f.truncate(rec.size)
        tasks += [(rel, start, min(rec.size, start + RANGE_BYTES))
                  for start in range(0, rec.size, RANGE_BYTES)]

    def submit_all(pool: ThreadPoolExecutor) -> list:
        futures = []
        for task in tasks:
            while not slots.acquire(timeout=0.1):
                # a failed range is never hashed, so the ranges after it keep their slots:
                # stop submitting rather than wait for a slot forever
                if any(f.done() and f.exception() for f in futures):
                    return futures
            futures.append(pool.submit(fetch_range, *task))
        return futures

    try:
        with ThreadPoolExecutor(threads) as pool:
            for future in submit_all(pool):
                future.result()
        for rel, rec in manifest.files.items():
            if rec.size == 0:     # no range was fetched, so nothing checked it on arrival
                check(rel, rec)
                if ready is not None:
                    ready(rel, os.path.join(tmp, rel), None)
        if not buffers:
            with open(os.path.join(tmp, MANIFEST), "wb") as f:
                f.write(manifest.to_json())
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def needs_conversion(manifest: Manifest, world_size: int, zero_stage: int) -> bool:
    if manifest.zero_stage != zero_stage:
        return True
    # Stage-0 fp32 state is replicated in mp_rank_00 and loads on any world size; anything
    # partitioned (ZeRO, bf16 optimizer shards) is tied to the saved world size.
    return manifest.world_size != world_size and any("optim_states" in n for n in manifest.files)


def convert_to_universal(folder: str, dest_root: str, workers: int = 2) -> tuple[str, str]:
    """DeepSpeed universal checkpoint of `folder`; returns (load_dir, tag) for load_checkpoint."""
    tag = os.path.basename(folder.rstrip("/"))
    if not any("optim_states" in f for f in os.listdir(folder)):
        raise UserError(f"checkpoint {tag} holds no ZeRO optimizer shards (saved with ZeRO stage 0 "
                        "in fp32), so it cannot be resharded to another ZeRO stage; resume with "
                        "train.zero_stage=0")
    final = os.path.join(dest_root, f"universal-{tag}")
    if os.path.isdir(os.path.join(final, tag, "zero")):
        return final, tag
    tmp = os.path.join(dest_root, f"universal-{tag}.partial-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    # DeepSpeed's converter, with every torch.load it makes weights_only (checkpoints.safe_load).
    cmd = [sys.executable, "-c", safe_load.TOOL_BOOTSTRAP, "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", folder,
           "--output_folder", os.path.join(tmp, tag), "--inject_missing_state",
           "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    try:
        env = {**cpu_tool_env(), safe_load.FORCE_ENV: "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_project_root(), env.get("PYTHONPATH")) if p)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {folder} to DeepSpeed's universal format failed "
                               f"(exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        out = os.path.join(tmp, tag)
        # DeepSpeed looks for mp_rank_XX_model_states.pt (ZeRO 0-2) or
        # zero_pp_rank_0_mp_rank_XX_model_states.pt (ZeRO-3) next to zero/; the universal
        # load reads only step counters, scheduler and client state from it, which both
        # layouts share, so provide both names.
        z3 = os.path.join(out, "zero_pp_rank_0_mp_rank_00_model_states.pt")
        z12 = os.path.join(out, "mp_rank_00_model_states.pt")
        if os.path.isfile(z3) and not os.path.isfile(z12):   # a ZeRO-3 source
            _bridge_param_states(os.path.join(out, "zero"))
            os.link(z3, z12)
        elif os.path.isfile(z12) and not os.path.isfile(z3):
            os.link(z12, z3)
        _bridge_optimizer_state(os.path.join(out, "zero"))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, tag


def _bridge_param_states(zero: str) -> None:
    """Wrap each parameter's fp32 / exp_avg / exp_avg_sq file of a ZeRO-3 source in the dict
    that the ZeRO-1/2 universal loader reads.

    From ZeRO-3 shards ds_to_universal (merge_zero3_slices) saves every state as a bare flat
    tensor, while the ZeRO-1/2 loader (universal_checkpoint.load_hp_checkpoint_state) reads
    `ckpt["param"]`: on a 1-dim tensor an IndexError (too many indices), so a ZeRO-3
    checkpoint could not resume at ZeRO-1/2. The ZeRO-3 loader reads either form, so the dict
    serves both. The tensor stays flat (exactly the parameter's elements, padding removed):
    without tensor parallelism the ZeRO-1/2 loader flattens it anyway.
    """
    import torch
    from deepspeed.checkpoint.constants import PARAM

    for name in os.listdir(zero):
        folder = os.path.join(zero, name)
        if not os.path.isdir(folder):
            continue
        for file in os.listdir(folder):
            path = os.path.join(folder, file)
            if file == "step.pt" or not file.endswith(".pt"):
                continue
            state = safe_load.load(path)
            if torch.is_tensor(state):
                torch.save({PARAM: state}, path)


def _bridge_optimizer_state(zero: str) -> None:
    """Make zero/optimizer_state.pt and the per-parameter step files readable by both the
    ZeRO-1/2 and the ZeRO-3 universal loaders.

    ds_to_universal writes what the *source* stage's loader expects: from ZeRO-1/2 a flat
    dict with `param_groups` and a step file per parameter; from ZeRO-3 the torch optimizer
    state dict nested under `optimizer_state_dict` (step inside) and no step files. Loading
    into the other stage (2 -> 3, 3 -> 2) needs the other shape, so both are provided.
    """
    import deepspeed
    import torch

    path = os.path.join(zero, "optimizer_state.pt")
    sd = safe_load.load(path)
    params = sorted(d for d in os.listdir(zero) if os.path.isdir(os.path.join(zero, d)))
    step = None
    inner = sd.get("optimizer_state_dict")
    if isinstance(inner, dict) and inner.get("state"):
        step = next(iter(inner["state"].values())).get("step")
    for name in params:
        f = os.path.join(zero, name, "step.pt")
        if step is None and os.path.isfile(f):
            step = safe_load.load(f)
    if "optimizer_state_dict" not in sd:
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}},
                                      "param_groups": sd.get("param_groups", [])}
    if "param_groups" not in sd:
        sd["param_groups"] = sd["optimizer_state_dict"].get("param_groups", [])
    sd.setdefault("ds_version", deepspeed.__version__)
    torch.save(sd, path)
    if step is not None:
        for name in params:
            f = os.path.join(zero, name, "step.pt")
            if not os.path.isfile(f):
                torch.save(step, f)


def load_into_engine(engine, load_dir: str, tag: str, universal: bool,
                     prefetch: Prefetch | None = None) -> None:
    """engine.load_checkpoint with DeepSpeed's universal switch set for this one load; the
    files `prefetch` already read (see fetch) are taken from it, the others from disk.

    The load runs on one torch thread: what it does is copy memory-bound tensors into the
    model and optimizer, which a second thread barely speeds up, while on shared cores
    OpenMP threads spin waiting for a descheduled partner (on the 2-core machine at load
    10: 0.08-0.14 s on one thread, 0.7-1.0 s on two, for tubevit-s's 378 MB)."""
    import torch

    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = universal
    folder = os.path.join(load_dir, tag)
    prefetched = None if prefetch is None else (
        lambda path: prefetch.get(os.path.relpath(path, folder)))
    reader = safe_load.MmapCheckpointEngine(engine.checkpoint_engine, prefetched)
    engine.checkpoint_engine = reader
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with safe_load.weights_only_loads(), safe_load.refused_as_user_error(
                f"a DeepSpeed file of checkpoint {folder}"):
            path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    finally:
        torch.set_num_threads(threads)
        engine.checkpoint_engine = reader.inner
        config.load_universal_checkpoint = before
        if prefetch is not None:
            prefetch.clear()     # the engine holds its own copies now
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint files in {os.path.join(load_dir, tag)}")


def _project_root() -> str:
    """The folder holding the `checkpoints` package (for the converter's child process)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
