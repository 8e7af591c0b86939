"""Which checkpoints to delete: keep the last N committed, every K-th, and never the newest.

Rules (run by rank 0 after each commit):
- committed checkpoints: keep the newest `keep_last`, and those whose step is a multiple of
  `keep_every` (when > 0); delete the rest. The newest committed one is always kept, so
  there is a loadable checkpoint at every moment.
- "committed" means loadable: the manifest parses and the files match it (sizes and
  content, checkpoints.integrity), so a corrupt newest checkpoint never counts as one of
  the `keep_last` at the expense of an older good one.
- uncommitted or damaged folders: deleted only when older than the newest committed
  checkpoint, not still being uploaded by this process, and untouched for `quiet_s`
  (a crashed attempt's leftovers; a folder another process wrote to recently may be its
  upload in flight, e.g. a job whose lease was just taken over). Newer ones are left alone.
"""
from __future__ import annotations

import logging
import time

from pretrain.storage import filesystem, join

from .discovery import CheckpointInfo, list_checkpoints
from .layout import MANIFEST

log = logging.getLogger("checkpoints")


def plan_deletions(infos: list[CheckpointInfo], keep_last: int, keep_every: int,
                   in_progress: set[int] = frozenset(), quiet_s: float = 0.0,
                   now: float | None = None) -> list[CheckpointInfo]:
    committed = sorted((i for i in infos if i.loadable), key=lambda i: i.step)
    if not committed:
        return []  # nothing may be removed before something is safely committed
    newest = committed[-1].step
    keep = {i.step for i in committed[-max(1, keep_last):]}
    if keep_every > 0:
        keep |= {i.step for i in committed if i.step % keep_every == 0}
    doomed = [i for i in committed if i.step not in keep]
    now = time.time() if now is None else now
    doomed += [i for i in infos if not i.loadable and i.step < newest and i.step not in in_progress
               and now - (i.modified or 0.0) >= quiet_s]
    return sorted(doomed, key=lambda i: i.step)


def apply_retention(uri: str, keep_last: int, keep_every: int,
                    in_progress: set[int] = frozenset(), quiet_s: float = 0.0) -> list[int]:
    """Delete what the rules say; returns the deleted steps."""
    infos = list_checkpoints(uri)
    doomed = plan_deletions(infos, keep_last, keep_every, in_progress, quiet_s)
    fs, _ = filesystem(uri)
    deleted = []
    for info in doomed:
        _, path = filesystem(info.uri)
        try:
            # The manifest goes first: a half-deleted checkpoint must not look committed.
            manifest = join(path, MANIFEST)
            if fs.exists(manifest):
                fs.rm_file(manifest)
            fs.rm(path, recursive=True)
            deleted.append(info.step)
        except FileNotFoundError:
            deleted.append(info.step)
        except Exception as exc:  # retention is best effort; the next commit tries again
            log.warning("could not delete old checkpoint %s: %s", info.uri, exc)
    if deleted:
        fs.invalidate_cache()
        log.info("retention removed checkpoint steps %s", deleted)
    return deleted
