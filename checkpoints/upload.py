"""Background upload of checkpoints and the commit that makes them visible.

Each rank hands over a local folder (its files for one step) and goes back to training.
A background thread per checkpoint finishes the files (serialising the in-memory snapshot,
hashed while it is written: checkpoints.integrity.HashingWriter), uploads them (a small
thread pool per rank moves files in parallel, each with retries; a local target gets the
staged file renamed into place, no copy), then writes the rank's marker
(markers/rank_R.json: its files, sizes, sha256, crc32c). Rank 0's thread then waits until every
rank's marker of the same attempt is present, checks the files' sizes in storage, and
writes COMMIT.json last. No collective runs here, so training never waits on a slow rank's
upload; at most `max_in_flight` checkpoints are in flight per rank (a further `submit`
waits: back-pressure instead of an ever-growing local staging folder).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from pretrain import storage

from .disk_space import existing_parent, free_bytes, full_disk_message, is_disk_full
from .integrity import Digests, digest_file
from .layout import MANIFEST, FileRecord, Manifest, RankMarker, marker_name, step_dir

log = logging.getLogger("checkpoints")


@dataclass
class UploadJob:
    step: int
    local_folder: str              # this rank's files for the step, relative paths kept
    manifest_fields: dict[str, Any] = field(default_factory=dict)  # rank 0: world_size, ...
    # Finishes the local files in the background; returns the digests of the files it wrote
    # by local path (those are not read again to hash them).
    prepare: Callable[[], dict[str, Digests]] | None = None
    before_commit: Callable[[], None] | None = None  # rank 0: blocks until the commit may go


@dataclass
class UploadStats:
    step: int
    bytes: int = 0
    upload_s: float = 0.0
    commit_wait_s: float = 0.0
    committed: bool = False
    error: str | None = None
    finished: bool = False


class CommitTimeout(RuntimeError):
    pass


class AsyncUploader:
    def __init__(self, uri: str, *, rank: int, world_size: int, attempt: str,
                 max_in_flight: int = 2, retries: int = 5, threads: int = 4,
                 commit_timeout_s: float = 3600.0, keep_local: bool = False,
                 retry_base_delay: float = 0.5,
                 on_commit: Callable[[Manifest, str], None] | None = None):
        fs, self.root = storage.filesystem(uri)
        self.fs = background_filesystem(fs)
        self.rank, self.world_size, self.attempt = rank, world_size, attempt
        self.retries, self.commit_timeout_s = retries, commit_timeout_s
        self.keep_local = keep_local
        self.retry_base_delay = retry_base_delay
        self.on_commit = on_commit
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckpt-file",
                                        initializer=background_priority)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._pending: set[int] = set()
        self._closing = threading.Event()
        self.stats: list[UploadStats] = []

    # -- called from the training thread ------------------------------------------------

    def submit(self, job: UploadJob) -> float:
        """Start uploading job in the background; returns seconds spent waiting for a slot."""
        t0 = time.perf_counter()
        self._slots.acquire()
        waited = time.perf_counter() - t0
        stats = UploadStats(job.step)
        with self._lock:
            self._pending.add(job.step)
            self.stats.append(stats)
            self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=self._run, args=(job, stats), daemon=True,
                                      name=f"ckpt-upload-{job.step}")
            self._threads.append(thread)
        thread.start()
        return waited

    def pending_steps(self) -> set[int]:
        with self._lock:
            return set(self._pending)

    def wait(self, timeout: float | None = None) -> list[UploadStats]:
        """Block until every submitted checkpoint is uploaded (and, on rank 0, committed).

        Returns the stats of checkpoints that failed (empty when all went through)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            return [s for s in self.stats if s.error]

    def failed_in_a_row(self) -> list[UploadStats]:
        """The finished checkpoints that failed after the last one that went through."""
        with self._lock:
            done = sorted((s for s in self.stats if s.finished), key=lambda s: s.step)
        streak: list[UploadStats] = []
        for s in done:
            streak = streak + [s] if s.error else []
        return streak

    def close(self) -> None:
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- background ---------------------------------------------------------------------

    def _run(self, job: UploadJob, stats: UploadStats) -> None:
        background_priority()
        folder = storage.join(self.root, step_dir(job.step))
        try:
            t0 = time.perf_counter()
            known = job.prepare() if job.prepare is not None else {}
            records = self._upload_files(job.local_folder, folder,
                                          {os.path.normpath(k): v for k, v in (known or {}).items()})
            marker = RankMarker(self.rank, job.step, self.attempt, records)
            storage.with_retries(f"writing marker for step {job.step}",
                                 lambda: storage.write_atomic(self.fs, storage.join(folder, marker_name(self.rank)),
                                                              marker.to_json()), self.retries,
                                 self.retry_base_delay)
            stats.bytes = sum(r.size for r in records.values())
            stats.upload_s = time.perf_counter() - t0
            if not self.keep_local:
                shutil.rmtree(job.local_folder, ignore_errors=True)
            if self.rank == 0:
                t1 = time.perf_counter()
                if job.before_commit is not None:
                    job.before_commit()
                manifest = self._commit(job, folder)
                stats.commit_wait_s = time.perf_counter() - t1
                stats.committed = True
                if self.on_commit is not None:
                    self.on_commit(manifest, storage.uri_of(self.fs, folder))
        except BaseException as exc:  # reported by wait(); the checkpoint stays uncommitted
            stats.error = describe_failure(
                exc, job.local_folder, "checkpoint.uri" if storage.is_local(self.fs) else "checkpoint.local_dir")
            log.error("checkpoint step %d (rank %d) was not saved: %s", job.step, self.rank,
                      stats.error)
            # Free the staging disk: a half-written local copy is never used again.
            shutil.rmtree(job.local_folder, ignore_errors=True)
        finally:
            with self._lock:
                self._pending.discard(job.step)
                stats.finished = True
            self._slots.release()

    def _upload_files(self, local_folder: str, folder: str,
                      known: dict[str, Digests]) -> dict[str, FileRecord]:
        names = sorted(os.path.relpath(os.path.join(d, f), local_folder)
                       for d, _, files in os.walk(local_folder) for f in files)

        def one(name: str) -> tuple[str, FileRecord]:
            src = os.path.join(local_folder, name)
            d = known.get(os.path.normpath(src)) or digest_file(src)
            dst = storage.join(folder, name.replace(os.sep, "/"))
            storage.with_retries(f"uploading {dst}", lambda: put(self.fs, src, dst),
                                 self.retries, self.retry_base_delay)
            return name.replace(os.sep, "/"), FileRecord(d.size, d.sha256, self.rank, d.crc32c)

        return dict(self._pool.map(one, names))

    def _commit(self, job: UploadJob, folder: str) -> Manifest:
        """Rank 0: wait for every rank's marker of this attempt, check sizes, write manifest."""
        deadline = time.monotonic() + self.commit_timeout_s
        markers: dict[int, RankMarker] = {}
        delay = 0.05
        while len(markers) < self.world_size:
            self.fs.invalidate_cache(storage.join(folder, "markers"))
            for r in range(self.world_size):
                if r in markers:
                    continue
                try:
                    m = RankMarker.from_json(self.fs.cat_file(storage.join(folder, marker_name(r))))
                except FileNotFoundError:
                    continue
                except Exception as exc:  # a marker being replaced or a transient read error
                    log.debug("marker %d of step %d unreadable yet: %s", r, job.step, exc)
                    continue
                if m.attempt == self.attempt and m.step == job.step:
                    markers[r] = m
            if len(markers) == self.world_size:
                break
            if self._closing.is_set() or time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(markers))
                raise CommitTimeout(f"ranks {missing} never finished uploading step {job.step}")
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)

        files: dict[str, FileRecord] = {}
        for m in markers.values():
            for name, rec in m.files.items():
                if name in files:
                    raise RuntimeError(f"ranks {files[name].rank} and {rec.rank} both wrote {name}")
                files[name] = rec
        self.fs.invalidate_cache(folder)
        present = {p[len(folder) + 1:]: int(i.get("size") or 0)
                   for p, i in self.fs.find(folder, detail=True).items()}
        bad = [n for n, rec in files.items() if present.get(n) != rec.size]
        if bad:
            raise RuntimeError(f"files of step {job.step} missing or of the wrong size in storage: {bad[:5]}")
        manifest = Manifest(step=job.step, files=files, attempt=self.attempt, **job.manifest_fields)
        storage.with_retries(f"writing {MANIFEST} for step {job.step}",
                             lambda: storage.write_atomic(self.fs, storage.join(folder, MANIFEST),
                                                          manifest.to_json()), self.retries,
                             self.retry_base_delay)
        log.info("committed checkpoint step %d (%d files, %.1f MB)", job.step, len(files),
                 manifest.total_bytes / 1e6)
        return manifest


