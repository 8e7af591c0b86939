"""Who owns a checkpoint URI: a lease the running job renews.

Two jobs writing one checkpoint URI break each other's checkpoints (same-named files,
retention deleting the other's uploads). So rank 0 of a job writes URI/LEASE.json before it
resumes or saves anything, and renews it from a background thread every timeout/4:

    {"holder": "host:pid:attempt", "job": "<launcher job id>", "renewed": <unix time>, ...}

- Another job finds a fresh lease and is refused (`LeaseHeld`, one paragraph naming the
  holder, when it last renewed, and what to do).
- A lease whose holder stopped renewing for `timeout_s` (a crashed or preempted job) is
  taken over, so restarting after a crash needs no manual step (at once when the holder's
  process was on this machine and is gone); a worker-group restart
  inside the same launcher job (same `job` id: Ray's job id, torchrun's run id) takes it
  over at once.
- `take_over=True` (checkpoint.take_over_lease) takes a fresh lease anyway; the old holder
  notices at its next renewal (`lost`) and stops at its next checkpoint.

Object stores have no compare-and-swap that works everywhere (the GCS emulator ignores
generation preconditions), so acquiring is write, wait `settle_s`, read back: of two jobs
starting within the same moment the last writer wins and the other sees it is not the
holder. The two halves can be apart (`claim`, then `confirm`): the wait is then spent on
work that writes nothing to the URI (the job builds its model, a resume downloads its
checkpoint), and `confirm` sleeps only what is left of `settle_s`. Nothing may be written,
and nothing read handed on, before `confirm` returned. A renewal re-reads the lease first,
so a holder that lost it finds out within timeout/4. Staleness compares the holder's clock
with the reader's: clocks must agree to well within `timeout_s`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from pretrain import storage
from pretrain.errors import UserError

log = logging.getLogger("checkpoints")

LEASE = "LEASE.json"


class LeaseHeld(UserError):
    """Another live job owns the checkpoint URI."""


@dataclass
class LeaseRecord:
    holder: str
    job: str
    host: str
    pid: int
    acquired: float
    renewed: float
    timeout_s: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "LeaseRecord":
        raw = json.loads(data)
        return cls(holder=str(raw["holder"]), job=str(raw.get("job", "")),
                   host=str(raw.get("host", "?")), pid=int(raw.get("pid", 0)),
                   acquired=float(raw.get("acquired", 0.0)), renewed=float(raw["renewed"]),
                   timeout_s=float(raw.get("timeout_s", 0.0)))

    def describe(self, now: float | None = None) -> str:
        age = (now or time.time()) - self.renewed
        job = f", job {self.job}" if self.job else ""
        return (f"{self.holder} (host {self.host}, pid {self.pid}{job}; last renewed "
                f"{age:.0f} s ago)")


class Lease:
    def __init__(self, uri: str, *, attempt: str, job: str = "", timeout_s: float = 300.0,
                 take_over: bool = False, settle_s: float = 0.5):
        self.uri = uri
        self.fs, root = storage.filesystem(uri)
        self.path = storage.join(root, LEASE)
        self.job, self.timeout_s, self.take_over, self.settle_s = job, timeout_s, take_over, settle_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.holder = f"{self.host}:{self.pid}:{attempt}"
        self.lost: LeaseRecord | None = None     # set when another job took it over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquired = 0.0
        self._claimed_at: float | None = None   # monotonic time of claim()'s write
        self.settle_wait_s = 0.0                 # what confirm() still had to sleep

    # -- reading and writing the record --------------------------------------------------

    def read(self) -> LeaseRecord | None:
        try:
            self.fs.invalidate_cache(self.path)
            return LeaseRecord.from_json(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable lease %s (%s)", storage.join(self.uri, LEASE), exc)
            return None

    def _write(self) -> None:
        now = time.time()
        record = LeaseRecord(self.holder, self.job, self.host, self.pid, self._acquired or now,
                             now, self.timeout_s)
        storage.write_atomic(self.fs, self.path, record.to_json())

    def _stale(self, record: LeaseRecord, now: float) -> bool:
        if record.host == self.host and record.pid != self.pid and not _alive(record.pid):
            return True   # its process on this machine is gone: no need to wait
        return now - record.renewed > max(self.timeout_s, record.timeout_s)

    # -- acquire, renew, release ---------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeld; then keep it renewed in the background."""
        self.claim()
        self.confirm()

    def _why_ours(self, current: LeaseRecord, now: float) -> str | None:
        """Why this job may take a lease `current` holds ("stale", "same job", "take over"),
        or None: another live job holds it."""
        if self._stale(current, now):
            return "stale"
        if self.job and current.job == self.job:
            return "same job"
        return "take over" if self.take_over else None

    def check(self) -> None:
        """Raise LeaseHeld when `claim` would, writing nothing: a job's check before it
        starts anything (orchestration.driver), so that a second job on the URI is refused
        in seconds, not once its workers have built their models. `claim` stays the rule."""
        current = self.read()
        now = time.time()
        if (current is not None and current.holder != self.holder
                and self._why_ours(current, now) is None):
            raise self._refusal(current, now)

    def claim(self) -> None:
        """First half of acquire: raise LeaseHeld if another live job holds the lease, else
        write this job's record. The lease is not ours until `confirm` returned."""
        current = self.read()
        now = time.time()
        if current is not None and current.holder != self.holder:
            why = self._why_ours(current, now)
            if why == "stale":
                log.warning("checkpoint URI %s: taking over the lease of %s, which stopped "
                            "renewing it", self.uri, current.describe(now))
            elif why == "same job":
                log.info("checkpoint URI %s: taking over the lease of an earlier attempt of "
                         "this job (%s)", self.uri, current.holder)
            elif why == "take over":
                log.warning("checkpoint URI %s: taking over the lease of %s although it is "
                            "still renewed (checkpoint.take_over_lease=true); that job stops "
                            "at its next checkpoint", self.uri, current.describe(now))
            else:
                raise self._refusal(current, now)
        self._acquired = time.time()
        self._write()
        self._claimed_at = time.monotonic()

    def confirm(self) -> None:
        """Second half of acquire, after `claim`: once `settle_s` has passed since the write
        (a job that wrote at the same moment: last writer wins), read the lease back; raise
        LeaseHeld if another job's record replaced ours, else start renewing it."""
        assert self._claimed_at is not None, "confirm() needs claim() first"
        self.settle_wait_s = max(0.0, self._claimed_at + self.settle_s - time.monotonic())
        time.sleep(self.settle_wait_s)
        winner = self.read()
        if winner is None or winner.holder != self.holder:
            if winner is None:
                raise LeaseHeld(f"the lease on checkpoint URI {self.uri} ({LEASE}) vanished "
                                "right after this job wrote it: another job is acquiring or "
                                "releasing it at the same moment; start this job again.")
            raise self._refusal(winner, time.time())
        if time.monotonic() - self._claimed_at > self.timeout_s / 4:
            self._write()   # claimed long ago (a model slow to build): renew before it looks stale
        self._thread = threading.Thread(target=self._renew_loop, name="ckpt-lease", daemon=True)
        self._thread.start()

    def _refusal(self, current: LeaseRecord, now: float) -> LeaseHeld:
        wait = max(0.0, max(self.timeout_s, current.timeout_s) - (now - current.renewed))
        return LeaseHeld(
            f"checkpoint URI {self.uri} is in use by another job: {current.describe(now)}. Two "
            "jobs writing one checkpoint URI overwrite each other's checkpoints, so this one "
            "does not start. Give this run its own checkpoint.uri (checkpoint.resume_from=URI "
            "starts it from the other run's checkpoints), or stop the other job; a lease its "
            f"holder stops renewing is taken over after checkpoint.lease_timeout_s "
            f"({self.timeout_s:.0f} s; this one in {wait:.0f} s at the latest). If that job is "
            "certainly gone, checkpoint.take_over_lease=true takes the lease now.")

    def _renew_loop(self) -> None:
        interval = self.timeout_s / 4
        while not self._stop.wait(interval):
            try:
                current = self.read()
                if current is not None and current.holder != self.holder:
                    self.lost = current
                    log.error("checkpoint URI %s: the lease was taken over by %s; this job "
                              "stops at its next checkpoint", self.uri, current.describe())
                    return
                self._write()
            except Exception as exc:  # storage hiccup: try again next time, well within timeout
                log.warning("could not renew the lease on %s: %s", self.uri, exc)

    def lost_message(self) -> str | None:
        if self.lost is None:
            return None
        return (f"another job took over checkpoint URI {self.uri}: {self.lost.describe()}. "
                "This run stopped so that the two do not overwrite each other's checkpoints; "
                "its committed checkpoints are intact. Give each run its own checkpoint.uri.")

    def release(self) -> None:
        """Stop renewing and remove the lease if this job still holds it (or claimed it and
        was not confirmed yet: a run that failed while building its model)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._claimed_at is None or self.lost is not None:
            return   # nothing of ours was written, or another job took it over
        try:
            current = self.read()
            if current is not None and current.holder == self.holder:
                self.fs.rm_file(self.path)
        except Exception as exc:  # it goes stale and is taken over after the timeout
            log.warning("could not release the lease on %s: %s", self.uri, exc)
        self._thread = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