BACKGROUND_NICE = 19


def background_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: a thread is its own task): serialising,
    hashing and uploading a checkpoint must not take cores from the training step.

    The lowest nice level: at 10 a training step whose threads meet at barriers many times
    per step still lost about 1.5-1.7x while an upload ran (2-core machine). SCHED_IDLE
    protects the step a little more but can starve an upload outright while data-loading
    workers keep every core busy; nice 19 still guarantees it a small share."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       max(os.getpriority(os.PRIO_PROCESS, 0), BACKGROUND_NICE))
    except (AttributeError, OSError):   # not Linux, or not allowed: run at normal priority
        pass


def background_filesystem(fs):
    """`fs`, or for an async fsspec filesystem (gcsfs, s3fs) a twin of it whose network I/O
    runs on an event-loop thread of its own at background priority.

    An async filesystem sends every byte from one event-loop thread shared by the process
    (fsspec's "fsspecIO", normal priority); for a checkpoint upload that is the HTTP
    client's copies, ~2.7 CPU s per GB on the 2-core machine (gcsfs/aiohttp), taking a core
    from the training step like serialising would. The twin's thread ("ckpt-http") is
    lowered like the other upload threads; other users of the shared loop (dataset shards)
    keep their priority."""
    from fsspec.asyn import AsyncFileSystem

    if not isinstance(fs, AsyncFileSystem):
        return fs
    loop = asyncio.new_event_loop()

    def run_loop() -> None:
        background_priority()
        asyncio.set_event_loop(loop)
        loop.run_forever()

    threading.Thread(target=run_loop, name="ckpt-http", daemon=True).start()
    return type(fs)(**fs.storage_options, loop=loop, skip_instance_cache=True)


def put(fs, src: str, dst: str) -> None:
    """One staged file to its place in the checkpoint: renamed when the target is on the same
    local filesystem (no copy), else copied or uploaded."""
    if storage.is_local(fs) and _move_into_place(src, dst):
        return
    storage.put_file(fs, src, dst)


def _move_into_place(src: str, dst: str) -> bool:
    """Rename a staged file to its place in a local checkpoint folder (flushed to disk
    first, as a copy would be). False when they are on different filesystems."""
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise
    return True


def describe_failure(exc: BaseException, local_folder: str,
                     setting: str = "checkpoint.local_dir") -> str:
    """One line saying why a checkpoint could not be saved. A full disk (ENOSPC, or torch's
    "unexpected pos" for the same short write) is named as such, with the free space now;
    `setting` is the config key that places `local_folder` (checkpoints.disk_space)."""
    if is_disk_full(exc):
        where = getattr(exc, "filename", None) or local_folder
        folder = existing_parent(where)
        folder = folder if os.path.isdir(folder) else os.path.dirname(folder)   # not the file
        return (f"no space left on the device holding {where}; the checkpoint was not "
                "committed and its partial files were removed: "
                + full_disk_message(folder, free_bytes(folder), None, setting=setting))
    return f"{type(exc).__name__}: {exc}"
